"""The irpo-epoch steps: strings and paths in, a JSON-able summary out; each calls the library directly.

KFP components (`components/`) are thin wrappers over these, so the same code runs in a pod on the
cluster, in a `kfp.local` subprocess, and in a test: component -> step -> library, nothing between.
The settings travel between steps as the JSON that `resolve_settings` validated once at the start.

Every step reads only the public side: the platform's exports (`Settings.public_dir`: catalog,
profiles, held-out and synthetic request files), the feedback store (request log, impressions,
clicks), the feature store and the registry. Nothing here imports the simulator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from llm_auction.config import Settings, load_config
from llm_auction.errors import LaunchError
from llm_auction.evaluation.canary import (
    CHALLENGER,
    CHAMPION,
    CanaryDecision,
    canary_outcomes,
    card_section,
    trajectory,
)
from llm_auction.evaluation.canary import decide as decide_canary
from llm_auction.evaluation.candidate import (
    EVALUATION_FILE,
    CandidateEvaluation,
    epoch_history,
    evaluate_candidate,
    review_card,
    write_evaluation_report,
)
from llm_auction.evaluation.gate import Check, GateInputs, decide
from llm_auction.evaluation.report import plot_canary
from llm_auction.features.encoder import encoder_for
from llm_auction.features.ingest import IngestReport, ingest_window, labeled_impressions
from llm_auction.features.retrieval import pctr_inputs, training_frame
from llm_auction.features.store import open_store
from llm_auction.irpo.dpo import file_digest
from llm_auction.irpo.dpo import train_dpo as run_dpo_training
from llm_auction.irpo.launch import run_torchrun
from llm_auction.irpo.pairs import PAIRS_FILE, SAMPLES_FILE, STATS_FILE, read_pairs
from llm_auction.irpo.sampling import build_preference_set, prompt_requests
from llm_auction.irpo.trainjob import run_trainjob
from llm_auction.policy.generation import make_generator
from llm_auction.public.catalog import HELD_OUT_FILE, SYNTHETIC_FILE, Catalog, read_requests
from llm_auction.public.feedback import logged_requests, read_kind
from llm_auction.reward.scorer import feast_reward_scorer
from llm_auction.reward.training import train_and_register
from llm_auction.serving.rollout import end_canary, start_canary
from llm_auction.tracking import registry
from llm_auction.tracking.registry import register_version, resolve_model
from llm_auction.tracking.runs import lineage_tags, mlflow_client, open_run, tracked_run

logger = logging.getLogger(__name__)


def resolve_settings(profile: str, config_path: str = "", overrides_yaml: str = "") -> str:
    """Validate the run's configuration once; every later step reads the JSON this returns."""
    overrides = yaml.safe_load(overrides_yaml) if overrides_yaml.strip() else {}
    path = Path(config_path) if config_path else None
    return load_config(path, profile or None, overrides=overrides).model_dump_json()


def finite_metrics(values: Mapping[str, Any], keys: tuple[str, ...] | None = None) -> dict[str, float]:
    """What KFP's Metrics artifact can hold: finite numbers; NaN (e.g. no logged loss) is left out."""
    chosen = values if keys is None else {k: values[k] for k in keys if k in values}
    return {
        k: float(v)
        for k, v in chosen.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def settings_from(settings_json: str) -> Settings:
    return Settings.model_validate_json(settings_json)


def start_epoch(settings_json: str, epoch: int, run_name: str = "") -> str:
    """The epoch's parent MLflow run, left RUNNING until the gate step (or a failing step) ends it."""
    settings = settings_from(settings_json)
    if settings.tracking.uri is None:
        return ""
    return open_run(settings.tracking, run_name or f"irpo-epoch-{epoch}", {"llm_auction.epoch": epoch}).run_id


def finish_epoch(settings_json: str, parent_run_id: str, status: str, tags: Mapping[str, Any]) -> None:
    settings = settings_from(settings_json)
    if not parent_run_id or settings.tracking.uri is None:
        return
    client = mlflow_client(settings.tracking)
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, str(value))
    client.set_terminated(parent_run_id, status=status)


