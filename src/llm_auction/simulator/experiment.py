"""Simulated experiments: a world, its users, and the metrics of a policy on its requests."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm_auction.config import Settings
from llm_auction.contracts import Allocator, AuctionRequest
from llm_auction.errors import InputError
from llm_auction.mechanism.metrics import Estimate, auction_metrics
from llm_auction.public.catalog import HELD_OUT_FILE, SYNTHETIC_FILE, Catalog, write_requests
from llm_auction.simulator.base import ClickModel
from llm_auction.simulator.llm_judge import LLMJudgeClickModel
from llm_auction.simulator.parametric import ParametricClickModel
from llm_auction.simulator.rollout import Rollout, rollout
from llm_auction.world import World, generate_world


@dataclass(frozen=True)
class Environment:
    """A world with its simulated users: `ground_truth` always, `click_model` as configured."""

    settings: Settings
    world: World
    ground_truth: ParametricClickModel
    click_model: ClickModel

    @functools.cached_property
    def _auction_values(self) -> dict[tuple[str, str], float]:
        w = self.world.requests
        return {
            (r, a): float(v)
            for r, ids, vals in zip(w["request_id"], w["ad_ids"], w["values"], strict=True)
            for a, v in zip(ids, vals, strict=True)
        }

    @functools.cached_property
    def _mean_values(self) -> dict[str, float]:
        return dict(zip(self.world.ads["ad_id"], self.world.ads["value_per_click"].astype(float)))

    def value_of(self, request_id: str, ad_id: str) -> float:
        """The advertiser's value of a click on `ad_id` in that auction (hidden truth); for a request
        that is not in the world's stream (a requests file), the advertiser's mean value per click.
        """
        value = self._auction_values.get((request_id, ad_id))
        return self._mean_values[ad_id] if value is None else value


def build_environment(settings: Settings, world_dir: Path | None = None) -> Environment:
    """Load the world from `world_dir`, or generate it from the settings' seed."""
    world = World.load(world_dir) if world_dir is not None else generate_world(settings.world, settings.seed)
    ground_truth = ParametricClickModel(world, settings.click_model)
    click_model: ClickModel = ground_truth
    if settings.click_model.kind == "llm_judge":
        click_model = LLMJudgeClickModel(settings.llm_judge, user_profiles(world))
    return Environment(settings, world, ground_truth, click_model)


def evaluate_policy(
    env: Environment, allocator: Allocator, requests: Sequence[AuctionRequest], seed: int
) -> tuple[Rollout, dict[str, Estimate]]:
    """Roll the policy out on `requests` and compute the oracle (expected-click) metrics."""
    rng = np.random.default_rng([seed, 1])
    result = rollout(
        allocator,
        requests,
        env.click_model,
        env.value_of,
        rng,
        env.settings.mechanism.max_ads,
        user_utility=env.ground_truth.user_utility,
    )
    m = env.settings.mechanism
    metrics = auction_metrics(
        result.requests, result.impressions, m.bootstrap_samples, m.ci_level, np.random.default_rng([seed, 2])
    )
    return result, metrics


def split_requests(
    env: Environment, limit_train: bool = True
) -> tuple[list[AuctionRequest], list[AuctionRequest]]:
    """Training requests from the stream's start and held-out ones from its end, never overlapping.

    With `limit_train` the training part is pi_0's SFT set (`policy.warm_start.n_requests`).
    """
    total = len(env.world.requests)
    policy = env.settings.policy
    held_out = policy.held_out_requests
    if held_out >= total:
        raise InputError(f"policy.held_out_requests: {held_out} leaves no training requests of the {total}")
    n_train = min(policy.warm_start.n_requests, total - held_out) if limit_train else total - held_out
    return env.world.auction_requests(limit=n_train), env.world.auction_requests(offset=total - held_out)


def user_profiles(world: World) -> dict[str, str]:
    return dict(zip(world.users["user_id"], world.users["profile_text"]))


def catalog_of(world: World) -> Catalog:
    """The platform's view of the world: ads, advertisers and profiles, without the hidden columns."""
    return Catalog(
        ads=world.ads[["ad_id", "advertiser_id", "text", "category"]].astype(str),
        advertisers=world.advertisers[["advertiser_id", "name", "category"]].astype(str),
        users=world.users[["user_id", "profile_text"]].astype(str),
    )


def export_public(env: Environment, directory: Path | None = None) -> dict[str, Path]:
    """Write the files a platform would export (`public.catalog`) from the world, as a platform would.

    Held-out requests are the stream's end (never trained on); the synthetic-request file is every
    other request, which IRPO may use as prompts and pi_0's SFT draws from.
    """
    out = directory or env.settings.public_dir
    paths = catalog_of(env.world).save(out)
    train, held_out = split_requests(env, limit_train=False)
    write_requests(out / HELD_OUT_FILE, held_out)
    write_requests(out / SYNTHETIC_FILE, train)
    names = ("ads", "advertisers", "users")
    return {**dict(zip(names, paths)), "held_out": out / HELD_OUT_FILE, "synthetic": out / SYNTHETIC_FILE}
