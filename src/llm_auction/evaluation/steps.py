"""Steps 5 and 6 of an IRPO epoch: evaluate the candidate, then gate it through the registry."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm_auction.baselines import make_baseline
from llm_auction.config import Settings
from llm_auction.errors import RegistryError
from llm_auction.evaluation.gate import GateDecision, GateInputs, decide
from llm_auction.evaluation.offline import evaluate_allocator
from llm_auction.irpo.sampling import Scorer, feast_reward_scorer
from llm_auction.mechanism.audits import audit_individual_rationality, audit_monotonicity
from llm_auction.mechanism.metrics import bootstrap, per_request_outcomes
from llm_auction.simulator.experiment import Environment, split_requests, user_profiles
from llm_auction.tracking import registry
from llm_auction.tracking.runs import lineage_tags, tracked_run

logger = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
BASELINES = ("pre_generation", "post_generation")
CARD_METRICS = ("reward", "revenue", "social_welfare", "itctr", "ad_load", "format_error_rate")


def _policy(directory: Path, env: Environment, name: str):  # noqa: ANN202
    from llm_auction.policy.allocator import LLMPolicy
    from llm_auction.policy.generation import make_generator

    return LLMPolicy(
        make_generator(env.settings.policy.generation, directory), user_profiles(env.world), name
    )


def _fmt(estimate: Mapping[str, Any]) -> str:
    if estimate.get("mean") is None:
        return "n/a"
    lo, hi = estimate["ci"]
    return f"{estimate['mean']:.4f} [{lo:.4f}, {hi:.4f}]"


def drift_kl(
    candidate_dir: Path, reference_dir: Path, prompts: Sequence[str], responses: Sequence[str]
) -> float:
    """KL(candidate || reference) in nats per response, Monte Carlo over the candidate's own samples."""
    from llm_auction.policy.likelihood import response_logprobs
    from llm_auction.policy.model import load_policy

    candidate = response_logprobs(*load_policy(candidate_dir), prompts, responses)
    reference = response_logprobs(*load_policy(reference_dir), prompts, responses)
    return float(np.mean(candidate - reference))


def evaluate_candidate(
    env: Environment,
    candidate_dir: Path,
    champion_dir: Path,
    reference_dir: Path,
    scorer: Scorer,
    baselines: Sequence[str] = BASELINES,
) -> dict[str, Any]:
    """Candidate vs champion vs baselines on the held-out requests, the audits, drift, and the gate.

    Candidate and champion are compared on the same requests: the gain is the bootstrap of the
    per-request difference (paired), which is tighter than two separate intervals.
    """
    from llm_auction.policy.allocator import prompts_for

    settings = env.settings
    m = settings.mechanism
    _, held_out = split_requests(env)
    seed = settings.seed
    candidate = _policy(candidate_dir, env, "candidate")
    results, rows = {}, {}
    for label, allocator in [
        ("candidate", candidate),
        ("champion", _policy(champion_dir, env, "champion")),
        *[(name, make_baseline(name, settings, env.ground_truth)) for name in baselines],
    ]:
        results[label], rows[label] = evaluate_allocator(env, allocator, held_out, seed, scorer)
    rewards = {k: results[k].requests["reward"].to_numpy() for k in ("candidate", "champion")}
    revenue = {
        k: per_request_outcomes(results[k].requests, results[k].impressions, "expected_ctr")[
            "payment"
        ].to_numpy()
        for k in ("candidate", "champion")
    }
    rng = np.random.default_rng([seed, 21])
    gains = {
        "reward": bootstrap(
            rewards["candidate"] - rewards["champion"], None, m.bootstrap_samples, m.ci_level, rng
        ),
        "revenue": bootstrap(
            revenue["candidate"] - revenue["champion"], None, m.bootstrap_samples, m.ci_level, rng
        ),
    }
    prompts = prompts_for(held_out, user_profiles(env.world))
    kl = drift_kl(candidate_dir, reference_dir, prompts, results["candidate"].requests["response"].tolist())
    audit = audit_monotonicity(
        candidate,
        held_out[: settings.gate.audit_requests],
        env.ground_truth,
        m.monotonicity_factors,
        n_samples=m.monotonicity_samples,
        seed=seed,
        max_ads=m.max_ads,
    )
    ir = audit_individual_rationality(results["candidate"].impressions)
    gain = gains[settings.gate.gain_metric]
    inputs = GateInputs(
        gain_mean=gain.mean,
        gain_ci=gain.ci,
        candidate_itctr=rows["candidate"]["itctr"].mean,
        champion_itctr=None if np.isnan(rows["champion"]["itctr"].mean) else rows["champion"]["itctr"].mean,
        ad_load=rows["candidate"]["ad_load"].mean,
        format_error_rate=rows["candidate"]["format_error_rate"].mean,
        kl=kl,
        monotonicity_violation_rate=audit.violation_rate,
    )
    decision = decide(inputs, settings.gate)
    return {
        "gate_inputs": dataclasses.asdict(inputs),
        "requests": len(held_out),
        "seed": seed,
        "candidate": str(candidate_dir),
        "champion": str(champion_dir),
        "reference": str(reference_dir),
        "policies": {label: {k: v.to_dict() for k, v in metrics.items()} for label, metrics in rows.items()},
        "gain": {name: {"metric": name, **estimate.to_dict()} for name, estimate in gains.items()},
        "kl": kl,
        "monotonicity": {
            "requests": min(settings.gate.audit_requests, len(held_out)),
            "n_checks": audit.n_checks,
            "violations": len(audit.violations),
            "violation_rate": audit.violation_rate,
        },
        "ir": {"holds": ir.holds, "n_overcharged": ir.n_overcharged, "n_impressions": ir.n_impressions},
        "gate": decision.to_dict(),
    }


