"""Distributed DPO launch: strategies, torchrun, and the multi-node TrainJob checked against the real CRD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llm_auction.config import DistributedConfig, load_config
from llm_auction.deploy import validate_documents
from llm_auction.errors import LaunchError
from llm_auction.irpo.launch import deepspeed_config, render_trainjob, strategy_arguments, torchrun_command

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "base" / "trainjob-template.yaml"


@pytest.fixture
def template() -> dict:
    return yaml.safe_load(TEMPLATE.read_text())


def multi_node_settings():
    return load_config(
        environ={},
        profile="cluster",
        overrides={"irpo": {"distributed": {"num_nodes": 4, "nproc_per_node": 8, "gpus_per_node": 8}}},
    )


def test_the_rendered_trainjob_is_valid_against_the_trainer_crd_and_the_policies(template):
    args = ["--policy", "/mnt/llm-auction/pi_2", "--pairs", "/mnt/p", "--out", "/mnt/llm-auction/pi_3"]
    job = render_trainjob(template, multi_node_settings(), "irpo-dpo-epoch-3", args)
    assert validate_documents([job]) == []
    trainer = job["spec"]["trainer"]
    assert job["spec"]["suspend"] is False and job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert trainer["command"] == ["llm-auction", "irpo", "dpo"] and trainer["args"] == args
    assert job["metadata"]["labels"]["llm-auction.io/template"] == "false"
    assert template["spec"]["suspend"] is True  # the deployed template is not modified


def test_a_cpu_trainjob_requests_no_gpu(template):
    settings = load_config(environ={}, overrides={"irpo": {"distributed": {"num_nodes": 2}}})
    job = render_trainjob(template, settings, "irpo-dpo-cpu", [])
    assert "nvidia.com/gpu" not in job["spec"]["trainer"]["resourcesPerNode"]["limits"]


def test_a_template_without_the_workspace_volume_is_refused(template):
    patch = template["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    pod = patch["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "workspace"]
    with pytest.raises(LaunchError, match="workspace"):
        render_trainjob(template, multi_node_settings(), "x", [])
    with pytest.raises(LaunchError, match="TrainJob"):
        render_trainjob({"kind": "PyTorchJob"}, multi_node_settings(), "x", [])


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp"])
def test_gpu_strategies_fail_clearly_on_a_cpu(strategy, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(LaunchError, match="needs GPUs"):
        strategy_arguments(DistributedConfig(strategy=strategy))


def test_ddp_sets_a_backend_only_under_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert strategy_arguments(DistributedConfig()) == {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert strategy_arguments(DistributedConfig()) == {"ddp_backend": "gloo", "use_cpu": True}


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_deepspeed_configs(stage):
    config = json.loads(Path(deepspeed_config(stage)).read_text())
    assert config["zero_optimization"]["stage"] == stage
    # Batch sizes come from TRL's arguments, so the two can never disagree.
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    assert config["gradient_accumulation_steps"] == "auto"


def test_torchrun_runs_the_same_entry_point():
    command = torchrun_command(2, ["irpo", "dpo", "--out", "x"])
    assert command[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert command[-6:] == ["-m", "llm_auction", "irpo", "dpo", "--out", "x"]


class FakeTrainerAPI:
    """Stands in for the Kubernetes API (none runs here); what it is sent is checked against the real CRD."""

    def __init__(self, template: dict, states: list[dict]) -> None:
        self.template, self.states, self.created = template, states, []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        if name == "irpo-dpo-template":
            return self.template
        return {**self.created[-1], "status": self.states.pop(0)}

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append(body)


def _condition(kind: str, message: str = "") -> dict:
    return {
        "conditions": [
            {"type": "Created", "status": "True"},
            {"type": kind, "status": "True", "message": message},
        ]
    }


def test_a_multi_node_dpo_creates_a_valid_trainjob_and_waits_for_it(template):
    from llm_auction.irpo.trainjob import run_trainjob

    api = FakeTrainerAPI(template, [{}, _condition("Complete")])
    run_trainjob(multi_node_settings(), "irpo-dpo-epoch-2", ["--policy", "/mnt/p"], api=api, poll_s=0)
    (job,) = api.created
    assert validate_documents([job]) == []
    assert job["metadata"]["name"] == "irpo-dpo-epoch-2" and job["spec"]["trainer"]["numNodes"] == 4


def test_a_failed_trainjob_fails_the_step_with_the_controllers_message(template):
    from llm_auction.irpo.trainjob import run_trainjob

    api = FakeTrainerAPI(template, [{}, _condition("Failed", "node-1: OOMKilled")])
    with pytest.raises(LaunchError, match="irpo-dpo-epoch-2 failed: node-1: OOMKilled"):
        run_trainjob(multi_node_settings(), "irpo-dpo-epoch-2", [], api=api, poll_s=0)
    with pytest.raises(LaunchError, match="did not finish"):
        run_trainjob(
            multi_node_settings(), "late", [], api=FakeTrainerAPI(template, [{}] * 3), poll_s=0, timeout_s=0
        )
