"""`make bench`: performance tables, every ratio measured side by side in this one run.

Rows: parser throughput, simulation throughput per baseline, the oracle's exact subset search
against its greedy fallback (speed and revenue it gives up), and policy sampling batched against
one prompt at a time on the same model (`BENCH_POLICY=DIR` picks the model; by default a pi_0 is
trained on a small world first).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from llm_auction.baselines import BASELINES, make_baseline
from llm_auction.config import Settings, load_config
from llm_auction.mechanism.grammar import parse_response
from llm_auction.simulator.experiment import (
    Environment,
    build_environment,
    evaluate_policy,
    split_requests,
    user_profiles,
)

OUT = Path("runs/bench")


def _best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Fastest of a few runs: the least disturbed by whatever else the machine does."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_sampling(settings: Settings, env: Environment, rows: list[dict[str, object]]) -> dict[str, float]:
    """Responses/s of batched sampling vs one prompt at a time, same model, prompts and seed."""
    from llm_auction.policy.allocator import prompts_for
    from llm_auction.policy.generation import TransformersGenerator
    from llm_auction.policy.model import load_policy
    from llm_auction.policy.warm_start import init_policy

    directory = Path(os.environ.get("BENCH_POLICY", OUT / "pi_0"))
    if not (directory / "model.safetensors").is_file():
        small = settings.model_copy(
            update={"policy": settings.policy.model_copy(update={"held_out_requests": 200})}
        )
        init_policy(Environment(small, env.world, env.ground_truth, env.click_model), directory, n_eval=50)
    model, tokenizer = load_policy(directory)
    _, held_out = split_requests(env)
    prompts = prompts_for(held_out[:64], user_profiles(env.world))
    m = 4
    results = {}
    for label, batch_size in (("batched", settings.policy.generation.batch_size), ("one at a time", 1)):
        cfg = settings.policy.generation.model_copy(update={"batch_size": batch_size})
        generator = TransformersGenerator(model, tokenizer, cfg)
        seconds = _best_of(lambda g=generator: g.generate(prompts, m, seed=0), repeats=2)
        results[label] = len(prompts) * m / seconds
        rows.append(
            {
                "what": f"sample pi_0 {label}",
                "n": len(prompts) * m,
                "seconds": seconds,
                "per_s": results[label],
                "note": f"responses/s (batch {batch_size} prompts x M={m})",
            }
        )
    return {"batched_vs_one_at_a_time": results["batched"] / results["one at a time"]}


def main() -> None:
    console = Console(width=160)
    settings = load_config(overrides={"world": {"n_requests": 2000}, "tracking": {"uri": None}})
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
    sampling = bench_sampling(settings, env, rows)

    table = Table(title="llm-auction benchmarks (this machine, this run)", title_justify="left")
    for column in ("what", "n", "seconds", "per second", "note"):
        table.add_column(column, justify="left" if column in ("what", "note") else "right")
    for row in rows:
        table.add_row(
            str(row["what"]), str(row["n"]), f"{row['seconds']:.3f}", f"{row['per_s']:,.0f}", str(row["note"])
        )
    console.print(table)
    console.print(f"oracle greedy vs exact: {ratio_speed:.2f}x the speed, {ratio_value:.4f} of the revenue")
    console.print(
        f"policy sampling, batched vs one prompt at a time: {sampling['batched_vs_one_at_a_time']:.1f}x"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    summary = {
        "rows": rows,
        "oracle_greedy_vs_exact": {"speed": ratio_speed, "revenue": ratio_value},
        "sampling": sampling,
    }
    (OUT / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"wrote {OUT / 'bench.json'}")


if __name__ == "__main__":
    main()
