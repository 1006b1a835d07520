"""Serving and collector rows of `make bench`: real processes on 127.0.0.1, measured from a client.

- the policy server with dynamic batching on and off, at concurrency 1, 8 and 32: requests/s,
  p50 and p99 latency (the same requests and model for every cell);
- the collector: clicks/s acknowledged only once durable (SQLite WAL, synchronous=FULL), one
  click per request and in batches of 50;
- the soak: server and collector together under `SOAK_CONCURRENCY` simulated users for a bounded
  time (`BENCH_SOAK_S`), no retries: status codes, p50/p99 per time window, and each process's
  resident memory at the start and the end (a leak or a slowdown shows as a trend).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import yaml

from llm_auction.config import Settings
from llm_auction.simulator.experiment import Environment, export_public
from llm_auction.simulator.loop import sign_up
from llm_auction.simulator.services import free_port, service
from llm_auction.simulator.traffic import click_events, retry_delay, send_traffic

CONCURRENCY = (1, 8, 32)
SOAK_CONCURRENCY = 64
SOAK_WINDOWS = 6
BURST_CONCURRENCY, BURST_S = 128, 30.0


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
    """Requests/s and latency of `llm-auction serve` on `directory`, batching on vs off."""
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        _signed_up(settings, env, root)
        requests = env.world.auction_requests(limit=max(map(_requests_for, CONCURRENCY)))
        for batching in (True, False):
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
            args.append("--batching" if batching else "--no-batching")
            with service("server", args, f"{endpoint}/v2/health/ready", root / "logs"):
                warm = asyncio.run(
                    send_traffic(endpoint, requests[:8], env.click_model, concurrency=8, progress=False)
                )
                assert warm.served == 8, warm.errors
                for concurrency in CONCURRENCY:
                    batch = requests[: _requests_for(concurrency)]
                    report = asyncio.run(
                        send_traffic(
                            endpoint, batch, env.click_model, concurrency=concurrency, progress=False
                        )
                    )
                    label = f"batching {'on' if batching else 'off'}, concurrency {concurrency}"
                    results[label] = {
                        "rps": report.throughput,
                        "p50_ms": report.latency_p50_ms,
                        "p99_ms": report.latency_p99_ms,
                        "failed": report.failed,
                    }
                    rows.append(
                        {
                            "what": f"serve {label}",
                            "n": report.served,
                            "seconds": report.seconds,
                            "per_s": report.throughput,
                            "note": f"req/s; p50 {report.latency_p50_ms:.0f} ms, "
                            f"p99 {report.latency_p99_ms:.0f} ms",
                        }
                    )
    on, off = results["batching on, concurrency 32"], results["batching off, concurrency 32"]
    return {"cells": results, "batching_speedup_at_32": on["rps"] / off["rps"]}


async def _post_clicks(base: str, batches: list[list[dict]], concurrency: int) -> tuple[int, list[float]]:
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    acknowledged = 0

    async def one(client: httpx.AsyncClient, batch: list[dict]) -> None:
        nonlocal acknowledged
        async with semaphore:
            start = time.perf_counter()
            reply = await client.post("/v1/clicks", json=batch)
            latencies.append(time.perf_counter() - start)
            if reply.status_code == 202:
                acknowledged += len(batch)

    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        await asyncio.gather(*(one(client, b) for b in batches))
    return acknowledged, latencies


def bench_collector(rows: list[dict[str, object]], n_events: int = 2000) -> dict:
    """Clicks/s the collector acknowledges durably, one per request vs 50 per request."""
    now = datetime.now(UTC).isoformat()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        args = ["collector", "--store", str(Path(scratch) / "store"), "--port", str(port)]
        with service("collector", args, f"{base}/healthz", Path(scratch) / "logs"):
            for size in (1, 50):
                clicks = [
                    {"event_id": f"b{size}-{i}", "request_id": f"r{i}", "response_id": f"x{i}", "ad_id": "a",
                     "event_timestamp": now}
                    for i in range(n_events)
                ]  # fmt: skip
                batches = [clicks[i : i + size] for i in range(0, n_events, size)]
                start = time.perf_counter()
                acknowledged, latencies = asyncio.run(_post_clicks(base, batches, concurrency=16))
                seconds = time.perf_counter() - start
                results[size] = acknowledged / seconds
                rows.append(
                    {
                        "what": f"collector clicks, {size} per request",
                        "n": acknowledged,
                        "seconds": seconds,
                        "per_s": acknowledged / seconds,
                        "note": "events/s acknowledged once durable; "
                        f"p99 {np.percentile(latencies, 99) * 1000:.0f} ms",
                    }
                )
    return {"events_per_s_single": results[1], "events_per_s_batched": results[50]}


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