def review_card(summary: Mapping[str, Any], title: str, links: Mapping[str, str] | None = None) -> str:
    """The version's description in the registry: candidate vs champion vs baselines, and the gate."""
    policies = summary["policies"]
    lines = [
        f"## {title}",
        "",
        "| policy | " + " | ".join(CARD_METRICS) + " |",
        "|---" * (len(CARD_METRICS) + 1) + "|",
    ]
    for label, metrics in policies.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(metrics.get(k, {})) for k in CARD_METRICS) + " |")
    gain, audit = summary["gain"], summary["monotonicity"]
    lines += [
        "",
        f"Paired gain over the champion on {summary['requests']} held-out requests: "
        f"reward {_fmt(gain['reward'])}, oracle revenue {_fmt(gain['revenue'])}. "
        f"Drift KL(candidate || reference) = {summary['kl']:.3f} nats per response; "
        f"monotonicity violations {audit['violations']} of {audit['n_checks']}; "
        f"IR {'holds' if summary['ir']['holds'] else 'violated'}.",
        "",
        f"**Gate ({summary['gate']['mode']}): {'PROMOTE' if summary['gate']['promoted'] else 'HOLD'}** "
        f"— {summary['gate']['reason']}",
        "",
        "| check | value | bound | result |",
        "|---|---|---|---|",
    ]
    for check in summary["gate"]["checks"]:
        verdict = "pass" if check["passed"] else "fail"
        lines.append(
            f"| {check['name']} | {check['value']:.4g} | {check['op']} {check['bound']:.4g} | {verdict} |"
        )
    if links:
        lines += ["", " · ".join(f"[{name}]({url})" for name, url in links.items())]
    return "\n".join(lines) + "\n"


