from pathlib import Path

import pytest
from pydantic import ValidationError

from llm_auction.config import ConfigError, load_config


def test_local_profile_is_the_default():
    settings = load_config(environ={})
    assert settings.profile == "local"
    assert settings.world.k_candidates >= 1


def test_cluster_profile_overrides_sizes():
    local, cluster = load_config(environ={}), load_config(profile="cluster", environ={})
    assert cluster.profile == "cluster"
    assert cluster.world.n_users > local.world.n_users


def test_file_then_env_then_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("world:\n  n_users: 11\n  n_queries: 12\n")
    env = {"LLM_AUCTION__WORLD__N_QUERIES": "13", "LLM_AUCTION__SEED": "5"}
    settings = load_config(path, environ=env, overrides={"world": {"n_requests": 14}})
    assert (settings.world.n_users, settings.world.n_queries, settings.world.n_requests) == (11, 13, 14)
    assert settings.seed == 5


def test_profile_from_environment():
    assert load_config(environ={"LLM_AUCTION_PROFILE": "cluster"}).profile == "cluster"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"overrides": {"world": {"n_userz": 3}}}, "world.n_userz: unknown key"),
        ({"overrides": {"colour": "blue"}}, "colour: unknown key"),
        ({"environ": {"LLM_AUCTION__WORLD__K_CANDIDATES": "0"}}, "world.k_candidates"),
        ({"environ": {"LLM_AUCTION__CLICK_MODEL__POSITION_DECAY": "1.5"}}, "click_model.position_decay"),
        (
            {"overrides": {"mechanism": {"monotonicity_factors": [2.0, 1.0]}}},
            "mechanism.monotonicity_factors",
        ),
        ({"overrides": {"world": {"value_log_mean": float("nan")}}}, "world.value_log_mean"),
        ({"profile": "staging"}, "profile"),
    ],
)
def test_bad_configuration_names_the_key(kwargs, field):
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(**kwargs)


def test_unknown_key_in_file_and_bad_yaml(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("mechanism:\n  max_adz: 2\n")
    with pytest.raises(ConfigError, match=r"mechanism\.max_adz: unknown key"):
        load_config(path, environ={})
    path.write_text("world: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_settings_are_immutable():
    settings = load_config(environ={})
    with pytest.raises(ValidationError):
        settings.world.n_users = 3  # type: ignore[misc]
