from typing import NamedTuple

from kfp import dsl

from components import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def configure(profile: str, config_path: str, overrides: str, epoch: int) -> NamedTuple(
    "Configured", [("settings_json", str), ("parent_run_id", str)]
):
    """Validate the configuration once and open the epoch's parent MLflow run."""
    from collections import namedtuple

    from llm_auction.pipeline.steps import common

    settings_json = common.resolve_settings(profile, config_path, overrides)
    return namedtuple("Configured", ["settings_json", "parent_run_id"])(
        settings_json, common.start_epoch(settings_json, epoch)
    )
