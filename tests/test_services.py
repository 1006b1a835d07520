"""The loop's supervised services (`simulator.services`): their ports, and a death the check reports."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from llm_auction.simulator.services import EPHEMERAL_RANGE, free_port, service, wait_until


def test_service_ports_are_free_and_outside_the_kernels_ephemeral_range():
    """The loop's services bind their port seconds after it is picked; the kernel's own port-0
    picks (vLLM's engine sockets in between) come from the ephemeral range, so ours must not."""
    if not EPHEMERAL_RANGE.exists():
        pytest.skip("no /proc ephemeral port range on this system")
    low = int(EPHEMERAL_RANGE.read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert all(1024 <= p < low for p in ports) and len(set(ports)) > 40, ports
    for port in ports[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free: binds


def test_without_restarts_a_dead_service_fails_the_check_naming_its_log(tmp_path):
    port = free_port()
    args = ["collector", "--store", str(tmp_path / "store"), "--port", str(port)]
    with service("collector", args, f"http://127.0.0.1:{port}/healthz", tmp_path / "logs") as collector:
        collector.check()
        os.kill(collector.pid, signal.SIGKILL)
        wait_until(lambda: collector.failure, "the watcher to notice", timeout_s=30)
        with pytest.raises(RuntimeError, match=r"collector died .*collector\.log"):
            collector.check()
