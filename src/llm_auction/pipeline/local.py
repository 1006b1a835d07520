"""Run the irpo-epoch pipeline on this machine through `kfp.local` (the `local` profile's scheduler)."""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from llm_auction.deploy.validate import repo_root

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([^']+)'")
FAILURE_TAIL_LINES = 25
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")


def pipeline_function():  # noqa: ANN201
    """`pipelines.irpo_epoch.irpo_epoch`, importable from the project root (where `pipelines/` lives)."""
    root = str(repo_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("pipelines.irpo_epoch").irpo_epoch


@dataclass
class StepClock:
    """A text stream for kfp.local's output: writes it through to `sink` (the run's log file) and
    times each task from its "Executing task" line to its "finished with status" line.
    """

    sink: TextIO
    seconds: dict[str, float] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    _started: dict[str, float] = field(default_factory=dict)

    def write(self, text: str) -> int:
        plain = _ANSI.sub("", text)
        if started := _STARTED.search(plain):
            self._started[started.group(1)] = time.perf_counter()
        if finished := _FINISHED.search(plain):
            task = finished.group(1)
            self.seconds[task] = time.perf_counter() - self._started.pop(task, time.perf_counter())
            self.status[task] = finished.group(2)
        return self.sink.write(text)

    def flush(self) -> None:
        self.sink.flush()

    def isatty(self) -> bool:
        return False


def run_local(pipeline_root: Path, log_path: Path | None = None, **arguments: Any) -> StepClock:
    """One pipeline run in subprocesses of this virtual environment; raises when a step fails.

    With `log_path` what kfp.local and the steps print (every task's executor input, the libraries'
    output) goes there instead of the console. Returns the clock: each step's seconds and status.
    """
    from kfp import local

    pipeline_root.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        sink = stack.enter_context(log_path.open("a")) if log_path is not None else sys.stdout
        clock = StepClock(sink)
        stack.enter_context(contextlib.redirect_stdout(clock))  # type: ignore[type-var]
        stack.enter_context(warnings.catch_warnings())
        # Each step names its cluster image (CPU or CUDA) and resources (GPUs, CPU and memory limits);
        # here every step runs in this environment by design, which kfp.local would otherwise say
        # once per step on the console.
        warnings.filterwarnings("ignore", "You may be attemping to run a task", RuntimeWarning)
        warnings.filterwarnings("ignore", ".*have no effect in the current local runner", UserWarning)
        local.init(
            runner=local.SubprocessRunner(use_venv=False),
            pipeline_root=str(pipeline_root),
            raise_on_error=True,
        )
        try:
            pipeline_function()(**arguments)
        except RuntimeError as exc:
            if log_path is None:
                raise
            sink.flush()
            tail = "\n".join(_ANSI.sub("", log_path.read_text()).splitlines()[-FAILURE_TAIL_LINES:])
            raise RuntimeError(f"{exc}; the run's output is in {log_path}, which ends:\n{tail}") from exc
    return clock
