"""Scaling rows of `make bench`: the epoch's data steps at 10k, 100k and 1M impressions.

Each step is the project's own code, run as its own process (`python -m benchmarks.scaling step
...`) on feedback in the real schema (`public.feedback`), so its wall time and its peak memory
(`ru_maxrss` of that process: what a pod running the step would need) are its own:

- ingest: `features.ingest.ingest_window` over the 4 windows of 6 hours that hold the impressions,
  in time order (validate, label, entities, click statistics, materialize to the online store);
- training set: `features.ingest.labeled_impressions` + `features.retrieval.training_frame`
  (Feast's point-in-time join, file offline store) + `pctr_inputs`, as the pCTR step builds it;
- pCTR: `reward.training.train_and_register` (tracking off): batch building, BCE epochs with early
  stopping, Platt scaling, test metrics, save.

The training set and pCTR run in one process, as in the pipeline's pCTR step (one pod): each has
its own time, and the peak RSS at its end (pCTR's is the whole step's).

The feedback is a small world's (400 users, 180 ads, 300 queries) rollout of 4,000 requests
(random baseline, the simulator's clicks) tiled with fresh ids and times to the size. Its texts are
bounded (about 4,700 distinct queries, responses, profiles and ads), so the text encoder is warmed
once, in its own row, and the step rows measure the data path; live traffic has a new response
text per request, whose embedding costs what the encoder row says per text. `BENCH_SCALE_SIZES`
(e.g. `10000,100000`) picks the sizes; `BENCH_SCALE_STEP_TIMEOUT_S` (default 1200) bounds a step.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from llm_auction.baselines import make_baseline
from llm_auction.config import Settings, load_config
from llm_auction.features.encoder import encoder_for
from llm_auction.features.ingest import ingest_window, labeled_impressions
from llm_auction.features.retrieval import pctr_inputs, training_frame
from llm_auction.features.store import open_store
from llm_auction.public.catalog import Catalog
from llm_auction.public.feedback import IMPRESSION_COLUMNS, write_feedback
from llm_auction.reward.training import train_and_register
from llm_auction.simulator.experiment import build_environment, catalog_of, evaluate_policy
from llm_auction.simulator.feedback import click_events, feedback_logs

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
STEPS = ("ingest", "training set", "pCTR")
WINDOWS, WINDOW_HOURS = 4, 6
START = pd.Timestamp("2026-03-01", tz="UTC")
BASE_REQUESTS = 4000
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def sizes_from_env() -> list[int]:
    raw = os.environ.get("BENCH_SCALE_SIZES", "").strip()
    if not raw:
        return list(DEFAULT_SIZES)
    return [int(float(part)) for part in raw.split(",") if part.strip()]


def window_bounds() -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    width = pd.Timedelta(hours=WINDOW_HOURS)
    return [(START + k * width, START + (k + 1) * width) for k in range(WINDOWS)]


def base_feedback(settings: Settings) -> tuple[pd.DataFrame, object]:
    """(impressions with the simulator's click probability `expected_ctr`, catalog) of the small
    world's rollout: the tile the sizes are made of.
    """
    env = build_environment(settings)
    requests = env.world.auction_requests(limit=BASE_REQUESTS)
    result, _ = evaluate_policy(env, make_baseline("random", settings), requests, seed=0)
    served_at = env.world.requests.set_index("request_id")["timestamp"]
    impressions, _ = feedback_logs(result, requests, served_at, "v1", np.random.default_rng(0))
    ctr = result.impressions.set_index(["request_id", "ad_id"])["expected_ctr"]
    keys = pd.MultiIndex.from_frame(impressions[["request_id", "ad_id"]])
    return impressions.assign(expected_ctr=ctr.reindex(keys).to_numpy()), catalog_of(env.world)


def tile(base: pd.DataFrame, n: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`n` impressions and their clicks: copies of the base with fresh ids, spread over the windows.

    Requests keep their order inside a copy and copies follow each other, so time runs through the
    whole span once. Every copy draws its own clicks from the simulator's click probability (so a
    copy does not repeat another's labels), each 20 s after its impression on average (some fall
    after their window's end: late clicks, quarantined as in production).
    """
    rng = np.random.default_rng(seed)
    copies = -(-n // len(base))
    base_requests = base["request_id"].drop_duplicates().reset_index(drop=True)
    slots = pd.Series(np.arange(len(base_requests)), index=base_requests)
    request_slot = base["request_id"].map(slots).to_numpy()
    span_s = pd.Timedelta(hours=WINDOWS * WINDOW_HOURS).total_seconds()
    parts = []
    for k in range(copies):
        suffix = f"~{k}"
        offset_s = (k * len(base_requests) + request_slot) / (copies * len(base_requests)) * span_s
        parts.append(
            base.assign(
                event_id=base["event_id"] + suffix,
                request_id=base["request_id"] + suffix,
                response_id=base["response_id"] + suffix,
                event_timestamp=START + pd.to_timedelta(offset_s, unit="s"),
            )
        )
    tiled = pd.concat(parts, ignore_index=True).iloc[:n]
    clicks = click_events(tiled[rng.random(len(tiled)) < tiled["expected_ctr"].to_numpy()], rng)
    impressions = tiled[list(IMPRESSION_COLUMNS)].reset_index(drop=True)
    return impressions, clicks


def _config(root: Path, size_dir: Path) -> Path:
    """A config whose feature store and quarantine are the size's own; the encoder cache is shared."""
    config = {
        "data_dir": str(root / "shared"),
        "public": {"dir": str(root / "public")},
        "features": {
            "data_dir": str(size_dir / "features"),
            "quarantine_dir": str(size_dir / "quarantine"),
            "repo_dir": str(PROJECT_ROOT / "feature_repo"),
        },
        "tracking": {"uri": None},
    }
    path = size_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(step: str, config_path: Path, size_dir: Path, result_path: Path) -> None:
    """One step in this process; its seconds, RSS before it and peak RSS (MiB) go to `result_path`.

    `train` is the pipeline's pCTR step (`pipeline.steps.pctr.train_pctr`) in one process, as in its pod:
    the training set, then psi trained on it; each part gets its own time and the peak RSS at its end.
    """
    settings = load_config(config_path, environ={})
    encoder = encoder_for(settings)
    result: dict[str, object] = {}

    def peak_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    if step == "encode":
        texts = json.loads((size_dir / "texts.json").read_text())
        before, start = _rss_mib(), time.perf_counter()
        encoder.encode(texts)
        encoder.flush()
        result["encode"] = {"seconds": time.perf_counter() - start, "texts": len(texts)}
    elif step == "ingest":
        catalog = Catalog.load(settings.public_dir)
        before, start = _rss_mib(), time.perf_counter()
        store = open_store(settings)
        reports = [
            ingest_window(store, settings, size_dir / "feedback", catalog.users, catalog.ads, s, e, encoder)
            for s, e in window_bounds()
        ]
        encoder.flush()
        result["ingest"] = {
            "seconds": time.perf_counter() - start,
            "labeled": sum(r.labeled_rows_window for r in reports),
            "quarantined": sum(r.n_quarantined for r in reports),
            "embeddings_computed": sum(r.embeddings_computed for r in reports),
        }
    elif step == "train":
        before, start = _rss_mib(), time.perf_counter()
        labeled = labeled_impressions(settings, None, window_bounds()[-1][1])
        frame = pctr_inputs(training_frame(open_store(settings), labeled, settings.features))
        result["training set"] = {
            "seconds": time.perf_counter() - start,
            "peak_rss_mib": peak_mib(),
            "rows": len(frame),
            "with_user_stats": int(frame["user_impressions_7d"].gt(0).sum()),
        }
        start = time.perf_counter()
        _, card = train_and_register(settings, frame, encoder, size_dir / "pctr")
        encoder.flush()
        result["pCTR"] = {
            "seconds": time.perf_counter() - start,
            "epochs": card["epochs"],
            "test_auc": card["test_auc"],
            "rows": card["rows"],
        }
    else:
        raise ValueError(f"step {step!r}: not one of encode, ingest, train")
    for part in result.values():
        part.setdefault("peak_rss_mib", peak_mib())  # type: ignore[union-attr]
        part["rss_before_mib"] = before  # type: ignore[index]
    result_path.write_text(json.dumps(result) + "\n")


def run_step(step: str, config_path: Path, size_dir: Path, timeout_s: float) -> dict[str, dict]:
    """Run one step as its own process; its parts' results, or {"error": ...} (timeout, failure)."""
    result_path = size_dir / f"result-{step}.json"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.scaling", "step", step, str(config_path), str(size_dir),
               str(result_path)]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        done = subprocess.run(
            command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"error": {"error": f"timed out after {timeout_s:.0f} s"}}
    if done.returncode != 0 or not result_path.is_file():
        return {"error": {"error": f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"}}
    return json.loads(result_path.read_text())


def bench_scaling(rows: list[dict[str, object]], sizes: list[int] | None = None) -> dict:
    """The data steps at each size: wall time, microseconds per impression, peak memory."""
    sizes = sizes or sizes_from_env()
    timeout_s = float(os.environ.get("BENCH_SCALE_STEP_TIMEOUT_S", 1200))
    settings = load_config(
        environ={}, overrides={"world": {"n_requests": BASE_REQUESTS}, "tracking": {"uri": None}}
    )
    table: dict[str, dict[str, dict]] = {}
    keep = os.environ.get("BENCH_SCALE_DIR")  # keep the data (to profile a step), else a temporary folder
    with tempfile.TemporaryDirectory(prefix="llm-auction-scaling-") as scratch:
        root = Path(keep) if keep else Path(scratch)
        base, catalog = base_feedback(settings)
        catalog.save(root / "public")
        texts = sorted(
            set(base["query"]) | set(base["response"]) | set(catalog.users["profile_text"])
            | set(catalog.ads["text"])
        )  # fmt: skip
        warm_dir = root / "warm"
        warm_dir.mkdir(parents=True, exist_ok=True)
        (warm_dir / "texts.json").write_text(json.dumps(texts))
        encoded = run_step("encode", _config(root, warm_dir), warm_dir, timeout_s)
        if "error" in encoded:
            raise RuntimeError(f"scaling: the encoder warm-up failed: {encoded['error']['error']}")
        encode = encoded["encode"]
        rows.append(
            {
                "what": "scale: text encoder (phi), distinct texts",
                "n": len(texts),
                "seconds": encode["seconds"],
                "per_s": len(texts) / encode["seconds"],
                "note": f"texts/s, all-MiniLM-L6-v2 on CPU; peak RSS {encode['peak_rss_mib']:.0f} MiB",
            }
        )
        table["encoder"] = encoded
        for size in sizes:
            size_dir = root / f"n{size}"
            size_dir.mkdir(parents=True, exist_ok=True)
            impressions, clicks = tile(base, size)
            write_feedback(size_dir / "feedback", "synthetic", impressions, clicks)
            config = _config(root, size_dir)
            table[str(size)] = {}
            for process in ("ingest", "train"):
                results = run_step(process, config, size_dir, timeout_s)
                if "error" in results:
                    parts = ("ingest",) if process == "ingest" else ("training set", "pCTR")
                    results = {part: results["error"] for part in parts}
                table[str(size)] |= results
                for step, result in results.items():
                    rows.append(_row(step, size, result))
                if "error" in results.get("ingest", {}):
                    break  # training needs the ingested features
    return {"sizes": sizes, "steps": table, "distinct_texts": len(texts)}


def _row(step: str, size: int, result: dict) -> dict[str, object]:
    what = f"scale: {step}, {size:,} impressions"
    if "error" in result:
        return {"what": what, "n": size, "seconds": float("nan"), "per_s": float("nan"),
                "note": str(result["error"])[:200]}  # fmt: skip
    note = (
        f"{result['seconds'] / size * 1e6:.1f} us/impression; peak RSS {result['peak_rss_mib']:,.0f} MiB "
        f"(process at start {result['rss_before_mib']:,.0f})"
    )
    if step == "pCTR":
        per_epoch = result["seconds"] / size / result["epochs"] * 1e6
        note += f"; {result['epochs']} epochs ({per_epoch:.1f} us/impression/epoch)"
        note += f", test AUC {result['test_auc']:.3f}"
    return {
        "what": what,
        "n": size,
        "seconds": result["seconds"],
        "per_s": size / result["seconds"],
        "note": note,
    }


def markdown(summary: dict) -> str:
    """The scaling table as Markdown: one row per step, one column group per size."""
    sizes = summary["sizes"]
    head = "| step | " + " | ".join(f"{s:,} impressions" for s in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    for step in STEPS:
        cells = []
        for size in sizes:
            result = summary["steps"].get(str(size), {}).get(step)
            if result is None:
                cells.append("not run")
            elif "error" in result:
                cells.append(result["error"].split(":")[0])
            else:
                cells.append(
                    f"{result['seconds']:.1f} s, {result['seconds'] / size * 1e6:.0f} us/imp, "
                    f"{result['peak_rss_mib']:,.0f} MiB"
                )
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "step":
        _child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
        return
    rows: list[dict[str, object]] = []
    summary = bench_scaling(rows)
    for row in rows:
        print(f"{row['what']:<45} {row['seconds']:>9.1f} s  {row['per_s']:>10,.0f}/s  {row['note']}")
    print(markdown(summary))
    out = Path("runs/bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
