from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from components import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def canary(
    settings_json: str,
    parent_run_id: str,
    feedback_dir: str,
    window_end: str,
    end_canary: bool,
    policy_uri: str,
    result: Output[Dataset],
) -> NamedTuple("CanaryOutputs", [("decision", str), ("policy_uri", str), ("champion_uri", str)]):  # noqa: UP014
    """Step 0: the running canary's verdict on live traffic (promote, roll back, inconclusive,
    continue), then what this epoch improves (`policy_uri`; empty: `irpo.start_policy`) and the
    champion its candidate must beat.
    """
    from typing import NamedTuple

    from llm_auction.pipeline.steps import canary as step
    from llm_auction.pipeline.steps import common

    class CanaryOutputs(NamedTuple):
        decision: str
        policy_uri: str
        champion_uri: str

    with common.failing_epoch(settings_json, parent_run_id):
        verdict = step.canary(settings_json, feedback_dir, window_end, result.path, parent_run_id, end_canary)
        start = step.start_policy(common.settings_from(settings_json), policy_uri)
    return CanaryOutputs(verdict["decision"], start["policy_uri"], start["champion_uri"])
