"""The loop's services as supervised subprocesses: started, checked for health, restarted on a crash.

A platform's orchestrator (Kubernetes on the cluster) restarts a server that dies; on one machine
the loop does: `Service` watches its process and, up to `restarts` times, starts it again and
waits until it is healthy. Past that it records why, and `check()` raises it with the log file,
so the loop fails with a message instead of sending traffic into a dead port.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
SERVICE_PORTS = 12_000  # candidates just below the ephemeral range


def free_port() -> int:
    """A free port on 127.0.0.1 that the kernel will not hand out by itself meanwhile.

    The port is only reserved once the service binds it, and the policy server binds after it has
    started its vLLM engines, which take ephemeral ports of their own (port 0) for their sockets:
    a port picked from that range can be theirs by then (seen: the resumed loop's server exited
    with "address already in use"). So the port comes from just below the kernel's ephemeral
    range, at random, checked free; where the range is unknown (not Linux), from the kernel.
    """
    try:
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    candidates = range(max(1024, low - SERVICE_PORTS), low)
    for port in [*random.sample(candidates, min(200, len(candidates))), 0]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free TCP port on 127.0.0.1")


def wait_until(check: Any, what: str, timeout_s: float = 120, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# Importing `feast.metrics` sets these for its own multi-process metrics; a child that inherits them
# keeps every prometheus_client metric in mmap files (slower, and files left behind). Our services
# are one process each and export their own registries.
PROMETHEUS_MULTIPROCESS_VARS = ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR")


def service_environ() -> dict[str, str]:
    """This process's environment for a service, without Feast's multi-process metrics settings."""
    return {k: v for k, v in os.environ.items() if k not in PROMETHEUS_MULTIPROCESS_VARS}


class Service:
    """One `llm-auction` subprocess that is up once `health_url` answers 200, restarted if it dies."""

    def __init__(
        self,
        name: str,
        args: list[str],
        health_url: str,
        log_dir: Path,
        timeout_s: float = 180,
        env: Mapping[str, str] | None = None,
        restarts: int = 0,
    ) -> None:
        self.name, self.args, self.health_url = name, args, health_url
        self.log_path = log_dir / f"{name}.log"
        self.timeout_s = timeout_s
        self.env = {**service_environ(), **(env or {})}
        self.max_restarts = restarts
        self.restarts = 0
        self.failure: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Start the process and wait until it is healthy (or raise, naming the log)."""
        with self.log_path.open("ab") as log:
            # Its own process group: the service's children (vLLM's engine core) go when it goes.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "llm_auction", *self.args],
                stdout=log,
                stderr=log,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.health_url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} not healthy after {self.timeout_s:.0f} s; see {self.log_path}"
                )
            time.sleep(0.5)

    def watch(self) -> None:
        """Restart the process whenever it dies, in a background thread, until `stop()`."""
        self._watcher = threading.Thread(target=self._watch, name=f"watch-{self.name}", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            assert self.process is not None
            code = self.process.poll()
            if code is None:
                continue
            self._kill_group()  # what the dead process left running (an engine core holds GBs)
            if self.restarts >= self.max_restarts:
                self.failure = (
                    f"{self.name} died (exit {code}) and was restarted {self.restarts} times already "
                    f"(loop.service_restarts); see {self.log_path}"
                )
                logger.error(self.failure)
                return
            self.restarts += 1
            logger.warning(
                "%s died (exit %s): restart %d of %d", self.name, code, self.restarts, self.max_restarts
            )
            try:
                self.start()
            except RuntimeError as exc:
                self.failure = f"{self.name} could not be restarted: {exc}"
                logger.error(self.failure)
                return

    def check(self) -> None:
        """Raise if the service is down for good."""
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._kill_group()

    def _kill_group(self) -> None:
        """SIGKILL whatever is left of the process's group once the process itself is gone."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # nothing left


@contextmanager
def service(name: str, args: list[str], health_url: str, log_dir: Path, **options: Any) -> Iterator[Service]:
    """A healthy, watched `Service` for the `with` block (`options`: those of `Service`), stopped on exit."""
    svc = Service(name, args, health_url, log_dir, **options)
    try:
        svc.start()
        svc.watch()
        yield svc
    finally:
        svc.stop()
