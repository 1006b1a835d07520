"""Serving and collector rows of `make bench`: real processes on 127.0.0.1, measured from a client.

- the policy server with dynamic batching on and off, at concurrency 1, 8 and 32: requests/s,
  p50 and p99 latency (the same requests and model for every cell);
- the collector: clicks/s acknowledged only once durable (SQLite WAL, synchronous=FULL), one
  click per request at concurrency 32 with group commit on and off (one commit per request, as
  its own process), and in batches of 50;
- the soak: server and collector together under `SOAK_CONCURRENCY` simulated users for a bounded
  time (`BENCH_SOAK_S`), no retries: status codes, p50/p99 per time window, and each process's
  resident memory at the start and the end (a leak or a slowdown shows as a trend).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import psutil
import yaml

from llm_auction.config import Settings
from llm_auction.serving.collector import DEFAULT_MAX_GROUP, MAX_GROUP_ENV
from llm_auction.simulator.experiment import Environment, export_public
from llm_auction.simulator.loop import server_work, sign_up
from llm_auction.simulator.services import free_port, service
from llm_auction.simulator.traffic import click_events, retry_delay, send_traffic

CONCURRENCY = (1, 8, 32)
COLLECTOR_CONCURRENCY = 32
SOAK_CONCURRENCY = 64
SOAK_WINDOWS = 6
BURST_CONCURRENCY, BURST_S = 128, 30.0
# (engine, micro-batcher on): vLLM's continuous batching against transformers with and without ours
SERVING_CONFIGS = (("vllm", True), ("transformers", True), ("transformers", False))
# transformers' server as it ran before vLLM: torch on every core (its best here; the vLLM server
# leaves one core to its engine core)
BASELINE_OVERRIDES = ("serving.torch_threads=null",)


def _requests_for(concurrency: int) -> int:
    return 48 if concurrency == 1 else 192


def _signed_up(settings: Settings, env: Environment, root: Path) -> None:
    """`root/config.yaml` with every store under `root`, the public files, the users in Feast."""
    config = settings.model_dump(mode="json") | {
        "data_dir": str(root / "data"),
        "features": settings.features.model_dump(mode="json")
        | {"data_dir": str(root / "features"), "quarantine_dir": str(root / "quarantine")},
        "tracking": {"uri": None},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    bench_settings = Settings.model_validate(config)
    export_public(env, bench_settings.public_dir)
    sign_up(bench_settings, root / "feedback")


def bench_serving(
    settings: Settings, env: Environment, directory: Path, rows: list[dict[str, object]]
) -> dict:
    """Requests/s and latency of `llm-auction serve` on `directory`, with Feast lookups and pricing:
    vLLM (the default engine), and transformers with its micro-batcher on and off.
    """
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        _signed_up(settings, env, root)
        requests = env.world.auction_requests(limit=max(map(_requests_for, CONCURRENCY)))
        for backend, batching in SERVING_CONFIGS:
            port = free_port()
            endpoint = f"http://127.0.0.1:{port}"
            args = [
                "serve",
                "--config",
                str(root / "config.yaml"),
                "--port",
                str(port),
                "--model-dir",
                str(directory),
            ]
            args += ["--batching" if batching else "--no-batching"]
            args += ["--set", f"policy.generation.backend={backend}"]
            if backend == "transformers":
                args += [a for override in BASELINE_OVERRIDES for a in ("--set", override)]
            with service("server", args, f"{endpoint}/v2/health/ready", root / "logs") as server:
                warm = asyncio.run(
                    send_traffic(endpoint, requests[:8], env.click_model, concurrency=8, progress=False)
                )
                assert warm.served == 8, warm.errors
                assert server.process is not None
                processes = _ProcessCPU(server.process.pid)
                for concurrency in CONCURRENCY:
                    batch = requests[: _requests_for(concurrency)]
                    work_before, cpu_before = server_work(endpoint), processes.seconds()
                    report = asyncio.run(
                        send_traffic(
                            endpoint, batch, env.click_model, concurrency=concurrency, progress=False
                        )
                    )
                    cpu = {k: v - cpu_before.get(k, 0.0) for k, v in processes.seconds().items()}
                    work = server_work(endpoint)
                    stages = {  # per request, summed over concurrent requests (latency, not CPU)
                        stage: 1000
                        * (work.get(f"{stage}_s", 0) - work_before.get(f"{stage}_s", 0))
                        / max(report.served, 1)
                        for stage in ("profiles", "generate", "price")
                    }
                    label = f"{backend}, batching {'on' if batching else 'off'}, concurrency {concurrency}"
                    results[label] = {
                        "rps": report.throughput,
                        "p50_ms": report.latency_p50_ms,
                        "p99_ms": report.latency_p99_ms,
                        "failed": report.failed,
                        "cpu_s": cpu,
                        "wall_s": report.seconds,
                        "stage_ms_per_request": stages,
                    }
                    where = ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
                    rows.append(
                        {
                            "what": f"serve {label}",
                            "n": report.served,
                            "seconds": report.seconds,
                            "per_s": report.throughput,
                            "note": f"req/s; p50 {report.latency_p50_ms:.0f} ms, "
                            f"p99 {report.latency_p99_ms:.0f} ms; CPU s: {where}",
                        }
                    )
    needed = [
        f"{c}, concurrency 32"
        for c in ("vllm, batching on", "transformers, batching on", "transformers, batching off")
    ]
    if not set(needed) <= results.keys():
        return {"cells": results}  # a probe of some configurations: no ratios
    engine, on, off = (results[cell] for cell in needed)
    return {
        "cells": results,
        "vllm_vs_micro_batcher_at_32": engine["rps"] / on["rps"],
        "batching_speedup_at_32": on["rps"] / off["rps"],
    }


class _ProcessCPU:
    """CPU seconds used so far by the server, its children (vLLM's engine core) and this process
    (the traffic client and its simulated users): on a small machine they share the cores, which is
    where a serving ceiling comes from.
    """

    def __init__(self, server_pid: int) -> None:
        self.server = psutil.Process(server_pid)
        self.client = psutil.Process()

    def seconds(self) -> dict[str, float]:
        def used(process: psutil.Process) -> float:
            try:
                times = process.cpu_times()
            except psutil.Error:
                return 0.0
            return times.user + times.system

        return {
            "server": used(self.server),
            "engine": sum(used(child) for child in self.server.children(recursive=True)),
            "client": used(self.client),
        }


async def _post_clicks(port: int, batches: list[list[dict]], concurrency: int) -> tuple[int, list[float]]:
    """POST each batch to /v1/clicks over `concurrency` keep-alive connections; (clicks acknowledged,
    latency of each request).

    A minimal HTTP/1.1 client on asyncio streams: httpx spends about 3 ms of CPU a request at
    concurrency 32, more than the collector itself, and on 2 cores the client's CPU is the
    collector's; this one spends about 0.2 ms, so the rows measure the collector.
    """
    latencies: list[float] = []
    acknowledged = 0
    bodies = [json.dumps(batch).encode() for batch in batches]
    head = "POST /v1/clicks HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"

    async def connection(share: list[tuple[int, bytes]]) -> None:
        nonlocal acknowledged
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for n_clicks, body in share:
                request = f"{head}content-length: {len(body)}\r\n\r\n".encode() + body
                start = time.perf_counter()
                writer.write(request)
                status_and_headers = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in status_and_headers.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if status_and_headers.startswith(b"HTTP/1.1 202"):
                    acknowledged += n_clicks
        finally:
            writer.close()

    work = [(len(batch), body) for batch, body in zip(batches, bodies)]
    await asyncio.gather(*(connection(work[k::concurrency]) for k in range(concurrency)))
    return acknowledged, latencies


def _commits(base: str) -> float:
    """The collector's `collector_commits_total` (transactions committed, one fsync each)."""
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("collector_commits_total "):
            return float(line.split()[1])
    raise RuntimeError(f"{base}/metrics has no collector_commits_total")


SLOW_FSYNC_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
static void wait_(void) {
    const char *us = getenv("BENCH_FSYNC_DELAY_US");
    long n = us ? atol(us) : 0;
    struct timespec t = {n / 1000000, (n % 1000000) * 1000};
    if (n > 0) nanosleep(&t, NULL);
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    wait_();
    return real(fd);
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    wait_();
    return real(fd);
}
"""


def slow_fsync_library(directory: Path) -> Path | None:
    """An LD_PRELOAD library that makes every fsync/fdatasync wait `BENCH_FSYNC_DELAY_US` longer
    (a network volume's flush latency on a local disk), or None without a C compiler.
    """
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source, library = directory / "slow_fsync.c", directory / "libslow_fsync.so"
    source.write_text(SLOW_FSYNC_C)
    done = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"], capture_output=True
    )
    return library if done.returncode == 0 else None


def fsync_ms(directory: Path, samples: int = 200) -> float:
    """Median time of a 4 KiB write + fsync in `directory` (the floor of one durable commit)."""
    path = directory / "fsync-probe"
    times = []
    with path.open("wb") as handle:
        for _ in range(samples):
            handle.write(b"x" * 4096)
            handle.flush()
            start = time.perf_counter()
            os.fsync(handle.fileno())
            times.append(time.perf_counter() - start)
    path.unlink()
    return float(np.median(times)) * 1000


def bench_collector(
    rows: list[dict[str, object]], n_events: int = 4000, concurrency: int = COLLECTOR_CONCURRENCY
) -> dict:
    """Clicks/s the collector acknowledges durably, measured side by side in this run: one click per
    request at `concurrency` with group commit on (the default) and off (`max_group` 1: one commit
    per request, the behaviour before group commit, as its own process), and 50 clicks per request
    with group commit on. The same pair again with every fsync made `BENCH_COLLECTOR_FSYNC_MS`
    (default 2) slower, as on a network volume (an LD_PRELOAD shim; 0 or no C compiler: skipped).
    """
    now = datetime.now(UTC).isoformat()
    extra_ms = float(os.environ.get("BENCH_COLLECTOR_FSYNC_MS", "2"))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        local_fsync_ms = fsync_ms(root)
        library = slow_fsync_library(root) if extra_ms > 0 else None
        cells: list[tuple[str, int, float]] = [("on", 1, 0.0), ("off", 1, 0.0), ("on", 50, 0.0)]
        if library is not None:
            cells += [("on", 1, extra_ms), ("off", 1, extra_ms)]
        for group, size, slower_ms in cells:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            disk = f"fsync +{slower_ms:g} ms" if slower_ms else "local disk"
            label = f"{size} per request, group commit {group}, {disk}"
            store = root / f"store-{group}-{size}-{slower_ms:g}"
            env = {MAX_GROUP_ENV: "1" if group == "off" else str(DEFAULT_MAX_GROUP)}
            if slower_ms:
                env |= {"LD_PRELOAD": str(library), "BENCH_FSYNC_DELAY_US": str(int(slower_ms * 1000))}
            args = ["collector", "--store", str(store), "--port", str(port)]
            with service("collector", args, f"{base}/healthz", root / "logs", env=env):
                clicks = [
                    {"event_id": f"{group}{size}-{i}", "request_id": f"r{i}", "response_id": f"x{i}",
                     "ad_id": "a", "event_timestamp": now}
                    for i in range(n_events)
                ]  # fmt: skip
                batches = [clicks[i : i + size] for i in range(0, n_events, size)]
                warm = [[dict(c, event_id=f"warm-{c['event_id']}")] for c in clicks[: concurrency * 4]]
                asyncio.run(_post_clicks(port, warm, concurrency))  # the code paths and the store warm
                commits_before = _commits(base)
                start = time.perf_counter()
                acknowledged, latencies = asyncio.run(_post_clicks(port, batches, concurrency))
                seconds = time.perf_counter() - start
                commits = _commits(base) - commits_before
            results[label] = {
                "events_per_s": acknowledged / seconds,
                "acknowledged": acknowledged,
                "requests": len(batches),
                "commits": commits,
                "p50_ms": float(np.percentile(latencies, 50)) * 1000,
                "p99_ms": float(np.percentile(latencies, 99)) * 1000,
            }
    speedups = {}
    for disk in ("local disk", f"fsync +{extra_ms:g} ms"):
        on, off = (results.get(f"1 per request, group commit {g}, {disk}") for g in ("on", "off"))
        if on and off:
            speedups[disk] = on["events_per_s"] / off["events_per_s"]
    for label, cell in results.items():
        note = (
            f"events/s acknowledged once durable; p50 {cell['p50_ms']:.0f} / p99 {cell['p99_ms']:.0f} ms; "
            f"{cell['requests'] / max(cell['commits'], 1):.1f} requests per commit"
        )
        disk = label.split(", ")[-1]
        if label.startswith("1 per request, group commit on") and disk in speedups:
            note += f"; {speedups[disk]:.1f}x group commit off"
        rows.append(
            {
                "what": f"collector clicks, {label}, concurrency {concurrency}",
                "n": int(cell["acknowledged"]),
                "seconds": cell["acknowledged"] / cell["events_per_s"],
                "per_s": cell["events_per_s"],
                "note": note,
            }
        )
    single_on = results["1 per request, group commit on, local disk"]
    single_off = results["1 per request, group commit off, local disk"]
    return {
        "concurrency": concurrency,
        "local_fsync_ms": local_fsync_ms,
        "cells": results,
        "events_per_s_single": single_on["events_per_s"],
        "events_per_s_single_no_group_commit": single_off["events_per_s"],
        "group_commit_speedup": speedups["local disk"],
        "group_commit_speedup_slow_fsync": speedups.get(f"fsync +{extra_ms:g} ms"),
        "slow_fsync_extra_ms": extra_ms if library is not None else None,
        "events_per_s_batched": results["50 per request, group commit on, local disk"]["events_per_s"],
    }


def resident_mib(pid: int) -> float:
    """VmRSS of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _soak(
    endpoint: str, collector: str, requests: list, click_model, seconds: float, concurrency: int
) -> list[tuple[float, float, int]]:
    """(start offset s, latency s, status) of every predict call made by `concurrency` users in `seconds`.

    Users do not retry a failed call, but one that was shed (503) waits its Retry-After first.
    """
    calls: list[tuple[float, float, int]] = []
    url = f"{endpoint}/v1/models/policy:predict"
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    begin = time.perf_counter()

    async def user(k: int, client: httpx.AsyncClient) -> None:
        i = k
        while (offset := time.perf_counter() - begin) < seconds:
            request = requests[i % len(requests)]
            i += concurrency
            start = time.perf_counter()
            try:
                reply = await client.post(url, json={"instances": [request.model_dump(mode="json")]})
                status = reply.status_code
            except httpx.HTTPError:
                status = 0
            calls.append((offset, time.perf_counter() - start, status))
            if status == 503:  # shed: come back when the server says (as the traffic client does)
                await asyncio.sleep(retry_delay(reply, 0))
            if status != 200:
                continue
            (prediction,) = reply.json()["predictions"]
            rng = np.random.default_rng([k, i])
            clicks = click_events(request, prediction, click_model, rng, 0.0)
            if clicks:
                await client.post(f"{collector}/v1/clicks", json=clicks)

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(user(k, client) for k in range(concurrency)))
    return calls


def bench_soak(
    settings: Settings,
    env: Environment,
    directory: Path,
    rows: list[dict[str, object]],
    seconds: float = 120.0,
    concurrency: int = SOAK_CONCURRENCY,
) -> dict:
    """Server (logging every inference to the collector) and collector under load for `seconds`."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        _signed_up(settings, env, root)
        requests = env.world.auction_requests(limit=512)
        collector_port, server_port = free_port(), free_port()
        collector, endpoint = f"http://127.0.0.1:{collector_port}", f"http://127.0.0.1:{server_port}"
        collector_args = ["collector", "--store", str(root / "store"), "--port", str(collector_port)]
        server_args = ["serve", "--config", str(root / "config.yaml"), "--port", str(server_port),
                       "--model-dir", str(directory), "--logger-url", f"{collector}/v1/events"]  # fmt: skip
        with (
            service("collector", collector_args, f"{collector}/healthz", root / "logs") as collector_service,
            service("server", server_args, f"{endpoint}/v2/health/ready", root / "logs") as server,
        ):
            warm = asyncio.run(send_traffic(endpoint, requests[:8], env.click_model, progress=False))
            assert warm.served == 8, warm.errors
            memory_start = {s.name: resident_mib(s.pid) for s in (server, collector_service)}
            calls = asyncio.run(_soak(endpoint, collector, requests, env.click_model, seconds, concurrency))
            memory_end = {s.name: resident_mib(s.pid) for s in (server, collector_service)}
            # A burst past `serving.max_in_flight`: what is shed is answered at once, what is admitted
            # keeps a bounded latency (without the bound, every user would wait behind the queue).
            burst = asyncio.run(
                _soak(endpoint, collector, requests, env.click_model, BURST_S, BURST_CONCURRENCY)
            )
    offsets, latencies, statuses = (np.asarray(c) for c in zip(*calls))
    width = seconds / SOAK_WINDOWS
    windows = []
    for w in range(SOAK_WINDOWS):
        inside = (offsets >= w * width) & (offsets < (w + 1) * width) & (statuses == 200)
        ms = latencies[inside] * 1000
        windows.append(
            {
                "from_s": round(w * width),
                "to_s": round((w + 1) * width),
                "served": int(inside.sum()),
                "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
                "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
            }
        )
    codes = {str(int(c)): int((statuses == c).sum()) for c in np.unique(statuses)}
    server_errors = int(((statuses >= 500) | (statuses == 0)).sum())
    for window in windows:
        rows.append(
            {
                "what": f"soak {window['from_s']}-{window['to_s']} s, concurrency {concurrency}",
                "n": window["served"],
                "seconds": width,
                "per_s": window["served"] / width,
                "note": f"req/s; p50 {window['p50_ms']:.0f} ms, p99 {window['p99_ms']:.0f} ms",
            }
        )
    burst_status = np.asarray([c[2] for c in burst])
    burst_ms = np.asarray([c[1] for c in burst]) * 1000
    served_ms, shed_ms = burst_ms[burst_status == 200], burst_ms[burst_status == 503]
    burst_summary = {
        "concurrency": BURST_CONCURRENCY,
        "seconds": BURST_S,
        "status_codes": {str(int(c)): int((burst_status == c).sum()) for c in np.unique(burst_status)},
        "served_p50_ms": float(np.percentile(served_ms, 50)) if len(served_ms) else float("nan"),
        "served_p99_ms": float(np.percentile(served_ms, 99)) if len(served_ms) else float("nan"),
        "shed_p99_ms": float(np.percentile(shed_ms, 99)) if len(shed_ms) else float("nan"),
    }
    rows.append(
        {
            "what": f"burst, concurrency {BURST_CONCURRENCY}, max_in_flight {settings.serving.max_in_flight}",
            "n": len(served_ms),
            "seconds": BURST_S,
            "per_s": len(served_ms) / BURST_S,
            "note": f"req/s served, p99 {burst_summary['served_p99_ms']:.0f} ms; "
            f"{len(shed_ms)} shed (503), p99 {burst_summary['shed_p99_ms']:.0f} ms",
        }
    )
    return {
        "burst": burst_summary,
        "seconds": seconds,
        "concurrency": concurrency,
        "status_codes": codes,
        "server_errors": server_errors,
        "windows": windows,
        "rss_mib_start": memory_start,
        "rss_mib_end": memory_end,
    }
