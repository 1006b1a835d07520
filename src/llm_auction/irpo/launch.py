"""Distributed DPO: one entry point (`llm-auction irpo dpo`) under one process, torchrun or a TrainJob.

- one node: `torchrun --nproc_per_node N -m llm_auction irpo dpo ...` (CPU: gloo; GPU: NCCL);
- GPUs: the strategy adds DeepSpeed ZeRO-2/3 (configs shipped in `llm_auction/configs/deepspeed`)
  or FSDP to TRL's arguments;
- several nodes: a Kubeflow Trainer TrainJob on the `torch-distributed` runtime, whose torchrun
  launcher starts the same command on every node.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Sequence
from importlib import resources
from typing import Any

import torch

from llm_auction.config import DistributedConfig, Settings
from llm_auction.errors import LaunchError

TRAINER_API_VERSION = "trainer.kubeflow.org/v1alpha1"


def deepspeed_config(stage: int) -> str:
    """Path of the shipped ZeRO config (values "auto" are filled from TRL's arguments)."""
    return str(resources.files("llm_auction.configs").joinpath(f"deepspeed/zero{stage}.json"))


def strategy_arguments(cfg: DistributedConfig) -> dict[str, Any]:
    """Extra `DPOConfig` arguments of the configured strategy; GPU-only ones fail clearly on a CPU."""
    if cfg.strategy == "ddp":
        # A backend set in a single process makes accelerate expect a process group; torchrun sets WORLD_SIZE.
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return {}
        if torch.cuda.is_available():
            return {"ddp_backend": "nccl"}
        # Without use_cpu, accelerate treats CPU processes as independent runs: no gradient all-reduce.
        return {"ddp_backend": "gloo", "use_cpu": True}
    if not torch.cuda.is_available():
        raise LaunchError(
            f"irpo.distributed.strategy={cfg.strategy} needs GPUs; use strategy=ddp on a CPU (gloo)"
        )
    if cfg.strategy in ("zero2", "zero3"):
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise LaunchError(
                f"irpo.distributed.strategy={cfg.strategy} needs `deepspeed` (pip install '.[gpu]')"
            ) from exc
        return {"deepspeed": deepspeed_config(int(cfg.strategy[-1]))}
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer", "Qwen2DecoderLayer"]},
    }


def torchrun_command(nproc_per_node: int, argv: Sequence[str], master_port: int | None = None) -> list[str]:
    """`torchrun` on this node running `python -m llm_auction ARGV` in each of N processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node)]
    command += ["--master_port", str(master_port)] if master_port else ["--standalone"]
    return [*command, "-m", "llm_auction", *argv]


def run_torchrun(
    nproc_per_node: int, argv: Sequence[str], master_port: int | None = None, timeout_s: float | None = None
) -> None:
    """Run N local processes and fail with the tail of their output when any of them fails."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    process = subprocess.run(
        torchrun_command(nproc_per_node, argv, master_port),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
        check=False,
    )
    if process.returncode != 0:
        tail = "\n".join((process.stdout + process.stderr).splitlines()[-25:])
        raise LaunchError(f"torchrun with {nproc_per_node} processes exited {process.returncode}:\n{tail}")


def render_trainjob(
    template: dict[str, Any], settings: Settings, name: str, args: Sequence[str]
) -> dict[str, Any]:
    """A runnable TrainJob from the deployed template (deploy/base/trainjob-template.yaml).

    The template fixes everything a platform team owns (runtime patches, security, secrets); the
    configuration sets the run: name, nodes, processes and GPUs per node, image, the DPO arguments.
    """
    cfg = settings.irpo.distributed
    if template.get("apiVersion") != TRAINER_API_VERSION or template.get("kind") != "TrainJob":
        raise LaunchError(f"TrainJob template: expected {TRAINER_API_VERSION} TrainJob")
    job = copy.deepcopy(template)
    job["metadata"] = {
        "name": name,
        "namespace": cfg.namespace,
        "labels": {**template["metadata"].get("labels", {}), "llm-auction.io/template": "false"},
    }
    spec = job["spec"]
    spec["suspend"] = False
    spec["runtimeRef"]["name"] = cfg.runtime
    trainer = spec["trainer"]
    trainer["image"] = cfg.image
    trainer["command"] = ["llm-auction", "irpo", "dpo"]
    trainer["args"] = list(args)
    trainer["numNodes"] = cfg.num_nodes
    trainer["numProcPerNode"] = cfg.nproc_per_node
    patched = [
        volume
        for patch in spec.get("runtimePatches", [])
        for replicated in patch.get("trainingRuntimeSpec", {})
        .get("template", {})
        .get("spec", {})
        .get("replicatedJobs", [])
        for volume in replicated["template"]["spec"]["template"]["spec"].get("volumes", [])
        if volume.get("name") == "workspace"
    ]
    if not patched:
        raise LaunchError("TrainJob template: no `workspace` volume for the policies and pairs")
    for volume in patched:
        volume["persistentVolumeClaim"] = {"claimName": cfg.workspace_pvc}
    for bound in ("requests", "limits"):
        resources_ = trainer.setdefault("resourcesPerNode", {}).setdefault(bound, {})
        if cfg.gpus_per_node:
            resources_["nvidia.com/gpu"] = str(cfg.gpus_per_node)
        else:
            resources_.pop("nvidia.com/gpu", None)
    return job
