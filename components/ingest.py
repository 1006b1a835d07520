from kfp import dsl
from kfp.dsl import Metrics, Output

from components import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def ingest(
    settings_json: str,
    parent_run_id: str,
    feedback_dir: str,
    window_start: str,
    window_end: str,
    report: Output[Metrics],
):
    """Step 1: the feedback window into Feast."""
    from llm_auction.pipeline.steps import common
    from llm_auction.pipeline.steps import ingest as step

    with common.failing_epoch(settings_json, parent_run_id):
        summary = step.ingest(settings_json, feedback_dir, window_start, window_end, parent_run_id)
    for key, value in common.finite_metrics(summary).items():
        report.log_metric(key, value)
