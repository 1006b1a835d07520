"""Simulated experiments: a world, its users, and the metrics of a policy on its requests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from llm_auction.config import Settings, describe_validation_error
from llm_auction.contracts import Allocator, AuctionRequest, check_bid_cap
from llm_auction.mechanism.metrics import Estimate, auction_metrics
from llm_auction.simulator.base import ClickModel
from llm_auction.simulator.parametric import ParametricClickModel
from llm_auction.simulator.rollout import Rollout, rollout
from llm_auction.world import World, generate_world


class InputError(ValueError):
    """The user's input cannot be used; the message names the field."""


@dataclass(frozen=True)
class Environment:
    """A world with its simulated users: `ground_truth` always, `click_model` as configured."""

    settings: Settings
    world: World
    ground_truth: ParametricClickModel
    click_model: ClickModel

    @property
    def values(self) -> dict[str, float]:
        return dict(zip(self.world.ads["ad_id"], self.world.ads["value_per_click"].astype(float)))


def build_environment(settings: Settings, world_dir: Path | None = None) -> Environment:
    """Load the world from `world_dir`, or generate it from the settings' seed."""
    world = World.load(world_dir) if world_dir is not None else generate_world(settings.world, settings.seed)
    ground_truth = ParametricClickModel(world, settings.click_model)
    click_model: ClickModel = ground_truth
    if settings.click_model.kind == "llm_judge":
        from llm_auction.simulator.llm_judge import LLMJudgeClickModel

        click_model = LLMJudgeClickModel(settings.llm_judge, user_profiles(world))
    return Environment(settings, world, ground_truth, click_model)


def read_requests(path: Path, max_bid: float) -> list[AuctionRequest]:
    """Auction requests from a JSON-lines file; the first bad line stops with its line and field."""
    if not path.is_file():
        raise InputError(f"requests file {path}: not found")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            request = AuctionRequest.model_validate(json.loads(line))
            check_bid_cap(request, max_bid)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
        except ValidationError as exc:
            raise InputError(describe_validation_error(exc, where)) from None
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from None
        requests.append(request)
    if not requests:
        raise InputError(f"{path}: holds no requests")
    return requests


def evaluate_policy(
    env: Environment, allocator: Allocator, requests: Sequence[AuctionRequest], seed: int
) -> tuple[Rollout, dict[str, Estimate]]:
    """Roll the policy out on `requests` and compute the oracle (expected-click) metrics."""
    rng = np.random.default_rng([seed, 1])
    result = rollout(allocator, requests, env.click_model, env.values, rng, env.settings.mechanism.max_ads)
    m = env.settings.mechanism
    metrics = auction_metrics(
        result.requests, result.impressions, m.bootstrap_samples, m.ci_level, np.random.default_rng([seed, 2])
    )
    return result, metrics


def split_requests(env: Environment) -> tuple[list[AuctionRequest], list[AuctionRequest]]:
    """Training requests from the stream's start and held-out ones from its end, never overlapping."""
    total = len(env.world.requests)
    policy = env.settings.policy
    held_out = policy.held_out_requests
    if held_out >= total:
        raise InputError(f"policy.held_out_requests: {held_out} leaves no training requests of the {total}")
    n_train = min(policy.warm_start.n_requests, total - held_out)
    return env.world.auction_requests(limit=n_train), env.world.auction_requests(offset=total - held_out)


def user_profiles(world: World) -> dict[str, str]:
    return dict(zip(world.users["user_id"], world.users["profile_text"]))
