"""The offline gate: never admits a candidate to the canary without a gain and every guardrail;
always with them."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from llm_auction.config import GateConfig
from llm_auction.evaluation.gate import GateInputs, decide

CFG = GateConfig()
finite = st.floats(-10, 10, allow_nan=False)


@st.composite
def inputs(draw) -> GateInputs:
    lo = draw(finite)
    hi = draw(st.floats(lo, 10, allow_nan=False))
    return GateInputs(
        gain_mean=(lo + hi) / 2,
        gain_ci=(lo, hi),
        candidate_itctr=draw(st.one_of(st.none(), st.floats(0, 1))),
        champion_itctr=draw(st.one_of(st.none(), st.floats(0, 1))),
        ad_load=draw(st.floats(0, 6)),
        format_error_rate=draw(st.floats(0, 1)),
        kl=draw(st.one_of(st.floats(0, 20), st.just(math.nan))),
        monotonicity_violation_rate=draw(st.floats(0, 1)),
    )


def clears_every_check(x: GateInputs, cfg: GateConfig) -> bool:
    itctr_ok = x.champion_itctr is None or (
        x.candidate_itctr is not None and x.candidate_itctr >= x.champion_itctr * (1 - cfg.itctr_margin)
    )
    return (
        x.gain_ci[0] > cfg.min_gain
        and itctr_ok
        and x.ad_load <= cfg.max_ad_load
        and x.format_error_rate <= cfg.max_format_error_rate
        and x.kl <= cfg.max_kl  # NaN compares False: an unmeasured drift never passes
        and x.monotonicity_violation_rate <= cfg.max_monotonicity_violation_rate
    )


@settings(max_examples=400, deadline=None)
@given(x=inputs())
def test_promotes_exactly_when_every_check_clears(x):
    decision = decide(x, CFG)
    assert decision.admit == clears_every_check(x, CFG)
    if x.gain_ci[0] <= 0:  # the gain interval reaches zero or below: never promoted
        assert not decision.admit
    assert len(decision.checks) == 6
    assert decision.admit == all(c.passed for c in decision.checks)
    if decision.admit:
        assert decision.reason == "every check passed: enters the canary"
    else:
        assert decision.failed and decision.reason.startswith("failed: ")


def test_a_clear_candidate_is_admitted_and_each_broken_guardrail_blocks_it():
    good = GateInputs(0.1, (0.05, 0.15), 0.18, 0.19, 2.0, 0.03, 1.0, 0.0)
    assert decide(good, CFG).admit
    for field, value in [
        ("gain_ci", (0.0, 0.2)),
        ("candidate_itctr", 0.10),
        ("ad_load", 3.5),
        ("format_error_rate", 0.2),
        ("kl", 9.0),
        ("monotonicity_violation_rate", 0.5),
    ]:
        decision = decide(GateInputs(**{**good.__dict__, field: value}), CFG)
        assert not decision.admit and len(decision.failed) == 1, (field, decision.failed)
