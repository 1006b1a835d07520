from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import COMPONENT_CUDA_IMAGE


@dsl.component(base_image=COMPONENT_CUDA_IMAGE, install_kfp_package=False)
def build_preferences(
    settings_json: str,
    parent_run_id: str,
    policy_uri: str,
    pctr: Input[Model],
    feedback_dir: str,
    window_start: str,
    window_end: str,
    epoch: int,
    pairs: Output[Dataset],
    metrics: Output[Metrics],
):
    """Step 3: M samples per prompt (the window's logged requests) from pi_{t-1}, scored by R, paired."""
    from llm_auction.pipeline.steps import common
    from llm_auction.pipeline.steps import preferences as step

    with common.failing_epoch(settings_json, parent_run_id):
        stats = step.build_preferences(
            settings_json,
            policy_uri,
            pctr.path,
            feedback_dir,
            window_start,
            window_end,
            pairs.path,
            epoch,
            parent_run_id,
        )
    for key, value in common.finite_metrics(stats).items():
        metrics.log_metric(key, value)