@contextmanager
def failing_epoch(settings_json: str, parent_run_id: str) -> Iterator[None]:
    """A step that raises marks the epoch's parent run FAILED before the error reaches KFP."""
    try:
        yield
    except BaseException as exc:
        try:
            finish_epoch(
                settings_json, parent_run_id, "FAILED", {"llm_auction.error": f"{type(exc).__name__}: {exc}"}
            )
        except Exception as tracking_exc:  # the tracking server down too: the step's own error wins
            logger.warning("epoch run %s not marked FAILED: %s", parent_run_id, tracking_exc)
        raise


def resolve_window(window_start: str, window_end: str, hours: float) -> tuple[str, str]:
    """The feedback window; a scheduled run passes only its end (`[[ScheduledTime]]`): start = end - hours."""
    end = pd.Timestamp(window_end) if window_end else pd.Timestamp.now(tz="UTC")
    end = end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")
    start = pd.Timestamp(window_start) if window_start else end - pd.Timedelta(hours=hours)
    start = start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")
    return start.isoformat(), end.isoformat()


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain process: the one that logs, saves and registers."""
    return int(os.environ.get("RANK", "0")) == 0


def ingest(
    settings_json: str, feedback_dir: str, window_start: str, window_end: str, parent_run_id: str
) -> dict:
    """Step 1: the feedback window into Feast (validated, labeled, statistics, materialized).

    Users and ads come from the platform's catalog export, never from anywhere else.
    """
    settings = settings_from(settings_json)
    window_start, window_end = resolve_window(window_start, window_end, settings.features.window_hours)
    if not Path(feedback_dir).is_dir():
        raise FileNotFoundError(f"feedback_dir {feedback_dir}: not a folder")
    catalog = Catalog.load(settings.public_dir)
    encoder = encoder_for(settings)
    report: IngestReport = ingest_window(
        open_store(settings),
        settings,
        Path(feedback_dir),
        catalog.users,
        catalog.ads,
        window_start,
        window_end,
        encoder,
    )
    encoder.flush()
    summary = json.loads(json.dumps(dataclasses.asdict(report), default=str))
    with tracked_run(
        settings.tracking, "ingest", {"llm_auction.step": "ingest"}, parent_run_id or None
    ) as run:
        if run is not None:
            run.log_params({"window": report.window, "feedback_dir": feedback_dir})
            run.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
    return summary


def train_pctr(
    settings_json: str, out_dir: str, window_start: str, window_end: str, epoch: int, parent_run_id: str
) -> dict:
    """Step 2: psi_t on the point-in-time training set of every impression before the window's end."""
    settings = settings_from(settings_json)
    window_start, window_end = resolve_window(window_start, window_end, settings.features.window_hours)
    labeled = labeled_impressions(settings, None, window_end)
    if labeled.empty:
        raise ValueError(f"window {window_start}/{window_end}: no labeled impressions to train the pCTR on")
    frame = pctr_inputs(training_frame(open_store(settings), labeled, settings.features))
    encoder = encoder_for(settings)
    lineage = {"epoch": epoch, "window": f"{window_start}/{window_end}", "parent_run_id": parent_run_id}
    _, card = train_and_register(settings, frame, encoder, Path(out_dir), lineage)
    encoder.flush()
    return card


