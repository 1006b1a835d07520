"""Step 5: the candidate against the champion and the deployable baselines, under psi_t."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from llm_auction.config import Settings
from llm_auction.evaluation.candidate import (
    CandidateEvaluation,
    epoch_history,
    evaluate_candidate,
    write_evaluation_report,
)
from llm_auction.evaluation.card import EVALUATION_FILE
from llm_auction.pipeline.steps.common import settings_from
from llm_auction.public.catalog import HELD_OUT_FILE, Catalog, read_requests
from llm_auction.reward.scorer import feast_reward_scorer
from llm_auction.tracking.registry import (
    INITIAL,
    MODELS_PREFIX,
    alias_version,
    registered_version,
    resolve_model,
)
from llm_auction.tracking.runs import lineage_tags, tracked_run


def initial_policy(settings: Settings, reference_version: str, reference: Path, into: Path) -> Path | None:
    """pi_0's directory (the lineage's `pi0` alias; the reference's own when it is pi_0), or None
    where the registry has no pi_0.
    """
    name = settings.irpo.registered_model
    version = None if settings.tracking.uri is None else alias_version(settings.tracking, name, INITIAL)
    if version is None:
        return None
    if version == reference_version:
        return reference  # already fetched: its likelihoods are computed once
    return resolve_model(settings.tracking, f"{MODELS_PREFIX}{name}@{INITIAL}", into)


def evaluate(
    settings_json: str,
    candidate_dir: str,
    champion_policy_uri: str,
    pctr_dir: str,
    out_dir: str,
    epoch: int,
    version: str,
    parent_run_id: str,
    reference_policy_uri: str = "",
) -> dict:
    """Step 5: the candidate against the champion and the baselines, under psi_t.

    On the public held-out request file; writes the report, logs it all to MLflow (child run
    `evaluate`) and returns the summary the gate reads. The drift KL is measured against the
    candidate's DPO reference (pi_{t-1}: the champion unless given) and against pi_0.
    """
    settings = settings_from(settings_json)
    requests = read_requests(settings.public_dir / HELD_OUT_FILE, settings.mechanism.max_bid)
    profiles = Catalog.load(settings.public_dir).profiles()
    reference_uri = reference_policy_uri or champion_policy_uri  # pi_{t-1}: what DPO improved
    lineage = {
        "epoch": epoch,
        "candidate_version": version,
        "reference": reference_uri,
        "reference_version": registered_version(settings.tracking, reference_uri)[1]
        if reference_uri.startswith(MODELS_PREFIX)
        else "",
        "parent_run_id": parent_run_id,
    }
    scorer = feast_reward_scorer(settings, Path(pctr_dir))
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        champion = resolve_model(settings.tracking, champion_policy_uri, Path(scratch) / "champion")
        reference = (
            resolve_model(settings.tracking, reference_policy_uri, Path(scratch) / "reference")
            if reference_policy_uri
            else champion
        )
        initial = initial_policy(settings, lineage["reference_version"], reference, Path(scratch) / "pi0")
        evaluation: CandidateEvaluation = evaluate_candidate(
            settings,
            requests,
            profiles,
            Path(candidate_dir),
            champion,
            reference,
            scorer,
            initial_dir=initial,
        )
    scorer.flush()
    summary = evaluation.summary
    summary["lineage"] = lineage
    write_evaluation_report(evaluation, out, epoch_history(settings, summary))
    tags = lineage_tags("evaluate", lineage)
    with tracked_run(settings.tracking, "evaluate", tags, parent_run_id=parent_run_id or None) as run:
        if run is not None:
            metrics: dict[str, float] = {
                "kl": summary["kl"],
                **({} if summary["kl_to_pi0"] is None else {"kl_to_pi0": summary["kl_to_pi0"]}),
                "gate_admitted": float(summary["gate"]["admitted"]),
            }
            for label, values in summary["policies"].items():
                metrics |= {f"{label}_{k}": v["mean"] for k, v in values.items() if v["mean"] is not None}
            for name, gain in summary["gain"].items():
                metrics |= {f"gain_{name}": gain["mean"], f"gain_{name}_lo": gain["ci"][0]}
            run.log_metrics(metrics)
            run.log_params(settings.gate.model_dump())
            run.log_artifacts(out, "evaluation")
            summary["mlflow_run_id"] = run.run_id
            (out / EVALUATION_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
