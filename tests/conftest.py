from __future__ import annotations

import json

import pytest
from filelock import FileLock

from helpers import POLICY_OVERRIDES
from llm_auction.config import Settings, load_config
from llm_auction.simulator.experiment import Environment, build_environment, split_requests, user_profiles


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The local profile, with a stream short enough for fast tests."""
    return load_config(
        environ={}, overrides={"world": {"n_requests": 600}, "mechanism": {"bootstrap_samples": 200}}
    )


@pytest.fixture(scope="session")
def env(settings: Settings) -> Environment:
    return build_environment(settings)


@pytest.fixture(scope="session")
def policy_env() -> Environment:
    """A world with enough requests to warm-start pi_0 and hold 300 out."""
    return build_environment(load_config(environ={}, overrides=POLICY_OVERRIDES))


@pytest.fixture(scope="session")
def pi0(policy_env: Environment, tmp_path_factory: pytest.TempPathFactory, worker_id: str):
    """pi_0 trained once per test run (the slowest fixture: about 95 s on 2 cores).

    Under pytest-xdist the workers share it: the first to need it trains it under a file lock in
    the run's common temporary folder, the others wait for it and load its card.
    Three SFT passes, not the default five: as well-formed on the held-out requests (1.0), 40% less time.
    """
    from llm_auction.policy.warm_start import init_policy

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # every worker's base folder lies in this run's one folder
    directory = root / "pi0"
    with FileLock(root / "pi0.lock"):
        if not (directory / "policy_card.json").is_file():
            train, held_out = split_requests(policy_env)
            init_policy(policy_env.settings, train, held_out, user_profiles(policy_env.world), directory)
    return directory, json.loads((directory / "policy_card.json").read_text())


# pytest-xdist hands out whole modules in collection order (`--dist loadfile --no-loadscope-reorder`,
# the Makefile): the longest start first, so neither worker is left alone with a long module at the
# end. test_policy first: it trains pi_0, which most slow modules wait for, while the other worker
# runs modules that do not need it (about as long as pi_0's SFT, which left that worker idle for 78 of
# its 173 s on a slow machine with only the first three). Then the slow modules, longest first
# (measured on 2 workers).
MODULE_ORDER = (
    "test_policy",
    "test_pctr",
    "test_features",
    "test_collector",
    "test_cli",
    "test_registry_server",
    "test_loop",
    "test_faults",
    "test_serving",
    "test_canary_serving",
    "test_evaluation",
    "test_pipeline_local",
    "test_irpo_dpo",
    "test_canary_simulation",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules in MODULE_ORDER first, in that order; then any other module with a slow test."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = item.module.__name__.rsplit(".", 1)[-1]
        if name in MODULE_ORDER:
            return 0, MODULE_ORDER.index(name)
        return (1 if item.module.__name__ in slow else 2), 0

    items.sort(key=rank)


def untrained_scorer(env: Environment, lambda_page: float = 0.0):
    """R under a freshly initialised psi over the world's public tables: real code, no training.

    For tests of the machinery around the reward (evaluation, baselines), where any psi will do.
    """
    from llm_auction.config import PCTRConfig
    from llm_auction.features.encoder import TextEncoder
    from llm_auction.reward.pctr import CONTEXT_NUMERIC, PCTRModel, PCTRNet
    from llm_auction.reward.reward import table_lookup
    from llm_auction.reward.scorer import RewardScorer
    from llm_auction.simulator.experiment import catalog_of

    catalog = catalog_of(env.world)
    cfg = PCTRConfig()
    users, ads = sorted(catalog.users["user_id"]), sorted(catalog.ads["ad_id"])
    numeric = list(CONTEXT_NUMERIC)
    model = PCTRModel(
        PCTRNet(len(users), len(ads), len(numeric), cfg),
        cfg,
        users,
        ads,
        numeric,
        [0.0] * len(numeric),
        [1.0] * len(numeric),
    )
    ad_table = catalog.ads.rename(columns={"text": "ad_text"})[["ad_id", "ad_text", "category"]]
    return RewardScorer(
        model,
        TextEncoder(),
        table_lookup(catalog.users[["user_id", "profile_text"]], "user_id"),
        table_lookup(ad_table, "ad_id"),
        lambda_page,
        env.settings.mechanism.max_ads,
    )