def build_preferences(
    settings_json: str,
    policy_uri: str,
    pctr_dir: str,
    feedback_dir: str,
    window_start: str,
    window_end: str,
    out_dir: str,
    epoch: int,
    parent_run_id: str,
) -> dict:
    """Step 3: M samples per prompt from pi_{t-1}, scored by R under psi_t, paired.

    The prompts are the requests the server logged in the window (`irpo.prompt_source: online`),
    the public synthetic-request file, or both; user and ad features come from Feast's online
    store, as they would for a live request.
    """
    settings = settings_from(settings_json)
    cfg = settings.irpo
    start, end = resolve_window(window_start, window_end, settings.features.window_hours)
    online = (
        logged_requests(Path(feedback_dir), pd.Timestamp(start), pd.Timestamp(end)) if feedback_dir else []
    )
    synthetic_path = settings.public_dir / SYNTHETIC_FILE
    synthetic = (
        read_requests(synthetic_path, settings.mechanism.max_bid)
        if cfg.prompt_source != "online" or not online
        else []
    )
    profiles = Catalog.load(settings.public_dir).profiles()
    rng = np.random.default_rng([settings.seed, 11, epoch])
    requests = prompt_requests(online, synthetic, cfg, rng)
    if not requests:
        raise ValueError(f"window {start}/{end}: no logged requests and no synthetic requests to prompt with")
    lineage = {"epoch": epoch, "policy": policy_uri, "parent_run_id": parent_run_id}
    scorer = feast_reward_scorer(settings, Path(pctr_dir))
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        policy_dir = resolve_model(settings.tracking, policy_uri, Path(scratch))
        generator = make_generator(settings.policy.generation, policy_dir)
        result = build_preference_set(generator, scorer, requests, profiles, cfg, int(rng.integers(2**31)))
    scorer.flush()
    out.mkdir(parents=True, exist_ok=True)
    result.pairs.to_parquet(out / PAIRS_FILE, index=False)
    result.samples.to_parquet(out / SAMPLES_FILE, index=False)
    stats = {
        **result.stats,
        "prompts_online": len({r.request_id for r in requests} & {r.request_id for r in online}),
        "policy": policy_uri,
        "pctr": pctr_dir,
        "pairs_sha256": file_digest(out / PAIRS_FILE),
        "lineage": lineage,
    }
    (out / STATS_FILE).write_text(json.dumps(stats, indent=2, default=str) + "\n")
    tags = lineage_tags("build_preferences", lineage)
    with tracked_run(settings.tracking, "irpo-pairs", tags, parent_run_id=parent_run_id or None) as run:
        if run is not None:
            params = cfg.model_dump(exclude={"dpo", "distributed"})
            run.log_params({"policy": policy_uri, "pctr": pctr_dir, **params})
            run.log_metrics({k: v for k, v in result.stats.items() if isinstance(v, float)})
            run.log_artifacts(out, "pairs")
            stats["mlflow_run_id"] = run.run_id
    return stats


def _dpo_args(
    policy: Path, pairs: str, out: Path, epoch: int, lineage: Mapping[str, str], config: Path
) -> list[str]:
    return [
        "--policy", str(policy), "--pairs", pairs, "--out", str(out), "--epoch", str(epoch),
        "--pctr-version", lineage["pctr_version"], "--parent-run-id", lineage["parent_run_id"],
        "--settings-json", str(config),
    ]  # fmt: skip


def train_dpo(
    settings_json: str,
    policy_uri: str,
    pairs_dir: str,
    out_dir: str,
    epoch: int,
    pctr_version: str,
    parent_run_id: str,
) -> dict:
    """Step 4: DPO of pi_{t-1} -> pi_t, in this process, under torchrun, or as a TrainJob (N nodes).

    A TrainJob's nodes share only the workspace volume, so its inputs and output live there.
    """
    settings = settings_from(settings_json)
    dist = settings.irpo.distributed
    lineage = {"pctr_version": pctr_version, "parent_run_id": parent_run_id}
    work = (
        Path(dist.workspace_mount) / "irpo" / f"epoch-{epoch}" if dist.num_nodes > 1 else Path(out_dir).parent
    )
    policy = resolve_model(settings.tracking, policy_uri, work / "reference")
    config = work / "settings.json"
    if dist.num_nodes > 1 or dist.nproc_per_node > 1:
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(settings_json)
    if dist.num_nodes > 1:
        staged = work / "pairs"
        shutil.copytree(pairs_dir, staged, dirs_exist_ok=True)
        result = work / "policy"
        run_trainjob(
            settings,
            f"irpo-dpo-epoch-{epoch}",
            _dpo_args(policy, str(staged), result, epoch, lineage, config),
        )
        shutil.copytree(result, out_dir, dirs_exist_ok=True)
    elif dist.nproc_per_node > 1:
        args = ["irpo", "dpo", *_dpo_args(policy, pairs_dir, Path(out_dir), epoch, lineage, config)]
        run_torchrun(dist.nproc_per_node, args)
    else:
        dpo_step(settings, policy, Path(pairs_dir), Path(out_dir), {"epoch": epoch, **lineage})
    card_path = Path(out_dir) / "policy_card.json"
    if not card_path.is_file():
        raise LaunchError(f"DPO finished without writing {card_path}")
    card = json.loads(card_path.read_text())
    return {
        "registered_version": card.get("registered_version") or "",
        "dpo": card.get("dpo", {}),
        "reference": str(policy),
    }


