"""`state.json`: what `llm-auction run --resume` knows of an interrupted run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from llm_auction.config import ConfigError, load_config
from llm_auction.simulator import loop as loop_module
from llm_auction.simulator.loop import run_loop
from llm_auction.simulator.run_state import STATE_FILE, RunState
from llm_auction.tracking.registry import Versions

CLI = str(Path(sys.executable).parent / "llm-auction")


def test_finished_and_begun_phases_survive_a_restart(tmp_path):
    state = RunState.new(tmp_path, epochs=2, pi0=None)
    state.finish("pi_0")
    state.begin("traffic bootstrap", started="2026-12-03T10:00:00+00:00")
    state.data["report"] = {"epochs": [], "traffic": [{"phase": "x", "seconds": float("nan")}]}
    state.save()

    again = RunState.load(tmp_path)
    assert again.done("pi_0") and not again.done("traffic bootstrap")
    assert again.begun("traffic bootstrap") == {"started": "2026-12-03T10:00:00+00:00"}
    assert again.begun("pi_0") is None and again.begun("psi_0") is None
    again.finish("traffic bootstrap", windows={"bootstrap": ["a", "b"]})
    third = RunState.load(tmp_path)
    assert third.begun("traffic bootstrap") is None and third.data["windows"] == {"bootstrap": ["a", "b"]}
    assert third.data["epochs"] == 2 and not list(tmp_path.glob("*.tmp"))  # replaced, not left half-written


def test_wall_time_adds_up_over_sessions(tmp_path):
    state = RunState.new(tmp_path, epochs=1, pi0=None)
    state.data["elapsed_before_s"] = 100.0  # as if an earlier session had run 100 s
    state.save()
    resumed = RunState.load(tmp_path)
    assert 100.0 <= resumed.data["elapsed_before_s"] < 101.0
    assert resumed.wall_seconds >= 100.0


def test_nothing_to_resume_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--resume: .* holds no state.json"):
        RunState.load(tmp_path)
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunState.load(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overrides": {"seed": 8}}, "--resume: continues with the run's own settings; drop --set"),
        ({"epochs": 5}, "--epochs: the run in .* was started with 3 epochs, not 5"),
    ],
)
def test_resume_refuses_what_it_cannot_honour(tmp_path, kwargs, message):
    RunState.new(tmp_path, epochs=3, pi0=None)
    with pytest.raises(ConfigError, match=message):
        run_loop(kwargs.pop("epochs", None), tmp_path, resume=True, **kwargs)


def test_the_cli_says_why_it_cannot_resume(tmp_path):
    result = subprocess.run(
        [CLI, "run", "--resume", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "holds no state.json" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_waiting_for_the_served_versions_outlasts_a_server_busy_starting_an_engine(tmp_path, monkeypatch):
    """A server loading a promoted version's engine may answer `/served` late: the loop asks again
    (the run once died of this ReadTimeout after the final canary's promotion); other errors stand."""
    versions = Versions("2", None, "3")
    answers = iter([httpx.ReadTimeout("timed out"), {"policy_version": "1"}, httpx.ReadTimeout("timed out")])

    def served(self, endpoint):
        answer = next(answers, {"policy_version": "2", "challenger_version": None, "pctr_version": "3"})
        if isinstance(answer, Exception):
            raise answer
        return {"challenger_version": None, "pctr_version": "3", **answer}

    monkeypatch.setattr(loop_module, "current_versions", lambda settings: versions)
    monkeypatch.setattr(loop_module.Loop, "served_versions", served)
    loop = loop_module.Loop(load_config(environ={}), 1, tmp_path)
    assert loop.await_arms("http://127.0.0.1:1") == versions
    assert next(answers, "drained") == "drained"  # it asked through both timeouts

    def refused(self, endpoint):
        raise httpx.ConnectError("connection refused")

    monkeypatch.setattr(loop_module.Loop, "served_versions", refused)
    with pytest.raises(httpx.ConnectError):
        loop.await_arms("http://127.0.0.1:1")
