"""psi's promotion gate: a new pCTR version serves only if it is no worse than the champion psi.

The server prices with the pCTR model's `champion` alias, and R (the DPO reward) is what psi says,
so a psi that ranks or calibrates worse would quietly move both prices and training. `decide_pctr`
is a pure function of the two models' test metrics ON THE SAME held-out rows (the new frame's test
split, `split_by_request`) and `PCTRGateConfig`; `reward.training` measures both and moves the alias.

Rules, in order:
- no champion yet: promote ("first pCTR version"), even when the new version's metrics are not
  finite (a one-class test split gives AUC NaN): without a champion nothing is priced, and the
  reason says what could not be measured;
- the new version's AUC or ECE not finite: hold (nothing shows it is no worse);
- the champion's AUC or ECE not finite on these rows while the new one's are: promote, saying so
  (a champion that cannot be measured on current traffic is not a bar to hold to);
- otherwise hold iff AUC fell by more than `max_auc_drop` or ECE rose by more than
  `max_ece_increase` (a margin is inclusive; a tie with the champion promotes, so psi tracks
  the newest data).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from llm_auction.config import PCTRGateConfig

PROMOTE, HOLD = "promote", "hold"
_TOLERANCE = 1e-12  # float noise: a delta equal to its margin passes


@dataclass(frozen=True)
class PCTRGateDecision:
    """The verdict, its reason, and every number it rests on (NaN where not measured)."""

    decision: str
    reason: str
    candidate_auc: float
    candidate_ece: float
    champion_version: str | None
    champion_auc: float
    champion_ece: float
    auc_delta: float
    ece_delta: float
    max_auc_drop: float
    max_ece_increase: float
    n: int

    @property
    def promote(self) -> bool:
        return self.decision == PROMOTE

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "promoted": self.promote}

    def tags(self) -> dict[str, str]:
        """Registry tags of the version: the decision and the numbers, rounded for a reviewer."""

        def fmt(value: float) -> str:
            return "nan" if not math.isfinite(value) else f"{value:.4f}"

        return {
            "gate_decision": self.decision,
            "gate_reason": self.reason,
            "test_auc": fmt(self.candidate_auc),
            "test_ece": fmt(self.candidate_ece),
            "champion_version_at_gate": self.champion_version or "",
            "champion_auc_same_rows": fmt(self.champion_auc),
            "champion_ece_same_rows": fmt(self.champion_ece),
            "auc_delta": fmt(self.auc_delta),
            "ece_delta": fmt(self.ece_delta),
            "gate_max_auc_drop": str(self.max_auc_drop),
            "gate_max_ece_increase": str(self.max_ece_increase),
            "gate_rows": str(self.n),
        }


def _value(metrics: Mapping[str, Any] | None, key: str) -> float:
    if metrics is None or metrics.get(key) is None:
        return math.nan
    return float(metrics[key])


def decide_pctr(
    candidate: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    cfg: PCTRGateConfig,
    champion_version: str | None = None,
) -> PCTRGateDecision:
    """Promote or hold the new psi; `candidate` and `champion` are `pctr.evaluate` results on the
    same rows (`auc`, `ece`, `n`), `champion` None when the model has no champion yet.
    """
    c_auc, c_ece = _value(candidate, "auc"), _value(candidate, "ece")
    k_auc, k_ece = _value(champion, "auc"), _value(champion, "ece")
    auc_delta, ece_delta = c_auc - k_auc, c_ece - k_ece
    n = int(candidate.get("n", 0) or 0)
    rows = f"on the same {n} test rows"
    unmeasured = [name for name, v in (("AUC", c_auc), ("ECE", c_ece)) if not math.isfinite(v)]
    name = f"champion v{champion_version}" if champion_version else "the champion"

    if champion is None:
        decision = PROMOTE
        reason = "first pCTR version: no champion yet"
        if unmeasured:
            reason += (
                f"; its test {' and '.join(unmeasured)} is not finite ({n} test rows), promoted unmeasured"
            )
    elif unmeasured:
        decision = HOLD
        reason = (
            f"test {' and '.join(unmeasured)} not finite ({n} test rows, AUC {c_auc:.4f}, ECE {c_ece:.4f}): "
            f"nothing shows it is no worse than {name}"
        )
    elif not (math.isfinite(k_auc) and math.isfinite(k_ece)):
        decision = PROMOTE
        reason = (
            f"{name} has no finite AUC/ECE {rows} (AUC {k_auc:.4f}, ECE {k_ece:.4f}); "
            f"new AUC {c_auc:.4f}, ECE {c_ece:.4f}"
        )
    else:
        failures = []
        if auc_delta < -cfg.max_auc_drop - _TOLERANCE:
            failures.append(
                f"AUC fell {-auc_delta:.4f} ({c_auc:.4f} vs {name}'s {k_auc:.4f} {rows}), "
                f"more than max_auc_drop {cfg.max_auc_drop}"
            )
        if ece_delta > cfg.max_ece_increase + _TOLERANCE:
            failures.append(
                f"ECE rose {ece_delta:.4f} ({c_ece:.4f} vs {name}'s {k_ece:.4f} {rows}), "
                f"more than max_ece_increase {cfg.max_ece_increase}"
            )
        decision = HOLD if failures else PROMOTE
        reason = (
            "; ".join(failures)
            if failures
            else (
                f"within margins of {name} {rows}: AUC {c_auc:.4f} ({auc_delta:+.4f}, may fall "
                f"{cfg.max_auc_drop}), ECE {c_ece:.4f} ({ece_delta:+.4f}, may rise {cfg.max_ece_increase})"
            )
        )
    return PCTRGateDecision(
        decision=decision,
        reason=reason,
        candidate_auc=c_auc,
        candidate_ece=c_ece,
        champion_version=champion_version if champion is not None else None,
        champion_auc=k_auc,
        champion_ece=k_ece,
        auc_delta=auc_delta,
        ece_delta=ece_delta,
        max_auc_drop=cfg.max_auc_drop,
        max_ece_increase=cfg.max_ece_increase,
        n=n,
    )
