from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import COMPONENT_CUDA_IMAGE


@dsl.component(base_image=COMPONENT_CUDA_IMAGE, install_kfp_package=False)
def train_dpo(
    settings_json: str,
    parent_run_id: str,
    policy_uri: str,
    pairs: Input[Dataset],
    epoch: int,
    pctr_version: str,
    policy: Output[Model],
    metrics: Output[Metrics],
) -> str:
    """Step 4: DPO of pi_{t-1} (one process, torchrun, or a TrainJob); returns the new registry version."""
    from llm_auction.pipeline.steps import common
    from llm_auction.pipeline.steps import dpo as step

    with common.failing_epoch(settings_json, parent_run_id):
        result = step.train_dpo(
            settings_json, policy_uri, pairs.path, policy.path, epoch, pctr_version, parent_run_id
        )
    keys = ("steps", "seconds", "train_loss", "first_loss", "last_loss", "pairs")
    for key, value in common.finite_metrics(result["dpo"], keys).items():
        metrics.log_metric(key, value)
    policy.metadata["registered_version"] = result["registered_version"]
    return result["registered_version"]
