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
    result: Output[Dataset],
) -> str:
    """Step 0: the running canary's verdict on live traffic (promote, roll back, inconclusive, continue)."""
    from llm_auction.pipeline.steps import canary as step
    from llm_auction.pipeline.steps import common

    with common.failing_epoch(settings_json, parent_run_id):
        return step.canary(settings_json, feedback_dir, window_end, result.path, parent_run_id, end_canary)[
            "decision"
        ]
