"""`make bench`: performance tables, every ratio measured side by side in this one run.

Rows so far: parser throughput, simulation throughput per baseline, and the oracle's exact
subset search against its greedy fallback (speed and revenue it gives up).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from llm_auction.baselines import BASELINES, make_baseline
from llm_auction.config import load_config
from llm_auction.mechanism.grammar import parse_response
from llm_auction.simulator.experiment import build_environment, evaluate_policy

OUT = Path("runs/bench")


def _best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Fastest of a few runs: the least disturbed by whatever else the machine does."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    console = Console(width=160)
    settings = load_config(overrides={"world": {"n_requests": 2000}})
    env = build_environment(settings)
    requests = env.world.auction_requests(limit=1000)
    rng = np.random.default_rng(0)
    rows: list[dict[str, object]] = []

    responses = make_baseline("random", settings, env.ground_truth).allocate(requests, rng) * 10
    seconds = _best_of(lambda: [parse_response(r, 6, 3) for r in responses])
    rows.append(
        {
            "what": "parse_response",
            "n": len(responses),
            "seconds": seconds,
            "per_s": len(responses) / seconds,
            "note": "responses/s",
        }
    )

    for name in BASELINES:
        allocator = make_baseline(name, settings, env.ground_truth)
        seconds = _best_of(lambda a=allocator: evaluate_policy(env, a, requests, seed=0), repeats=2)
        rows.append(
            {
                "what": f"simulate {name}",
                "n": len(requests),
                "seconds": seconds,
                "per_s": len(requests) / seconds,
                "note": "requests/s (allocate+clicks+metrics)",
            }
        )

    bids = [np.asarray(r.bids) for r in requests]
    values = {}
    for label, budget in (("exact", settings.baselines.oracle_max_subsets), ("greedy", 1)):
        found = []
        seconds = _best_of(
            lambda b=budget, f=found: f.extend(
                env.ground_truth.best_allocation(r, w, settings.mechanism.max_ads, b)[1]
                for r, w in zip(requests, bids)
            )
        )
        values[label] = float(np.mean(found[: len(requests)]))
        rows.append(
            {
                "what": f"oracle search {label}",
                "n": len(requests),
                "seconds": seconds,
                "per_s": len(requests) / seconds,
                "note": f"requests/s; mean revenue {values[label]:.4f}",
            }
        )
    exact, greedy = rows[-2], rows[-1]
    ratio_speed = float(greedy["per_s"]) / float(exact["per_s"])
    ratio_value = values["greedy"] / values["exact"]

    table = Table(title="llm-auction benchmarks (this machine, this run)", title_justify="left")
    for column in ("what", "n", "seconds", "per second", "note"):
        table.add_column(column, justify="left" if column in ("what", "note") else "right")
    for row in rows:
        table.add_row(
            str(row["what"]), str(row["n"]), f"{row['seconds']:.3f}", f"{row['per_s']:,.0f}", str(row["note"])
        )
    console.print(table)
    console.print(f"oracle greedy vs exact: {ratio_speed:.2f}x the speed, {ratio_value:.4f} of the revenue")
    OUT.mkdir(parents=True, exist_ok=True)
    summary = {"rows": rows, "oracle_greedy_vs_exact": {"speed": ratio_speed, "revenue": ratio_value}}
    (OUT / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"wrote {OUT / 'bench.json'}")


if __name__ == "__main__":
    main()
