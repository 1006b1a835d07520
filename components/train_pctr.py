from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from components import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def train_pctr(
    settings_json: str,
    parent_run_id: str,
    window_start: str,
    window_end: str,
    epoch: int,
    pctr: Output[Model],
    metrics: Output[Metrics],
) -> str:
    """Step 2: psi_t on the point-in-time training set; returns its registry version."""
    from llm_auction.pipeline.steps import common
    from llm_auction.pipeline.steps import pctr as step

    with common.failing_epoch(settings_json, parent_run_id):
        card = step.train_pctr(settings_json, pctr.path, window_start, window_end, epoch, parent_run_id)
    for key, value in common.finite_metrics(card, ("test_auc", "test_ece", "test_log_loss", "rows")).items():
        metrics.log_metric(key, value)
    pctr.metadata["registered_version"] = card.get("registered_version", "")
    return str(card.get("registered_version", ""))
