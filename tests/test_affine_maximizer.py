"""Tests for the affine-maximizer mechanism (seed 004: Sun et al., multiple reward models).

The brute-force tests never use the closed form: they maximise ASW over the simplex by a zooming
grid search, so they check both the closed-form pi* and the payment formula independently.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_auction.mechanism.affine_maximizer import (
    AffineMaximizerOutcome,
    affine_maximizer_payments,
    affine_social_welfare,
    optimal_policy,
    utilities,
)

# --------------------------------------------------------------------------- brute-force helpers


def _asw_batch(
    policies: np.ndarray, pi_init: np.ndarray, rewards: np.ndarray, weights: np.ndarray, lam: float
) -> np.ndarray:
    """ASW for many policies at once (rows), written independently of the module."""
    value = policies @ (weights @ rewards)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(policies > 0, policies * np.log(policies / pi_init), 0.0)
    return value - lam * terms.sum(axis=1)


def _brute_force_argmax(
    pi_init: np.ndarray, rewards: np.ndarray, weights: np.ndarray, lam: float, levels: int = 12, k: int = 61
) -> np.ndarray:
    """Maximise ASW over the simplex (m = 2 or 3) by a grid search that zooms on the best point.

    Policies are parameterised by their first m-1 coordinates; ASW is concave, so the maximiser
    stays inside a box of a few grid steps around the best grid point at every level. Float64 limits
    the result to about 1e-8 in policy (ASW is flat to O(delta^2) near its maximum).
    """
    m = pi_init.shape[0]
    d = m - 1
    center = np.full(d, 0.5)  # first box is [0, 1]^(m-1)
    half = 0.5
    best = None
    for _ in range(levels):
        axes = [np.linspace(max(c - half, 0.0), min(c + half, 1.0), k) for c in center]
        pts = np.array(list(itertools.product(*axes)))
        pts = pts[pts.sum(axis=1) <= 1.0]
        policies = np.column_stack([pts, 1.0 - pts.sum(axis=1)])
        values = _asw_batch(policies, pi_init, rewards, weights, lam)
        best = policies[int(np.argmax(values))]
        center = best[:d]
        half = 4.0 * (2.0 * half / (k - 1))
    assert best is not None
    return best


def _random_instance(
    rng: np.random.Generator, n: int, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """A well-conditioned instance: pi_init and pi* stay away from the simplex boundary."""
    pi_init = rng.dirichlet(np.full(m, 3.0))
    rewards = rng.dirichlet(np.ones(m), size=n)  # the paper's domain: rm >= 0, sum_y rm(y) = 1
    weights = rng.uniform(0.5, 3.0, size=n)
    lam = float(rng.uniform(0.3, 2.0))
    return pi_init, rewards, weights, lam


# --------------------------------------------------------------------------- brute-force agreement


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_closed_form_policy_matches_brute_force(m: int, seed: int) -> None:
    rng = np.random.default_rng(1000 * m + seed)
    pi_init, rewards, weights, lam = _random_instance(rng, n=3, m=m)
    closed = optimal_policy(pi_init, rewards, weights, lam)
    brute = _brute_force_argmax(pi_init, rewards, weights, lam)
    np.testing.assert_allclose(closed, brute, atol=2e-7)
    np.testing.assert_allclose(closed.sum(), 1.0, atol=1e-12)
    # The closed form is at least as good as anything the search found.
    assert affine_social_welfare(closed, pi_init, rewards, weights, lam) >= (
        _asw_batch(brute[None], pi_init, rewards, weights, lam)[0] - 1e-12
    )


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_payments_match_brute_force(m: int, seed: int) -> None:
    rng = np.random.default_rng(7 + 100 * m + seed)
    n = 3
    pi_init, rewards, weights, lam = _random_instance(rng, n=n, m=m)
    outcome = affine_maximizer_payments(pi_init, rewards, weights, lam)

    policy_bf = _brute_force_argmax(pi_init, rewards, weights, lam)
    for i in range(n):
        keep = np.arange(n) != i
        policy_minus_bf = _brute_force_argmax(pi_init, rewards[keep], weights[keep], lam)
        asw_minus = _asw_batch(
            np.vstack([policy_minus_bf, policy_bf]), pi_init, rewards[keep], weights[keep], lam
        )
        payment_bf = asw_minus[0] - asw_minus[1]
        assert outcome.payments[i] == pytest.approx(payment_bf, abs=2e-7)
    assert outcome.welfare == pytest.approx(
        _asw_batch(policy_bf[None], pi_init, rewards, weights, lam)[0], abs=1e-9
    )


def test_asw_matches_independent_evaluation_and_exclude() -> None:
    rng = np.random.default_rng(3)
    pi_init, rewards, weights, lam = _random_instance(rng, n=4, m=5)
    pi = rng.dirichlet(np.ones(5))
    pi[2] = 0.0  # boundary policies are allowed (0 log 0 = 0)
    pi /= pi.sum()
    full = affine_social_welfare(pi, pi_init, rewards, weights, lam)
    assert full == pytest.approx(_asw_batch(pi[None], pi_init, rewards, weights, lam)[0], abs=1e-12)
    for j in range(4):
        keep = np.arange(4) != j
        minus = affine_social_welfare(pi, pi_init, rewards, weights, lam, exclude=j)
        assert minus == pytest.approx(
            _asw_batch(pi[None], pi_init, rewards[keep], weights[keep], lam)[0], abs=1e-12
        )
        assert full - minus == pytest.approx(weights[j] * rewards[j] @ pi, abs=1e-12)


def test_welfare_equals_lambda_log_partition() -> None:
    # At the optimum, ASW(pi*) = lam * log sum_y pi_init(y) exp(s(y) / lam): a closed-form cross-check.
    rng = np.random.default_rng(11)
    pi_init, rewards, weights, lam = _random_instance(rng, n=3, m=7)
    outcome = affine_maximizer_payments(pi_init, rewards, weights, lam)
    expected = lam * np.log(np.sum(pi_init * np.exp(weights @ rewards / lam)))
    assert outcome.welfare == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- DSIC and IR


@st.composite
def _instances(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, np.random.Generator]:
    n = draw(st.integers(1, 4))
    m = draw(st.integers(2, 6))
    lam = draw(st.floats(0.05, 5.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pi_init = rng.dirichlet(np.full(m, draw(st.sampled_from([0.3, 1.0, 5.0]))))
    pi_init = np.maximum(pi_init, 1e-6)
    pi_init /= pi_init.sum()
    rewards = rng.dirichlet(np.ones(m), size=n)  # paper's domain: non-negative, normalised
    if draw(st.booleans()):
        rewards = rewards * rng.uniform(0.1, 10.0)  # DSIC does not need normalisation
    weights = rng.uniform(0.2, 5.0, size=n)
    return pi_init, rewards, weights, lam, rng


def _misreports(rng: np.random.Generator, truth: np.ndarray, count: int) -> list[np.ndarray]:
    """Random reports, plus the polarised report of Theorem 3.3 that beats truth without payments."""
    m = truth.shape[0]
    reports = [rng.dirichlet(np.ones(m)) for _ in range(count)]
    reports += [rng.normal(0.0, 3.0, size=m) for _ in range(count)]  # arbitrary, even negative
    polarised = np.zeros(m)
    polarised[int(np.argmax(truth))] = 1.0
    reports += [polarised, 5.0 * polarised, truth + rng.normal(0.0, 1e-3, size=m)]
    return reports


@settings(max_examples=150, deadline=None)
@given(_instances())
def test_dsic_random_misreports(instance: tuple) -> None:
    pi_init, rewards, weights, lam, rng = instance
    n = rewards.shape[0]
    truthful = utilities(affine_maximizer_payments(pi_init, rewards, weights, lam), rewards, weights)
    for i in range(n):
        for report in _misreports(rng, rewards[i], count=4):
            reported = rewards.copy()
            reported[i] = report
            u = utilities(affine_maximizer_payments(pi_init, reported, weights, lam), rewards, weights)
            assert u[i] <= truthful[i] + 1e-9
        # Misreporting the group size w_i is covered by the paper's DSIC as well.
        for factor in (0.1, 0.5, 2.0, 10.0):
            reported_w = weights.copy()
            reported_w[i] *= factor
            u = utilities(affine_maximizer_payments(pi_init, rewards, reported_w, lam), rewards, weights)
            assert u[i] <= truthful[i] + 1e-9


@settings(max_examples=150, deadline=None)
@given(_instances())
def test_ir_and_non_negative_payments(instance: tuple) -> None:
    pi_init, rewards, weights, lam, _ = instance
    outcome = affine_maximizer_payments(pi_init, rewards, weights, lam)
    assert np.all(outcome.payments >= -1e-12)
    u = utilities(outcome, rewards, weights)
    assert np.all(u >= -1e-9)
    # Truthful utility = ASW(pi*) - ASW_{-i}(pi*_{-i}) (the VCG-style identity behind Theorem 4.2).
    for i in range(rewards.shape[0]):
        keep = np.arange(rewards.shape[0]) != i
        minus = optimal_policy(pi_init, rewards[keep], weights[keep], lam)
        best_minus = affine_social_welfare(minus, pi_init, rewards[keep], weights[keep], lam)
        assert u[i] == pytest.approx(outcome.welfare - best_minus, abs=1e-9)


def test_payments_are_needed_for_dsic() -> None:
    # Sanity check that the DSIC test has power: without payments (p = 0), the polarised report of
    # Theorem 3.3 strictly raises the group's valuation, and with p^AFF it does not pay off.
    rng = np.random.default_rng(5)
    pi_init, rewards, weights, lam = _random_instance(rng, n=3, m=4)
    polarised = np.zeros(4)
    polarised[int(np.argmax(rewards[0]))] = 1.0
    reported = rewards.copy()
    reported[0] = polarised
    truthful = affine_maximizer_payments(pi_init, rewards, weights, lam)
    lying = affine_maximizer_payments(pi_init, reported, weights, lam)
    assert rewards[0] @ lying.policy > rewards[0] @ truthful.policy + 1e-6
    assert utilities(lying, rewards, weights)[0] < utilities(truthful, rewards, weights)[0]


# --------------------------------------------------------------------------- edge cases


def test_single_group_pays_lambda_kl_not_zero() -> None:
    # With n = 1, ASW_{-1}(pi) = -lam KL(pi || pi_init), maximised by pi_init, so the paper's
    # p_1 = lam KL(pi* || pi_init): zero only when the report does not move the policy.
    pi_init = np.array([0.2, 0.3, 0.5])
    rewards = np.array([[0.7, 0.2, 0.1]])
    weights = np.array([2.0])
    lam = 0.5
    outcome = affine_maximizer_payments(pi_init, rewards, weights, lam)
    kl = float(np.sum(outcome.policy * np.log(outcome.policy / pi_init)))
    assert outcome.payments[0] == pytest.approx(lam * kl, abs=1e-12)
    assert outcome.payments[0] > 0.0

    flat = affine_maximizer_payments(pi_init, np.full((1, 3), 1.0 / 3.0), weights, lam)
    assert flat.payments[0] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(flat.policy, pi_init, atol=1e-12)


def test_constant_reward_group_pays_zero_and_changes_nothing() -> None:
    # exp(w_i c / lam) cancels in the normalisation, so pi* = pi*_{-i} and p_i = 0.
    rng = np.random.default_rng(21)
    pi_init, rewards, weights, lam = _random_instance(rng, n=3, m=5)
    with_const = np.vstack([rewards, np.full((1, 5), 0.2)])
    w_const = np.append(weights, 1.7)
    outcome = affine_maximizer_payments(pi_init, with_const, w_const, lam)
    base = affine_maximizer_payments(pi_init, rewards, weights, lam)
    assert outcome.payments[-1] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(outcome.policy, base.policy, atol=1e-12)
    np.testing.assert_allclose(outcome.payments[:-1], base.payments, atol=1e-12)


def test_shifting_a_report_by_a_constant_leaves_policy_and_payments_unchanged() -> None:
    rng = np.random.default_rng(8)
    pi_init, rewards, weights, lam = _random_instance(rng, n=3, m=4)
    shifted = rewards.copy()
    shifted[1] += 3.0
    a = affine_maximizer_payments(pi_init, rewards, weights, lam)
    b = affine_maximizer_payments(pi_init, shifted, weights, lam)
    np.testing.assert_allclose(a.policy, b.policy, atol=1e-12)
    np.testing.assert_allclose(a.payments, b.payments, atol=1e-10)
    assert b.welfare - a.welfare == pytest.approx(3.0 * weights[1], abs=1e-10)


def test_extreme_rewards_are_stable() -> None:
    pi_init = np.array([0.25, 0.25, 0.25, 0.25])
    rewards = np.array([[1e4, 0.0, 0.0, 0.0], [0.0, 0.0, 1e4, 1e4 - 1e-3]])
    weights = np.array([1.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outcome = affine_maximizer_payments(pi_init, rewards, weights, lam=1e-3)
    assert np.all(np.isfinite(outcome.policy)) and np.all(np.isfinite(outcome.payments))
    assert outcome.policy.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.isfinite(outcome.welfare)


def test_optimal_policy_without_groups_is_pi_init() -> None:
    pi_init = np.array([0.1, 0.6, 0.3])
    np.testing.assert_allclose(
        optimal_policy(pi_init, np.zeros((0, 3)), np.zeros(0), 1.0), pi_init, atol=1e-15
    )


def test_outcome_is_frozen_and_read_only() -> None:
    outcome = affine_maximizer_payments(np.array([0.5, 0.5]), np.array([[1.0, 0.0]]), np.array([1.0]), 1.0)
    assert isinstance(outcome, AffineMaximizerOutcome)
    with pytest.raises(AttributeError):
        outcome.welfare = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        outcome.payments[0] = 0.0


# --------------------------------------------------------------------------- validation

_PI = np.array([0.2, 0.3, 0.5])
_R = np.array([[0.1, 0.2, 0.7], [0.5, 0.5, 0.0]])
_W = np.array([1.0, 2.0])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"pi_init": np.array([0.2, 0.3, 0.6])}, "pi_init"),
        ({"pi_init": np.array([0.0, 0.5, 0.5])}, "pi_init"),
        ({"pi_init": np.array([[0.2, 0.3, 0.5]])}, "pi_init"),
        ({"pi_init": np.array([np.nan, 0.5, 0.5])}, "pi_init"),
        ({"pi_init": np.array([])}, "pi_init"),
        ({"reported_rewards": np.array([0.1, 0.2, 0.7])}, "reported_rewards"),
        ({"reported_rewards": np.ones((2, 4))}, "reported_rewards"),
        ({"reported_rewards": np.zeros((0, 3)), "weights": np.zeros(0)}, "reported_rewards"),
        ({"reported_rewards": np.array([[0.1, np.inf, 0.7], [0.5, 0.5, 0.0]])}, "reported_rewards"),
        ({"reported_rewards": [["a", "b", "c"], ["d", "e", "f"]]}, "reported_rewards"),
        ({"weights": np.array([1.0])}, "weights"),
        ({"weights": np.array([1.0, 0.0])}, "weights"),
        ({"weights": np.array([1.0, -2.0])}, "weights"),
        ({"weights": np.array([1.0, np.nan])}, "weights"),
        ({"lam": 0.0}, "lam"),
        ({"lam": -1.0}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"lam": float("inf")}, "lam"),
        ({"lam": True}, "lam"),
        ({"lam": "1.0"}, "lam"),
    ],
)
def test_payments_reject_invalid_inputs(kwargs: dict, name: str) -> None:
    args = {"pi_init": _PI, "reported_rewards": _R, "weights": _W, "lam": 1.0} | kwargs
    with pytest.raises(ValueError, match=name):
        affine_maximizer_payments(**args)


def test_optimal_policy_and_asw_reject_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="rewards"):
        optimal_policy(_PI, np.ones((2, 2)), _W, 1.0)
    with pytest.raises(ValueError, match="lam"):
        optimal_policy(_PI, _R, _W, 0.0)
    with pytest.raises(ValueError, match="pi"):
        affine_social_welfare(np.array([1.2, -0.2, 0.0]), _PI, _R, _W, 1.0)
    with pytest.raises(ValueError, match="pi"):
        affine_social_welfare(np.array([0.5, 0.5]), _PI, _R, _W, 1.0)
    with pytest.raises(ValueError, match="exclude"):
        affine_social_welfare(_PI, _PI, _R, _W, 1.0, exclude=2)
    with pytest.raises(ValueError, match="exclude"):
        affine_social_welfare(_PI, _PI, _R, _W, 1.0, exclude=True)


def test_utilities_reject_invalid_inputs() -> None:
    outcome = affine_maximizer_payments(_PI, _R, _W, 1.0)
    with pytest.raises(ValueError, match="true_rewards"):
        utilities(outcome, np.ones((2, 4)), _W)
    with pytest.raises(ValueError, match="true_rewards"):
        utilities(outcome, np.ones((3, 3)), np.ones(3))
    with pytest.raises(ValueError, match="weights"):
        utilities(outcome, _R, np.array([1.0, 0.0]))
    np.testing.assert_allclose(utilities(outcome, _R, _W), _W * (_R @ outcome.policy) - outcome.payments)
