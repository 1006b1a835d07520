"""Where a closed-loop run stopped: `state.json` in the run's folder, rewritten after every phase.

The stores (feature store, registry, collector, feedback) are durable by themselves; what a
restarted loop cannot know from them is which phase finished, the window each traffic phase
covered, the report so far, and the registry's aliases before a step that moves them. That is this
file, replaced atomically (write, fsync, rename), so an interruption leaves the previous version.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from llm_auction.config import ConfigError

STATE_FILE = "state.json"
COMPLETE = "complete"


class RunState:
    """Finished phases, phases begun (with what undoing them needs), and the run's data so far."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self._session_start = time.perf_counter()

    @classmethod
    def new(cls, out: Path, epochs: int, pi0: Path | None) -> RunState:
        data = {
            "epochs": epochs,
            "pi0": None if pi0 is None else str(pi0),
            "finished": [],
            "begun": {},
            "windows": {},
            "elapsed_before_s": 0.0,
            "elapsed_s": 0.0,
        }
        state = cls(out / STATE_FILE, data)
        state.save()
        return state

    @classmethod
    def load(cls, out: Path) -> RunState:
        path = out / STATE_FILE
        if not path.is_file():
            raise ConfigError(
                f"--resume: {out} holds no {STATE_FILE} (no run was started there); run without --resume"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--resume: {path} is not valid JSON ({exc})") from None
        # The interrupted session counts up to its last save; this one counts from now.
        data["elapsed_before_s"] = data.get("elapsed_before_s", 0.0) + data.get("elapsed_s", 0.0)
        data["elapsed_s"] = 0.0
        return cls(path, data)

    @property
    def wall_seconds(self) -> float:
        """Time spent on the run over all its sessions (an interrupted one up to its last save)."""
        return self.data["elapsed_before_s"] + time.perf_counter() - self._session_start

    def done(self, key: str) -> bool:
        return key in self.data["finished"]

    def begun(self, key: str) -> dict[str, Any] | None:
        """What `begin` recorded for a phase that began and never finished (None if it did not begin)."""
        return None if self.done(key) else self.data["begun"].get(key)

    def begin(self, key: str, **record: Any) -> None:
        self.data["begun"][key] = record
        self.save()

    def finish(self, key: str, **values: Any) -> None:
        self.data.update(values)
        self.data["begun"].pop(key, None)
        self.data["finished"].append(key)
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = time.perf_counter() - self._session_start
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(self.data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
