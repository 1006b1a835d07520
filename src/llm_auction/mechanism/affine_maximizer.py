"""Affine-maximizer payments for KL-regularised welfare maximisation over a finite response set.

Implements the mechanism of Sun et al., "Mechanism design for LLM fine-tuning with multiple reward
models" (seed 004), restricted to a finite candidate set Y of m responses, so that a policy is a
probability vector over Y and a reward model is a vector in R^m.

Conventions followed from the paper (Section 2.2 and Definition 4.1 / Section 4.1):

- Valuation (Assumption 3.1): v_i(pi; rm_i) = E_{y ~ pi}[rm_i(y)] = sum_y pi(y) rm_i(y).
- Group i has w_i agents, so its valuation is weighted: "the valuation for group i is
  w_i v_i(theta_final; rm_i)", and its quasi-linear utility is
  u_i = w_i v_i(theta_final; rm_i) - p_i, with the TRUE rm_i and TRUE w_i.
- Affine social welfare with D = KL:
  ASW(pi) = sum_i w_i v_i(pi; rm_i) - lambda KL(pi || pi_init); ASW_{-j} drops the j-th term
  of the sum but keeps the regulariser with the same lambda.
- Training rule: pi* = argmax ASW, which for KL is pi*(y) proportional to
  pi_init(y) exp(sum_i w_i rm_i(y) / lambda) (computed in log space with log-sum-exp).
- Payment (p^AFF): p_i = ASW_{-i}(pi*_{-i}) - ASW_{-i}(pi*), where pi*_{-i} maximises ASW_{-i},
  all evaluated on the REPORTED rewards and weights. Payments are in the same (w-weighted) units
  as utilities; they are not divided by w_i.

Consequences worth knowing (all checked in tests/test_affine_maximizer.py):

- DSIC (Theorem 4.2) holds for any real-valued reports, including misreported w_i: truthful
  utility equals ASW_true(pi*) - ASW_{-i}(pi*_{-i}) and pi* maximises ASW_true.
- IR (Theorem 4.2) needs the paper's domain assumption rm_i >= 0 ("we also assume that the output
  rewards are all non-negative"): u_i >= w_i v_i(pi*_{-i}; rm_i) >= 0. Rewards are NOT required
  to be non-negative or normalised here; callers who want IR must supply such rewards.
- Payments are >= 0 and a group whose reward is constant over Y pays 0 (it does not move pi*).
- A single group does NOT pay 0 in general: ASW_{-1} is just -lambda KL(pi || pi_init), whose
  maximiser is pi_init, so p_1 = lambda KL(pi* || pi_init) (the KL cost it imposes on the provider).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_SUM_TOL = 1e-8


@dataclass(frozen=True, eq=False)
class AffineMaximizerOutcome:
    """Result of the mechanism on one profile of reports (arrays are read-only).

    Attributes:
        policy: pi*, the ASW-maximising policy over Y, shape (m,).
        payments: p_i^AFF per group, shape (n,).
        welfare: ASW(pi*) under the reported rewards and weights.
    """

    policy: np.ndarray
    payments: np.ndarray
    welfare: float


def _as_finite_array(value: object, name: str) -> np.ndarray:
    """Convert to a float array and reject NaN/inf, so errors name the offending argument."""
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, got {type(value).__name__}") from exc
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must contain only finite values (no NaN or inf)")
    return arr


def _check_pi_init(pi_init: object) -> np.ndarray:
    """pi_init must be a strictly positive distribution: KL(. || pi_init) is undefined otherwise."""
    arr = _as_finite_array(pi_init, "pi_init")
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(f"pi_init must be a non-empty 1-D array, got shape {arr.shape}")
    if np.any(arr <= 0.0):
        raise ValueError("pi_init must be strictly positive on every candidate")
    if abs(float(arr.sum()) - 1.0) > _SUM_TOL:
        raise ValueError(f"pi_init must sum to 1, got {float(arr.sum())!r}")
    return arr


def _check_rewards(
    rewards: object, m: int, name: str, allow_empty: bool, against: str = "pi_init"
) -> np.ndarray:
    """Rewards are one row per group over the same m candidates as the policy."""
    arr = _as_finite_array(rewards, name)
    if arr.ndim != 2 or arr.shape[1] != m:
        raise ValueError(f"{name} must have shape (n, {m}) to match {against}, got {arr.shape}")
    if not allow_empty and arr.shape[0] < 1:
        raise ValueError(f"{name} must contain at least one group, got shape {arr.shape}")
    return arr


def _check_weights(weights: object, n: int) -> np.ndarray:
    """Weights are group sizes: one strictly positive entry per group."""
    arr = _as_finite_array(weights, "weights")
    if arr.shape != (n,):
        raise ValueError(f"weights must have shape ({n},) to match the rewards, got {arr.shape}")
    if np.any(arr <= 0.0):
        raise ValueError("weights must be strictly positive")
    return arr


def _check_lam(lam: object) -> float:
    """Lambda must be a finite positive scalar, otherwise pi* is not unique or not defined."""
    if isinstance(lam, bool) or not isinstance(lam, int | float | np.integer | np.floating):
        raise ValueError(f"lam must be a real scalar, got {type(lam).__name__}")
    value = float(lam)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"lam must be finite and > 0, got {value!r}")
    return value


def _check_policy(pi: object, m: int) -> np.ndarray:
    """A policy may touch the simplex boundary (zeros), unlike pi_init."""
    arr = _as_finite_array(pi, "pi")
    if arr.shape != (m,):
        raise ValueError(f"pi must have shape ({m},) to match pi_init, got {arr.shape}")
    if np.any(arr < 0.0):
        raise ValueError("pi must be non-negative")
    if abs(float(arr.sum()) - 1.0) > _SUM_TOL:
        raise ValueError(f"pi must sum to 1, got {float(arr.sum())!r}")
    return arr


def _log_optimal_policy(
    log_pi_init: np.ndarray, rewards: np.ndarray, weights: np.ndarray, lam: float
) -> np.ndarray:
    """Return log pi*, normalised with a max-shift so large rewards / small lambda cannot overflow."""
    logits = log_pi_init + (weights @ rewards) / lam
    shifted = logits - float(np.max(logits))  # subtract before adding back: keeps full precision
    return shifted - math.log(float(np.sum(np.exp(shifted))))


def _asw(pi: np.ndarray, pi_init: np.ndarray, rewards: np.ndarray, weights: np.ndarray, lam: float) -> float:
    """Evaluate sum_i w_i E_pi[rm_i] - lam KL(pi || pi_init), with 0 log 0 = 0 on the boundary."""
    value = float(pi @ (weights @ rewards))
    support = pi > 0.0
    kl = float(np.sum(pi[support] * (np.log(pi[support]) - np.log(pi_init[support]))))
    return value - lam * kl


def optimal_policy(pi_init: np.ndarray, rewards: np.ndarray, weights: np.ndarray, lam: float) -> np.ndarray:
    """The unique maximiser of ASW: pi*(y) proportional to pi_init(y) exp(sum_i w_i rm_i(y) / lam).

    Zero groups (rewards of shape (0, m)) is allowed and returns pi_init, which is what the
    payment rule needs for ASW_{-i} when n = 1.

    Args:
        pi_init: Initial policy over Y, shape (m,), strictly positive, sums to 1.
        rewards: Reward models, shape (n, m).
        weights: Group weights w_i > 0, shape (n,).
        lam: KL coefficient lambda > 0.

    Returns:
        The optimal policy, shape (m,).

    Raises:
        ValueError: If an argument has the wrong shape, is not finite, or violates its domain.
    """
    p0 = _check_pi_init(pi_init)
    r = _check_rewards(rewards, p0.shape[0], "rewards", allow_empty=True)
    w = _check_weights(weights, r.shape[0])
    lam_f = _check_lam(lam)
    return np.exp(_log_optimal_policy(np.log(p0), r, w, lam_f))


def affine_social_welfare(
    pi: np.ndarray,
    pi_init: np.ndarray,
    rewards: np.ndarray,
    weights: np.ndarray,
    lam: float,
    exclude: int | None = None,
) -> float:
    """ASW(pi), or ASW_{-exclude}(pi) when `exclude` is given (the regulariser is always kept).

    Args:
        pi: Policy to evaluate, shape (m,), non-negative, sums to 1.
        pi_init: Initial policy, shape (m,), strictly positive, sums to 1.
        rewards: Reward models, shape (n, m).
        weights: Group weights w_i > 0, shape (n,).
        lam: KL coefficient lambda > 0.
        exclude: Index of the group to leave out of the valuation sum, or None.

    Returns:
        sum_{i != exclude} w_i E_pi[rm_i] - lam KL(pi || pi_init).

    Raises:
        ValueError: If an argument has the wrong shape, is not finite, or violates its domain.
    """
    p0 = _check_pi_init(pi_init)
    p = _check_policy(pi, p0.shape[0])
    r = _check_rewards(rewards, p0.shape[0], "rewards", allow_empty=True)
    w = _check_weights(weights, r.shape[0])
    lam_f = _check_lam(lam)
    if exclude is not None:
        if isinstance(exclude, bool) or not isinstance(exclude, int | np.integer):
            raise ValueError(f"exclude must be an int or None, got {type(exclude).__name__}")
        if not 0 <= int(exclude) < r.shape[0]:
            raise ValueError(f"exclude must be in [0, {r.shape[0]}), got {exclude}")
        keep = np.arange(r.shape[0]) != int(exclude)
        r, w = r[keep], w[keep]
    return _asw(p, p0, r, w, lam_f)


def affine_maximizer_payments(
    pi_init: np.ndarray, reported_rewards: np.ndarray, weights: np.ndarray, lam: float
) -> AffineMaximizerOutcome:
    """Run the mechanism (pi*, p^AFF) on reported rewards and weights.

    Payments follow the paper's p^AFF: p_i = ASW_{-i}(pi*_{-i}) - ASW_{-i}(pi*), which makes
    truthful reporting of both rm_i and w_i a dominant strategy (Theorem 4.2).

    Args:
        pi_init: Initial policy over Y, shape (m,), strictly positive, sums to 1.
        reported_rewards: Reported reward models, shape (n, m), n >= 1.
        weights: Reported group weights w_i > 0, shape (n,).
        lam: KL coefficient lambda > 0.

    Returns:
        The outcome: optimal policy, per-group payments, and the reported affine social welfare.

    Raises:
        ValueError: If an argument has the wrong shape, is not finite, or violates its domain.
    """
    p0 = _check_pi_init(pi_init)
    r = _check_rewards(reported_rewards, p0.shape[0], "reported_rewards", allow_empty=False)
    w = _check_weights(weights, r.shape[0])
    lam_f = _check_lam(lam)
    log_p0 = np.log(p0)

    policy = np.exp(_log_optimal_policy(log_p0, r, w, lam_f))
    n = r.shape[0]
    payments = np.empty(n, dtype=np.float64)
    for i in range(n):
        keep = np.arange(n) != i
        r_minus, w_minus = r[keep], w[keep]
        policy_minus = np.exp(_log_optimal_policy(log_p0, r_minus, w_minus, lam_f))
        best_without_i = _asw(policy_minus, p0, r_minus, w_minus, lam_f)
        others_at_policy = _asw(policy, p0, r_minus, w_minus, lam_f)
        payments[i] = best_without_i - others_at_policy
    welfare = _asw(policy, p0, r, w, lam_f)

    policy.setflags(write=False)
    payments.setflags(write=False)
    return AffineMaximizerOutcome(policy=policy, payments=payments, welfare=welfare)


def utilities(outcome: AffineMaximizerOutcome, true_rewards: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Quasi-linear utilities u_i = w_i E_{pi*}[true rm_i] - p_i (paper, Section 2.2).

    Args:
        outcome: Result of `affine_maximizer_payments` on (possibly misreported) reports.
        true_rewards: The groups' TRUE reward models, shape (n, m).
        weights: The groups' TRUE sizes w_i > 0, shape (n,); the valuation is w_i-weighted.

    Returns:
        Per-group utilities, shape (n,).

    Raises:
        ValueError: If shapes disagree with the outcome or values are invalid.
    """
    policy = np.asarray(outcome.policy, dtype=np.float64)
    payments = np.asarray(outcome.payments, dtype=np.float64)
    r = _check_rewards(
        true_rewards, policy.shape[0], "true_rewards", allow_empty=False, against="outcome.policy"
    )
    if r.shape[0] != payments.shape[0]:
        raise ValueError(
            f"true_rewards must have one row per group in outcome ({payments.shape[0]}), got {r.shape[0]}"
        )
    w = _check_weights(weights, r.shape[0])
    return w * (r @ policy) - payments