def epoch_history(settings: Settings, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Metrics by IRPO epoch: earlier gated versions from the registry's tags, then this candidate.

    The champion stands for the epoch before when the registry has no gated version yet.
    """
    name = settings.irpo.registered_model
    epoch = int(summary.get("lineage", {}).get("epoch", 1))
    policies = summary["policies"]
    baselines = {b: policies[b] for b in BASELINES if b in policies}
    versions = []
    if settings.tracking.uri is not None:
        try:
            versions = registry.show(settings.tracking, name)["versions"]
        except RegistryError:
            versions = []
    history = []
    for version in reversed(versions):
        tags = version["tags"]
        if "gate.promote" in tags and int(tags.get("lineage.epoch", epoch)) < epoch:
            metrics = {
                k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")
            }
            history.append(
                {
                    "epoch": int(tags["lineage.epoch"]),
                    "policy_version": version["version"],
                    "policy": {k: {"mean": v, "ci": [None, None]} for k, v in metrics.items()},
                    "baselines": {},
                }
            )
    if not history:
        history.append(
            {
                "epoch": epoch - 1,
                "policy_version": "champion",
                "policy": policies["champion"],
                "baselines": {},
            }
        )
    return [
        *history,
        {
            "epoch": epoch,
            "policy_version": "candidate",
            "policy": policies["candidate"],
            "baselines": baselines,
        },
    ]


def write_evaluation_report(
    summary: Mapping[str, Any], out_dir: Path, history: Sequence[Mapping[str, Any]] = ()
) -> list[Path]:
    """evaluation.json, comparison.png, epochs.png (with a history) and report.html in `out_dir`."""
    from llm_auction.evaluation.report import plot_comparison, plot_epoch_curves, write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EVALUATION_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    image = plot_comparison(summary["policies"], out_dir / "comparison.png")
    images = [image]
    if history:
        images.append(plot_epoch_curves(list(history), out_dir / "epochs.png"))
    header = ["policy", *CARD_METRICS]
    table = [[label, *(_fmt(m.get(k, {})) for k in CARD_METRICS)] for label, m in summary["policies"].items()]
    checks = [
        [c["name"], f"{c['value']:.4g}", f"{c['op']} {c['bound']:.4g}", "pass" if c["passed"] else "fail"]
        for c in summary["gate"]["checks"]
    ]
    report = write_report(
        out_dir,
        f"Candidate evaluation: {'promote' if summary['gate']['promoted'] else 'hold'}",
        {
            "held-out requests": str(summary["requests"]),
            "reward gain": _fmt(summary["gain"]["reward"]),
            "oracle revenue gain": _fmt(summary["gain"]["revenue"]),
            "KL to reference": f"{summary['kl']:.4f}",
            "gate": summary["gate"]["reason"],
        },
        {"policies": (header, table), "gate checks": (["check", "value", "bound", "result"], checks)},
        images,
    )
    return [out_dir / EVALUATION_FILE, *images, report]


def evaluate_step(
    env: Environment,
    candidate_dir: Path,
    champion_dir: Path,
    reference_dir: Path,
    pctr_dir: Path,
    out_dir: Path,
    lineage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate, write the report, log it all to MLflow (child run `evaluate`)."""
    scorer = feast_reward_scorer(env.settings, pctr_dir)
    summary = evaluate_candidate(env, candidate_dir, champion_dir, reference_dir, scorer)
    summary["lineage"] = dict(lineage or {})
    write_evaluation_report(summary, out_dir, epoch_history(env.settings, summary))
    tags = lineage_tags("evaluate", lineage or {})
    parent = (lineage or {}).get("parent_run_id")
    with tracked_run(env.settings.tracking, "evaluate", tags, parent_run_id=parent) as run:
        if run is not None:
            metrics: dict[str, float] = {
                "kl": summary["kl"],
                "gate_promote": float(summary["gate"]["promoted"]),
            }
            for label, values in summary["policies"].items():
                metrics |= {f"{label}_{k}": v["mean"] for k, v in values.items() if v["mean"] is not None}
            for name, gain in summary["gain"].items():
                metrics |= {f"gain_{name}": gain["mean"], f"gain_{name}_lo": gain["ci"][0]}
            run.log_metrics(metrics)
            run.log_params(env.settings.gate.model_dump())
            run.log_artifacts(out_dir, "evaluation")
            summary["mlflow_run_id"] = run.run_id
            (out_dir / EVALUATION_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def gate_step(
    settings: Settings, summary: Mapping[str, Any], candidate_version: str, who: str = "irpo-pipeline"
) -> GateDecision:
    """Tag the candidate version with its card, make it the challenger, and promote it if the gate says so.

    In manual mode the decision is taken again with the version's `approved` tag, so a reviewer's
    `registry approve` followed by a re-run of this step promotes.
    """
    name = settings.irpo.registered_model
    inputs = dict(summary["gate_inputs"])
    inputs["gain_ci"] = tuple(inputs["gain_ci"])
    manual = settings.gate.mode == "manual"
    approved = registry.is_approved(settings.tracking, name, candidate_version) if manual else None
    decision = decide(GateInputs(**inputs), settings.gate, approved)
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
        "gate.promote": str(decision.promote).lower(),
        "gate.mode": decision.mode,
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
    if registry.alias_version(settings.tracking, name, registry.CHAMPION) != candidate_version:
        registry.set_alias(settings.tracking, name, registry.CHALLENGER, candidate_version)
    if decision.promote:
        registry.promote(settings.tracking, name, candidate_version, who, decision.reason)
    return decision
