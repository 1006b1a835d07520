"""The candidate's review card in the registry, and the name of the evaluation summary's file.

Light on purpose (no torch, no Feast): the gate step, which only reads a summary and writes tags,
imports this and not the evaluation itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

EVALUATION_FILE = "evaluation.json"
REWARD_MODEL_METRICS = ("reward", "revenue", "itctr", "ad_load", "fill_rate", "format_error_rate")
"""Metric names of the reward model's side; `revenue` and `itctr` are psi's estimates here."""
CARD_METRICS = REWARD_MODEL_METRICS


def format_estimate(estimate: Mapping[str, Any]) -> str:
    """An estimate as `mean [lo, hi]`, or n/a."""
    if estimate.get("mean") is None:
        return "n/a"
    lo, hi = estimate["ci"]
    return f"{estimate['mean']:.4f} [{lo:.4f}, {hi:.4f}]"


def bid_response_line(monotonicity: Mapping[str, Any]) -> str:
    """How an ad's insertion probability answers a doubled bid, and what the audit can see."""
    doubling, drop = monotonicity.get("bid_doubling"), monotonicity.get("detectable_drop")
    parts = [
        "doubling a bid: insertion probability "
        + ("not measured (factors lack 1 and 2)" if doubling is None else format_estimate(doubling))
    ]
    if drop is not None:
        parts.append(
            f"the audit flags falls in expected clicks above {drop:.4f} "
            f"({monotonicity.get('samples_per_level')} samples per bid level)"
        )
    return "; ".join(parts)


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
        lines.append(
            f"| {label} | " + " | ".join(format_estimate(metrics.get(k, {})) for k in CARD_METRICS) + " |"
        )
    gain, audit = summary["gain"], summary["monotonicity"]
    lines += [
        "",
        "Metrics are psi_t's estimates (the reward model's side); in simulation the closed loop's "
        "report adds the oracle metrics of the same responses.",
        "",
        f"Paired gain over the champion on {summary['requests']} held-out requests: "
        f"reward {format_estimate(gain['reward'])}, revenue under psi {format_estimate(gain['revenue'])}. "
        f"Drift KL(candidate || reference) = {summary['kl']:.3f} nats per response"
        + (
            ""
            if summary.get("kl_to_pi0") is None
            else f", KL(candidate || pi_0) = {summary['kl_to_pi0']:.3f}"
        )
        + "; "
        f"monotonicity violations under psi {audit['violations']} of {audit['n_checks']}; "
        f"{summary['ir']}.",
        "",
        f"**Offline gate: {'ENTERS THE CANARY' if summary['gate']['admitted'] else 'HOLD'}** "
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
