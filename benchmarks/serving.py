"""Serving and collector rows of `make bench`: real processes on 127.0.0.1, measured from a client.

- the policy server with dynamic batching on and off, at concurrency 1, 8 and 32: requests/s,
  p50 and p99 latency (the same requests and model for every cell);
- the collector: clicks/s acknowledged only once durable (SQLite WAL, synchronous=FULL), one
  click per request and in batches of 50.
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
from llm_auction.simulator.loop import free_port, service, sign_up
from llm_auction.simulator.traffic import send_traffic

CONCURRENCY = (1, 8, 32)


def _requests_for(concurrency: int) -> int:
    return 48 if concurrency == 1 else 192


def bench_serving(
    settings: Settings, env: Environment, directory: Path, rows: list[dict[str, object]]
) -> dict:
    """Requests/s and latency of `llm-auction serve` on `directory`, batching on vs off."""
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
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
