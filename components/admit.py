from kfp import dsl
from kfp.dsl import Dataset, Input

from components import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def admit(settings_json: str, parent_run_id: str, evaluation: Input[Dataset], version: str) -> bool:
    """Step 6, both branches of the offline gate: card and tags; `challenger` when it enters the canary."""
    from llm_auction.pipeline.steps import common
    from llm_auction.pipeline.steps import gate as step

    with common.failing_epoch(settings_json, parent_run_id):
        return bool(step.gate(settings_json, evaluation.path, version, parent_run_id)["admitted"])
