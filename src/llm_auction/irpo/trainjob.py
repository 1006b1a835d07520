"""Multi-node DPO: create a Kubeflow Trainer TrainJob from the deployed template and wait for it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from llm_auction.config import Settings
from llm_auction.errors import LaunchError
from llm_auction.irpo.launch import render_trainjob

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
TEMPLATE = "irpo-dpo-template"


def _api() -> Any:
    from kubernetes import client, config

    config.load_incluster_config()
    return client.CustomObjectsApi()


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """("Complete" | "Failed" | "Running", message) from the TrainJob's status conditions."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return condition["type"], condition.get("message", "")
    return "Running", ""


def run_trainjob(
    settings: Settings,
    name: str,
    args: Sequence[str],
    api: Any = None,
    poll_s: float = 15.0,
    timeout_s: float = 12 * 3600,
) -> dict[str, Any]:
    """Render the job from the cluster's template, create it, and block until it completes.

    Raises:
        LaunchError: the job failed (with the controller's message) or did not finish in time.
    """
    api = api or _api()
    namespace = settings.irpo.distributed.namespace
    template = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, TEMPLATE)
    job = render_trainjob(template, settings, name, args)
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    deadline = time.monotonic() + timeout_s
    while True:
        current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        state, message = job_state(current)
        if state == "Complete":
            return current
        if state == "Failed":
            raise LaunchError(f"TrainJob {namespace}/{name} failed: {message or 'no message'}")
        if time.monotonic() > deadline:
            raise LaunchError(f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f} s")
        time.sleep(poll_s)
