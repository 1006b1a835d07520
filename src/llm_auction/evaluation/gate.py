"""The offline gate: a candidate may enter the canary only with a gain and every guardrail held.

It decides admission, not promotion: the offline gain is R under psi_t, the very reward model DPO
just optimised against, so only live traffic (`evaluation.canary`) may promote. `decide` is a pure
function of the evaluation summary and `GateConfig`, so what the gate does can be tested
exhaustively; the registry side effects (aliases, tags) live in `tracking.registry`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from llm_auction.config import GateConfig

Op = Literal[">", "<=", ">="]


@dataclass(frozen=True)
class Check:
    """One line of the decision: the value measured, the bound it is held to, and the verdict."""

    name: str
    value: float
    op: Op
    bound: float
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class GateDecision:
    """Whether the candidate may enter the canary, and why: every check, whichever way it went."""

    admit: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    @property
    def reason(self) -> str:
        return "every check passed: enters the canary" if self.admit else "failed: " + ", ".join(self.failed)

    def to_dict(self) -> dict[str, Any]:
        return {"admitted": self.admit, "reason": self.reason, "checks": [asdict(c) for c in self.checks]}


def _check(name: str, value: float | None, op: Op, bound: float, detail: str = "") -> Check:
    """A missing or non-finite value never passes: the gate does not promote on what it cannot see."""
    if value is None or not math.isfinite(value):
        return Check(name, float("nan"), op, bound, False, detail or "not measured")
    passed = {">": value > bound, "<=": value <= bound, ">=": value >= bound}[op]
    return Check(name, float(value), op, float(bound), bool(passed), detail)


@dataclass(frozen=True)
class GateInputs:
    """What the gate reads from an evaluation (candidate against the champion, same requests).

    Every value is one production can measure: the gain in R under psi_t, ITCTR as psi_t predicts
    it, ad load, format errors, drift, and monotonicity under psi_t. No oracle metric reaches it.
    """

    gain_mean: float
    gain_ci: tuple[float, float]
    candidate_itctr: float | None
    champion_itctr: float | None
    ad_load: float
    format_error_rate: float
    kl: float
    monotonicity_violation_rate: float


def decide(inputs: GateInputs, cfg: GateConfig) -> GateDecision:
    """Admit iff the gain's lower bound exceeds `min_gain` and every guardrail holds."""
    floor = None if inputs.champion_itctr is None else inputs.champion_itctr * (1 - cfg.itctr_margin)
    checks = [
        _check(
            "reward gain lower bound",
            inputs.gain_ci[0],
            ">",
            cfg.min_gain,
            f"gain {inputs.gain_mean:+.4f} [{inputs.gain_ci[0]:+.4f}, {inputs.gain_ci[1]:+.4f}]",
        ),
        _check(
            "itctr non-inferior",
            inputs.candidate_itctr,
            ">=",
            floor if floor is not None else float("nan"),
            f"champion {inputs.champion_itctr}, margin {cfg.itctr_margin:.0%}",
        ),
        _check("ad load", inputs.ad_load, "<=", cfg.max_ad_load),
        _check("format error rate", inputs.format_error_rate, "<=", cfg.max_format_error_rate),
        _check("KL to the reference", inputs.kl, "<=", cfg.max_kl, "nats per response"),
        _check(
            "monotonicity violation rate",
            inputs.monotonicity_violation_rate,
            "<=",
            cfg.max_monotonicity_violation_rate,
        ),
    ]
    if floor is None:  # no champion ITCTR (it showed no ads): non-inferiority holds trivially
        checks[1] = Check("itctr non-inferior", math.nan, ">=", math.nan, True, "champion shows no ads")
    return GateDecision(all(c.passed for c in checks), checks)
