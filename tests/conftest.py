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
