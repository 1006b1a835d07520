from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_auction.config import IRPOConfig
from llm_auction.irpo.dpo import eq6_loss, prompt_balanced_sampler
from llm_auction.irpo.pairs import build_pairs, pair_statistics, select_pairs
from llm_auction.irpo.sampling import prompt_requests


def test_a_gap_of_exactly_delta_th_is_no_preference():
    # 1.0 - 0.75 is exact in binary floating point, so the boundary is tested as written.
    assert select_pairs([1.0, 0.75], delta_th=0.25) is None
    assert select_pairs([1.0, 0.75], delta_th=0.2499).losers == (1,)


def test_ties_never_pair_and_the_first_argmax_wins():
    preference = select_pairs([0.5, 0.5, 0.1], delta_th=0.0)
    assert preference.winner == 0
    assert preference.losers == (2,)
    assert select_pairs([0.3, 0.3, 0.3], delta_th=0.0) is None


def test_one_sample_gives_no_pair():
    assert select_pairs([2.0], delta_th=0.0) is None
    pairs = build_pairs(["r1"], ["p"], [["only"]], [[2.0]], delta_th=0.0)
    assert pairs.empty
    assert pair_statistics(pairs, 1)["share_prompts_without_pair"] == 1.0


def test_non_finite_rewards_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        select_pairs([1.0, float("nan")], 0.1)
    with pytest.raises(ValueError, match="2 responses but 1 rewards"):
        build_pairs(["r1"], ["p"], [["a", "b"]], [[1.0]], 0.1)


def test_pairs_hold_rewards_gaps_and_an_empty_loser_set_drops_the_prompt():
    pairs = build_pairs(
        ["r1", "r2", "r3"],
        ["p1", "p2", "p3"],
        [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]],
        [[0.9, 0.1, 0.2], [0.5, 0.45, 0.5], [0.0, 1.0, 0.0]],
        delta_th=0.1,
    )
    assert pairs["request_id"].tolist() == ["r1", "r1", "r3", "r3"]
    assert pairs["chosen"].tolist() == ["a", "a", "h", "h"]
    assert pairs["rejected"].tolist() == ["b", "c", "g", "i"]
    np.testing.assert_allclose(pairs["gap"], [0.8, 0.7, 1.0, 1.0])
    np.testing.assert_allclose(pairs["gap"], pairs["reward_chosen"] - pairs["reward_rejected"])
    stats = pair_statistics(pairs, 3)
    assert stats["prompts_with_pairs"] == 2 and stats["pairs"] == 4
    assert math.isclose(stats["share_prompts_without_pair"], 1 / 3)


@settings(max_examples=60, deadline=None)
@given(
    rewards=st.lists(
        st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=8), min_size=1, max_size=12
    ),
    delta_th=st.floats(0, 1),
)
def test_the_pair_weights_turn_a_plain_mean_into_eq6(rewards, delta_th):
    ids = [f"r{i}" for i in range(len(rewards))]
    samples = [[f"{i}-{j}" for j in range(len(r))] for i, r in enumerate(rewards)]
    pairs = build_pairs(ids, ids, samples, rewards, delta_th)
    for row in pairs.itertuples():
        assert row.gap > delta_th
        assert row.reward_chosen == max(rewards[int(row.request_id[1:])])
    if pairs.empty:
        return
    losses = torch.from_numpy(np.random.default_rng(0).uniform(0, 2, len(pairs)))
    weighted = (torch.from_numpy(pairs["weight"].to_numpy()) * losses).mean()
    assert torch.isclose(weighted, eq6_loss(losses, pairs["request_id"].tolist()))


def test_the_sampler_draws_prompts_uniformly_whatever_their_number_of_losers():
    pairs = pd.DataFrame({"request_id": ["a", "b", "b", "b", "b"], "weight": [0.0] * 5})
    pairs["weight"] = len(pairs) / (2 * pairs.groupby("request_id")["request_id"].transform("count"))
    sampler = prompt_balanced_sampler(pairs["weight"].tolist(), seed=3)
    draws = np.array([i for _ in range(400) for i in sampler])
    share_a = np.mean(draws == 0)
    assert 0.46 < share_a < 0.54  # 2,000 draws: a's one pair carries half the mass, not a fifth
    assert list(prompt_balanced_sampler(pairs["weight"].tolist(), seed=3)) == list(
        prompt_balanced_sampler(pairs["weight"].tolist(), seed=3)
    )


def test_prompt_sources(env):
    """Online prompts are the logged requests themselves (deduplicated); synthetic ones never repeat them."""
    synthetic_file = env.world.auction_requests(limit=200)
    logged = synthetic_file[:30] * 2  # a request logged twice (a retry) is one prompt
    online_ids = {r.request_id for r in logged}
    rng = np.random.default_rng(0)
    only_online = prompt_requests(
        logged, synthetic_file, IRPOConfig(n_prompts=50, prompt_source="online"), rng
    )
    assert len(only_online) == 30 and {r.request_id for r in only_online} == online_ids
    assert all(r in logged for r in only_online)  # exactly what the server received
    mixed = prompt_requests(logged, synthetic_file, IRPOConfig(n_prompts=50, prompt_source="mixed"), rng)
    assert len(mixed) == 50 and len({r.request_id for r in mixed}) == 50
    assert sum(r.request_id in online_ids for r in mixed) == 25
    synthetic = prompt_requests(
        logged, synthetic_file, IRPOConfig(n_prompts=50, prompt_source="synthetic"), rng
    )
    assert len(synthetic) == 50 and not {r.request_id for r in synthetic} & online_ids
    fallback = prompt_requests([], synthetic_file, IRPOConfig(n_prompts=20, prompt_source="online"), rng)
    assert len(fallback) == 20  # no logged request yet: the synthetic file rather than nothing