def dpo_step(
    settings: Settings,
    policy_dir: Path,
    pairs_path: Path,
    out_dir: Path,
    lineage: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """DPO of pi_{t-1} on the pairs -> pi_t; rank 0 logs to MLflow and registers the new policy version.

    Lineage (epoch, pCTR version, pipeline run, ...) goes into the run's and the version's tags,
    beside the pair set's digest and the parent policy.
    """
    pairs = read_pairs(pairs_path)
    pairs_file = pairs_path / PAIRS_FILE if pairs_path.is_dir() else pairs_path
    lineage = {
        "pairs": str(pairs_file),
        "pairs_sha256": file_digest(pairs_file),
        "parent": str(policy_dir),
        **(lineage or {}),
    }
    tags = lineage_tags("train_dpo", lineage)
    main = is_main_process()
    parent = lineage.get("parent_run_id")
    run_context = (
        tracked_run(settings.tracking, "irpo-dpo", tags, parent_run_id=parent)
        if main
        else contextlib.nullcontext()
    )
    with run_context as run:
        log = (lambda metrics, step: run.log_metrics(metrics, step=step)) if run is not None else None
        summary = run_dpo_training(settings, policy_dir, pairs, out_dir, log, max_steps)
        if run is not None:
            run.log_params(
                {
                    "seed": settings.seed,
                    **settings.irpo.dpo.model_dump(),
                    **{f"lora_{k}": v for k, v in settings.policy.lora.model_dump().items()},
                    **{f"distributed_{k}": v for k, v in settings.irpo.distributed.model_dump().items()},
                }
            )
            run.log_metrics({f"final_{k}": summary[k] for k in ("train_loss", "seconds", "steps")})
            run.log_artifacts(out_dir, "policy")
            summary["mlflow_run_id"] = run.run_id
            summary["registered_version"] = register_version(
                settings.tracking,
                settings.irpo.registered_model,
                run.run_id,
                "policy",
                tags=tags,
                description=(
                    f"IRPO policy from {policy_dir.name}: DPO on {summary['pairs']} pairs of "
                    f"{summary['prompts']} prompts, final loss {summary['last_loss']:.4f}"
                ),
            )
    if main:
        card_path = out_dir / "policy_card.json"
        card = json.loads(card_path.read_text())
        card["lineage"] = lineage
        card["mlflow_run_id"] = summary.get("mlflow_run_id")
        card["registered_version"] = summary.get("registered_version")
        card_path.write_text(json.dumps(card, indent=2, default=str) + "\n")
    return summary


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
    candidate's DPO reference, which in the pipeline is the champion (the default).
    """
    settings = settings_from(settings_json)
    requests = read_requests(settings.public_dir / HELD_OUT_FILE, settings.mechanism.max_bid)
    profiles = Catalog.load(settings.public_dir).profiles()
    lineage = {"epoch": epoch, "candidate_version": version, "parent_run_id": parent_run_id}
    scorer = feast_reward_scorer(settings, Path(pctr_dir))
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        champion = resolve_model(settings.tracking, champion_policy_uri, Path(scratch) / "champion")
        reference = (
            resolve_model(settings.tracking, reference_policy_uri, Path(scratch) / "reference")
            if reference_policy_uri
            else champion
        )
        evaluation: CandidateEvaluation = evaluate_candidate(
            settings, requests, profiles, Path(candidate_dir), champion, reference, scorer
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


def gate(settings_json: str, evaluation_dir: str, version: str, parent_run_id: str) -> dict:
    """Step 6: card and tags on the version; `challenger` (the canary) when the offline gate admits it.

    Both branches of the pipeline's `dsl.If` end here: a held candidate is recorded just the same.
    """
    settings = settings_from(settings_json)
    summary = json.loads((Path(evaluation_dir) / EVALUATION_FILE).read_text())
    decision = gate_step(settings, summary, version)
    finish_epoch(settings_json, parent_run_id, "FINISHED", {"llm_auction.admitted": decision["admitted"]})
    return decision


def gate_step(
    settings: Settings, summary: Mapping[str, Any], candidate_version: str, who: str = "irpo-pipeline"
) -> dict[str, Any]:
    """Tag the candidate version with its card and, if the offline gate admits it, make it the
    challenger: it enters the canary, where live traffic decides its promotion (`canary`).

    One canary at a time: while another challenger is still in canary the candidate is held.
    """
    name = settings.irpo.registered_model
    inputs = dict(summary["gate_inputs"])
    inputs["gain_ci"] = tuple(inputs["gain_ci"])
    offline = decide(GateInputs(**inputs), settings.gate)
    running = registry.alias_version(settings.tracking, name, registry.CHALLENGER)
    busy = running is not None and running != candidate_version
    slot = Check(
        "canary slot free", 0.0 if busy else 1.0, ">", 0.0, not busy, f"v{running} in canary" if busy else ""
    )
    decision = dataclasses.replace(offline, admit=offline.admit and not busy, checks=[*offline.checks, slot])
    run_id = summary.get("mlflow_run_id")
    links = (
        {
            "report": f"runs:/{run_id}/evaluation/report.html",
            "plot": f"runs:/{run_id}/evaluation/comparison.png",
        }
        if run_id
        else None
    )
    card = review_card({**summary, "gate": decision.to_dict()}, f"{name} v{candidate_version}", links)
    candidate = summary["policies"]["candidate"]
    tags = {
        **{f"lineage.{k}": v for k, v in summary.get("lineage", {}).items()},
        "gate.admitted": str(decision.admit).lower(),
        "gate.failed": ",".join(decision.failed) or "none",
        "metric.kl": round(summary["kl"], 5),
        **{
            f"metric.gain_{k}": round(g["mean"], 5)
            for k, g in summary["gain"].items()
            if g["mean"] is not None
        },
        **{f"metric.{k}": round(v["mean"], 5) for k, v in candidate.items() if v["mean"] is not None},
    }
    registry.annotate_version(settings.tracking, name, candidate_version, tags, description=card)
    if decision.admit:
        registry.enter_canary(settings.tracking, name, candidate_version, who)
    return decision.to_dict()


def deploy(settings_json: str, version: str) -> dict:
    """Start the admitted candidate's canary on the endpoint (local record, or its own predictor)."""
    return start_canary(settings_from(settings_json), version)


CANARY_FILE, CANARY_PLOT = "canary.json", "canary.png"


def read_logs(feedback: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The feedback store's request log, impressions and clicks."""
    return tuple(read_kind(feedback, kind) for kind in ("requests", "impressions", "clicks"))  # type: ignore[return-value]


def canary_status(
    settings: Settings,
    frames: Callable[[], tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]],
    window_end: str = "",
    end: bool = False,
) -> tuple[dict[str, Any], CanaryDecision | None, pd.DataFrame]:
    """The running canary's verdict on the logs `frames()` reads (request log, impressions,
    clicks), changing nothing; without a challenger nothing is read.

    Only the traffic since the challenger entered the canary counts, each arm's rows answered by
    the version the registry names for it. In manual mode a promotion waits for `approved=true`.
    """
    name, tracking = settings.irpo.registered_model, settings.tracking
    champion = registry.alias_version(tracking, name, registry.CHAMPION)
    challenger = registry.alias_version(tracking, name, registry.CHALLENGER)
    result: dict[str, Any] = {"champion": champion, "challenger": challenger}
    if challenger is None or challenger == champion:
        return result | {"decision": "none", "reason": "no challenger in canary"}, None, pd.DataFrame()
    started = registry.canary_started_at(tracking, name, challenger)
    outcomes = canary_outcomes(
        *frames(),
        start=None if started is None else pd.Timestamp(started),
        end=pd.Timestamp(window_end) if window_end else None,
    )
    expected = outcomes["arm"].map({CHAMPION: champion, CHALLENGER: challenger})
    outcomes = outcomes[outcomes["policy_version"] == expected].reset_index(drop=True)
    m = settings.mechanism
    decision = decide_canary(
        outcomes, settings.gate.canary, settings.gate.itctr_margin, m.bootstrap_samples, m.ci_level, end
    )
    verdict, reason = decision.decision, decision.reason
    if verdict == "promote" and settings.gate.mode == "manual":
        if not registry.is_approved(tracking, name, challenger):
            verdict, reason = "awaiting approval", f"{reason}; waiting for the registry tag approved=true"
    result |= {
        **decision.to_dict(),
        "decision": verdict,
        "reason": reason,
        "started_at": None if started is None else started.isoformat(),
        "window_end": window_end,
    }
    return result, decision, outcomes


def canary(
    settings_json: str,
    feedback_dir: str,
    window_end: str,
    out_dir: str,
    parent_run_id: str = "",
    end: bool = False,
    who: str = "irpo-pipeline",
) -> dict:
    """Step 0: the running canary's verdict on the traffic logged since it started (`canary_status`),
    carried out: promote (the `champion` alias moves, serving follows), roll back or end it
    inconclusive (the challenger is removed, the reason kept on its version), or keep collecting.

    `end`: no more traffic comes to this canary, so a missing verdict is inconclusive.
    """
    settings = settings_from(settings_json)
    name, tracking = settings.irpo.registered_model, settings.tracking
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result, decision, outcomes = canary_status(
        settings, lambda: read_logs(Path(feedback_dir)), window_end, end
    )
    if decision is None:
        (out / CANARY_FILE).write_text(json.dumps(result, indent=2) + "\n")
        return result
    verdict, reason, champion, challenger = (
        result["decision"], result["reason"], result["champion"], result["challenger"],
    )  # fmt: skip
    if verdict in ("promote", "rollback", "inconclusive"):
        numbers = {
            "requests": decision.requests,
            "revenue_difference": round(decision.revenue_difference.mean, 6),
            "revenue_difference_lo": round(decision.revenue_difference.lo, 6),
        }
        card = card_section(decision, verdict, reason, champion, challenger)
        registry.end_canary(tracking, name, challenger, verdict, reason, who, numbers, card)
        result["rollout"] = end_canary(settings, challenger, verdict)
    if len(outcomes):
        path = trajectory(outcomes, settings.gate.canary, settings.gate.itctr_margin)
        plot_canary(path, out / CANARY_PLOT, f"canary v{challenger} vs v{champion}: {verdict}")
    (out / CANARY_FILE).write_text(json.dumps(result, indent=2, default=str) + "\n")
    tags = lineage_tags("canary", {"challenger": challenger, "champion": champion})
    with tracked_run(tracking, "canary", tags, parent_run_id=parent_run_id or None) as run:
        if run is not None:
            arms = decision.arms
            run.log_metrics(
                {
                    "requests": decision.requests,
                    **finite_metrics(
                        {
                            f"{arm}_{k}": getattr(arms[arm], k).mean
                            for arm in arms
                            for k in ("revenue", "itctr", "ad_load")
                        }
                    ),
                    **finite_metrics({"revenue_difference_lo": decision.revenue_difference.lo}),
                }
            )
            run.set_tags({"canary.decision": verdict})
            run.log_artifacts(out, "canary")
    return result
