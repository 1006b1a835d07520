from __future__ import annotations

import pytest

from llm_auction.config import Settings, load_config
from llm_auction.simulator.experiment import Environment, build_environment


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The local profile, with a stream short enough for fast tests."""
    return load_config(
        environ={}, overrides={"world": {"n_requests": 600}, "mechanism": {"bootstrap_samples": 200}}
    )


@pytest.fixture(scope="session")
def env(settings: Settings) -> Environment:
    return build_environment(settings)


POLICY_OVERRIDES = {
    "world": {"n_requests": 2600},
    "policy": {"held_out_requests": 300, "warm_start": {"n_requests": 2300}},
    "tracking": {"uri": None},
}


@pytest.fixture(scope="session")
def policy_env() -> Environment:
    """A world with enough requests to warm-start pi_0 and hold 300 out."""
    return build_environment(load_config(environ={}, overrides=POLICY_OVERRIDES))


@pytest.fixture(scope="session")
def pi0(policy_env: Environment, tmp_path_factory: pytest.TempPathFactory):
    """pi_0 trained once per test session (the slowest fixture: about a minute on 2 cores)."""
    from llm_auction.policy.warm_start import init_policy

    directory = tmp_path_factory.mktemp("pi0")
    card = init_policy(policy_env, directory)
    return directory, card
