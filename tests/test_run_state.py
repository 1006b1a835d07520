"""`state.json`: what `llm-auction run --resume` knows of an interrupted run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llm_auction.config import ConfigError
from llm_auction.simulator.loop import run_loop
from llm_auction.simulator.run_state import STATE_FILE, RunState

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
