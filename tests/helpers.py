"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from llm_auction.config import Settings

TINY_EPOCH = {
    "world": {"n_requests": 2600},
    "policy": {"held_out_requests": 100, "warm_start": {"n_requests": 2300}},
    "mechanism": {"bootstrap_samples": 200},
    "pctr": {"max_epochs": 8},
    "irpo": {"n_prompts": 24, "m_samples": 4},
    "gate": {"audit_requests": 1},
}
"""Settings for one IRPO epoch in about a minute on 2 cores (the world of the `pi0` fixture)."""


def register_champion(settings: Settings, policy_dir, reason: str = "pi_0") -> str:
    """Log `policy_dir` to MLflow as a new version of the policy and make it the champion."""
    from llm_auction.tracking import registry
    from llm_auction.tracking.runs import tracked_run

    with tracked_run(settings.tracking, "policy-init") as run:
        run.log_artifacts(str(policy_dir), "policy")
        version = registry.register_version(
            settings.tracking, settings.irpo.registered_model, run.run_id, "policy"
        )
    registry.promote(settings.tracking, settings.irpo.registered_model, version, "test", reason)
    return version
