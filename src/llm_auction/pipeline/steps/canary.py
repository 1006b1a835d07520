"""Step 0: the running canary's verdict on live traffic, carried out in the registry and on the endpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from llm_auction.config import Settings
from llm_auction.evaluation.canary import (
    CHALLENGER,
    CHAMPION,
    CanaryDecision,
    canary_outcomes,
    card_section,
    trajectory,
)
from llm_auction.evaluation.canary import decide as decide_canary
from llm_auction.evaluation.report import plot_canary
from llm_auction.pipeline.steps.common import finite_metrics, settings_from
from llm_auction.public.feedback import read_kind
from llm_auction.serving.rollout import end_canary
from llm_auction.tracking import registry
from llm_auction.tracking.runs import lineage_tags, tracked_run

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


def start_policy(settings: Settings, policy_uri: str = "") -> dict[str, str]:
    """What this epoch improves and what its candidate must beat, read once the canary's verdict is
    carried out: `policy_uri` (pi_{t-1}, DPO's reference and the KL's) is the given URI, else, by
    `irpo.start_policy`, the `head` version or the champion; `champion_uri` is the champion.
    """
    name = settings.irpo.registered_model
    champion = f"models:/{name}@{registry.CHAMPION}"
    head = None
    if not policy_uri and settings.irpo.start_policy == "head":
        head = registry.alias_version(settings.tracking, name, registry.HEAD)
    start = policy_uri or (f"models:/{name}/{head}" if head else champion)
    return {"policy_uri": start, "champion_uri": champion}


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
