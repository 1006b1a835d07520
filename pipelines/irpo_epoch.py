"""The `irpo-epoch` pipeline: one IRPO epoch, one run (ARCHITECTURE.md, "One IRPO epoch").

    configure -> canary (the running canary's verdict on the window's live traffic: promote,
                         roll back, inconclusive or keep collecting)
              -> ingest -> train_pctr -> build_preferences -> train_dpo -> evaluate
              -> dsl.If(offline gate clears): admit -> dsl.If(admitted): deploy (start its canary)
                 dsl.Else: admit (records the hold)

Promotion is decided by live traffic only: the candidate this run admits is the next run's canary.
The policy the epoch improves is the canary step's output: `policy_uri` when given, else
`irpo.start_policy` (the champion, or the `head` alias: the latest admitted candidate that live
traffic has not rolled back); the candidate is evaluated against the champion either way.

Parameters map onto the configuration: `profile` and `config_path` pick it, the named parameters
override single keys, and `overrides` (YAML) any others. `python -m pipelines.irpo_epoch` (`make
compile`) writes `pipelines/irpo_epoch.yaml`; a test fails when that file is stale.
"""

import sys
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.admit import admit
from components.build_preferences import build_preferences
from components.canary import canary
from components.configure import configure
from components.deploy import deploy
from components.evaluate import evaluate
from components.ingest import ingest
from components.train_dpo import train_dpo
from components.train_pctr import train_pctr
from llm_auction.config import load_config

COMPILED = Path(__file__).with_suffix(".yaml")
WORKSPACE_PVC, WORKSPACE_MOUNT = "llm-auction-workspace", "/mnt/llm-auction"
SECRETS = {
    "llm-auction-s3": {
        k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL")
    },
    "llm-auction-postgres": {"FEAST_REGISTRY_URI": "FEAST_REGISTRY_URI"},
}
# GPUs of one DPO pod: the cluster profile's, so the compiled pipeline and the configuration agree.
DPO_GPUS = load_config(profile="cluster", environ={}).irpo.distributed.gpus_per_node
GENERATION_GPUS = 1  # vLLM sampling and evaluation: one engine on one GPU (the policy fits one)
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")


def _on_cluster(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Workspace volume and store credentials (kfp.local ignores them); no caching: side effects."""
    kubernetes.mount_pvc(task, pvc_name=WORKSPACE_PVC, mount_path=WORKSPACE_MOUNT)
    for secret, keys in SECRETS.items():
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=keys)
    task.set_caching_options(False)
    return task


def _on_gpus(task: dsl.PipelineTask, gpus: int) -> dsl.PipelineTask:
    """`gpus` NVIDIA GPUs, with the CPU and memory that feed them, on a GPU node."""
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
    task.set_cpu_limit(str(8 * gpus)).set_memory_limit(f"{64 * gpus}G")
    kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
    return task


@dsl.pipeline(
    name="irpo-epoch",
    description="One IRPO epoch: canary verdict, ingest, pCTR, pairs, DPO, evaluation, gate, next canary.",
)
def irpo_epoch(
    epoch: int = 1,
    window_start: str = "",
    window_end: str = "",
    feedback_dir: str = "/mnt/llm-auction/feedback",
    policy_uri: str = "",
    profile: str = "cluster",
    config_path: str = "",
    overrides: str = "",
    end_canary: bool = False,
) -> None:
    config = _on_cluster(
        configure(profile=profile, config_path=config_path, overrides=overrides, epoch=epoch)
    )
    config.set_display_name("configure")
    settings, parent = config.outputs["settings_json"], config.outputs["parent_run_id"]
    verdict = _on_cluster(
        canary(
            settings_json=settings,
            parent_run_id=parent,
            feedback_dir=feedback_dir,
            window_end=window_end,
            end_canary=end_canary,
            policy_uri=policy_uri,
        )
    )
    start = verdict.outputs["policy_uri"]  # pi_{t-1}, once the verdict is carried out
    ingested = _on_cluster(
        ingest(
            settings_json=settings,
            parent_run_id=parent,
            feedback_dir=feedback_dir,
            window_start=window_start,
            window_end=window_end,
        )
    )
    pctr = _on_cluster(
        train_pctr(
            settings_json=settings,
            parent_run_id=parent,
            window_start=window_start,
            window_end=window_end,
            epoch=epoch,
        )
    ).after(ingested)
    pairs = _on_gpus(
        _on_cluster(
            build_preferences(
                settings_json=settings,
                parent_run_id=parent,
                policy_uri=start,
                pctr=pctr.outputs["pctr"],
                feedback_dir=feedback_dir,
                window_start=window_start,
                window_end=window_end,
                epoch=epoch,
            )
        ),
        GENERATION_GPUS,
    )
    dpo = _on_gpus(
        _on_cluster(
            train_dpo(
                settings_json=settings,
                parent_run_id=parent,
                policy_uri=start,
                pairs=pairs.outputs["pairs"],
                epoch=epoch,
                pctr_version=pctr.outputs["Output"],
            )
        ),
        DPO_GPUS,
    )
    evaluated = _on_gpus(
        _on_cluster(
            evaluate(
                settings_json=settings,
                parent_run_id=parent,
                candidate=dpo.outputs["policy"],
                champion_uri=verdict.outputs["champion_uri"],
                reference_uri=start,
                pctr=pctr.outputs["pctr"],
                epoch=epoch,
                version=dpo.outputs["Output"],
            )
        ),
        GENERATION_GPUS,
    )

    def record_gate(display_name: str) -> dsl.PipelineTask:
        """The admit step records the verdict on either branch (and sets `challenger` on a pass)."""
        task = _on_cluster(
            admit(
                settings_json=settings,
                parent_run_id=parent,
                evaluation=evaluated.outputs["evaluation"],
                version=dpo.outputs["Output"],
            )
        )
        return task.set_display_name(display_name)

    with dsl.If(evaluated.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition)
        admitted = record_gate("admit")
        with dsl.If(admitted.output == True, name="canary-free"):  # noqa: E712
            _on_cluster(deploy(settings_json=settings, version=dpo.outputs["Output"]))
    with dsl.Else(name="gate-held"):
        record_gate("hold")


def compile_pipeline(path: Path = COMPILED) -> Path:
    compiler.Compiler().compile(irpo_epoch, str(path))
    return path


if __name__ == "__main__":
    print(compile_pipeline(Path(sys.argv[1]) if len(sys.argv) > 1 else COMPILED))
