from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components import COMPONENT_CUDA_IMAGE


@dsl.component(base_image=COMPONENT_CUDA_IMAGE, install_kfp_package=False)
def evaluate(
    settings_json: str,
    parent_run_id: str,
    candidate: Input[Model],
    champion_uri: str,
    reference_uri: str,
    pctr: Input[Model],
    epoch: int,
    version: str,
    evaluation: Output[Dataset],
    report: Output[HTML],
    metrics: Output[Metrics],
) -> bool:
    """Step 5: candidate vs champion vs baselines (KL to `reference_uri`, pi_{t-1}); True when every
    gate check clears.
    """
    import shutil
    from pathlib import Path

    from llm_auction.pipeline.steps import common
    from llm_auction.pipeline.steps import evaluate as step

    with common.failing_epoch(settings_json, parent_run_id):
        summary = step.evaluate(
            settings_json,
            candidate.path,
            champion_uri,
            pctr.path,
            evaluation.path,
            epoch,
            version,
            parent_run_id,
            reference_uri,
        )
    shutil.copyfile(Path(evaluation.path) / "report.html", report.path)
    values = {"kl": summary["kl"], **{f"gain_{k}": g["mean"] for k, g in summary["gain"].items()}}
    for key, value in common.finite_metrics(values).items():
        metrics.log_metric(key, value)
    return all(check["passed"] for check in summary["gate"]["checks"])
