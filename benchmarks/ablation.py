"""`make ablation RUN=runs/local`: IRPO's levers one at a time, every row on the same held-out requests.

From a finished run (its pi_0, epoch 1's psi_1, feedback window and pair set) each row trains one
candidate from pi_0 with one setting changed from the run's (DPO: beta, learning rate, passes,
sft_weight, LoRA rank; the pair set: M, delta_th, lambda_page, the prompts' source; the ranking
stage), then `llm-auction evaluate` samples pi_0, every candidate and the deployable baselines on
the run's held-out requests (one evaluation per way of serving, the same requests and seeds):
oracle revenue, social welfare, ITCTR and ad load with 95% intervals, and R under psi_1 beside
them. Each step is the CLI a user would run, in its own process; their MLflow
runs go to a scratch store in the output folder, never into the run's registry.

Writes OUT/ablation.json and OUT/ablation.md (the README's table); ABLATION_ROWS=a,b picks rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

console = Console()
CLI = [sys.executable, "-m", "llm_auction"]


@dataclass(frozen=True)
class Row:
    """One lever changed from the run's settings: DPO settings (`sets`), a new pair set (`pairs`), or
    how the policy is served (`serve`: applied to its pairs and its evaluation as well).
    """

    name: str
    sets: tuple[str, ...] = ()
    pairs: tuple[str, ...] | None = None
    serve: tuple[str, ...] = ()
    train: bool = True


ECPM = ("policy.ranking=ecpm",)


ROWS = (
    Row("pi_0", train=False),
    Row("as run"),
    Row("as run, pairs sampled again", pairs=()),  # the control of every row with a new pair set
    Row("beta 0.03", ("irpo.dpo.beta=0.03",)),
    Row("beta 0.3", ("irpo.dpo.beta=0.3",)),
    Row("learning rate 2e-4", ("irpo.dpo.learning_rate=2e-4",)),
    Row("learning rate 1e-3", ("irpo.dpo.learning_rate=1e-3",)),
    Row("2 passes", ("irpo.dpo.epochs=2",)),
    Row("sft_weight 0", ("irpo.dpo.sft_weight=0",)),
    Row("LoRA r 2", ("policy.lora.r=2", "policy.lora.alpha=4")),
    Row("LoRA r 32", ("policy.lora.r=32", "policy.lora.alpha=64")),
    Row("M 8", pairs=("irpo.m_samples=8",)),
    Row("delta_th 0.2", pairs=("irpo.delta_th=0.2",)),
    Row("lambda_page 0", pairs=("reward.lambda_page=0",)),
    Row("prompts: online only", pairs=("irpo.prompt_source=online",)),
    Row("pi_0, listed by eCPM", train=False, serve=ECPM),
    Row("listed by eCPM", pairs=(), serve=ECPM),
)
BASELINES = ("pre_generation", "post_generation")
METRICS = ("revenue", "social_welfare", "itctr", "ad_load", "format_error_rate", "reward")


@dataclass
class Inputs:
    """What a finished run left that the rows start from."""

    config: Path
    pi0: Path
    pctr: Path
    pairs: Path
    feedback: Path
    window: str
    seed: int


def run_inputs(run: Path) -> Inputs:
    """pi_0, epoch 1's psi and pair set, and its feedback window; a clear error for a run without them."""
    if not (run / "state.json").is_file():
        raise SystemExit(f"{run}: not a run folder (no state.json); `make run` writes runs/local")
    state = json.loads((run / "state.json").read_text())
    if "epoch-1" not in state.get("windows", {}):
        raise SystemExit(
            f"{run}: no finished epoch 1 (no window 'epoch-1' in state.json); run the loop first"
        )
    (epoch,) = (run / "pipeline" / "epoch-1").iterdir()
    return Inputs(
        config=run / "config.yaml",
        pi0=run / "pi0",
        pctr=next(epoch.glob("train-pctr/pctr")),
        pairs=next(epoch.glob("build-preferences/pairs")),
        feedback=run / "feedback",
        window="/".join(state["windows"]["epoch-1"]),
        seed=yaml.safe_load((run / "config.yaml").read_text())["seed"],
    )


def cli(args: list[str], log: Path) -> None:
    """One CLI command; its output goes to `log`, and a failure stops the ablation naming that log."""
    with log.open("w") as handle:
        done = subprocess.run([*CLI, *args], stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed (exit {done.returncode}); see {log}")


def settings_args(inputs: Inputs, out: Path, sets: tuple[str, ...]) -> list[str]:
    """The run's settings with the scratch MLflow store and the row's changes."""
    scratch = [f"tracking.uri=sqlite:///{(out / 'mlflow.db').resolve()}"]
    scratch.append(f"tracking.artifact_location={(out / 'mlflow-artifacts').resolve()}")
    return ["--config", str(inputs.config), *(x for s in (*scratch, *sets) for x in ("--set", s))]


def train_row(row: Row, inputs: Inputs, out: Path) -> dict:
    """The row's candidate in out/<row>: its pair set (the run's, or sampled anew), then DPO from pi_0."""
    folder = out / row.name.replace(" ", "_").replace(":", "")
    pairs = inputs.pairs
    stats: dict = json.loads(next(inputs.pairs.glob("*stats.json")).read_text())
    own = row.pairs is not None or bool(row.serve)
    if own and not (folder / "pairs.json").is_file():  # kept from an earlier ablation otherwise
        sets = (*(row.pairs or ()), *row.serve)
        cli(
            [
                "irpo", "pairs", "--policy", str(inputs.pi0), "--pctr", str(inputs.pctr),
                "--out", str(folder / "pairs"), "--feedback", str(inputs.feedback), "--window", inputs.window,
                "--json", str(folder / "pairs.json"), *settings_args(inputs, out, sets),
            ],
            _log(folder, "pairs"),
        )  # fmt: skip
    if own:
        pairs, stats = folder / "pairs", json.loads((folder / "pairs.json").read_text())
    policy = folder / "policy"
    if not (policy / "model.safetensors").is_file():
        cli(
            [
                "irpo", "dpo", "--policy", str(inputs.pi0), "--pairs", str(pairs), "--out", str(policy),
                "--json", str(folder / "dpo.json"), *settings_args(inputs, out, row.sets),
            ],
            _log(folder, "dpo"),
        )  # fmt: skip
    dpo = json.loads((folder / "dpo.json").read_text())
    return {"policy": str(policy), "pairs": stats.get("pairs"), "dpo_seconds": dpo.get("seconds")}


def _log(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.log"


def evaluate(rows: dict[str, dict], serve: tuple[str, ...], inputs: Inputs, out: Path) -> dict:
    """Policies served alike (`serve`) in one evaluation (the first with the deployable baselines):
    the same held-out requests and sampling seeds in every group.
    """
    name = "evaluation" + "".join(f"-{s.split('=')[-1]}" for s in serve)
    specs = [f"model:{r['policy']}" for r in rows.values()]
    specs += [] if serve else [f"baseline:{b}" for b in BASELINES]
    args = ["evaluate", "--pctr", str(inputs.pctr), "--json", str(out / f"{name}.json")]
    args += [x for s in specs for x in ("--policy", s)]
    cli([*args, *settings_args(inputs, out, serve)], out / f"{name}.log")
    return json.loads((out / f"{name}.json").read_text())


def _count(n: float | None) -> str:
    return "" if n is None else f"{n:,.0f}"


def _cell(metric: dict) -> str:
    lo, hi = metric["ci"]
    return f"{metric['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def table(rows: dict[str, dict], evaluation: dict) -> list[dict]:
    """One line per row (and baseline, where evaluated): its pairs and the metrics."""
    policies = evaluation["policies"]
    by_spec = {f"model:{r['policy']}": name for name, r in rows.items()}
    by_spec |= {f"baseline:{b}": f"{b} (deployable, ranked by psi_1)" for b in BASELINES}
    return [
        {"row": name, "pairs": rows.get(name, {}).get("pairs"), **{m: policies[spec][m] for m in METRICS}}
        for spec, name in by_spec.items()
        if spec in policies
    ]


def markdown(lines: list[dict], evaluation: dict, inputs: Inputs) -> str:
    head = (
        f"Seed {inputs.seed}, the same {evaluation['requests']} held-out requests and sampling seeds for "
        "every row; each candidate is DPO from pi_0 on epoch 1's psi_1 with one setting changed from "
        "the run's. A row with its own pair set samples it anew from pi_0 and scores it under psi_1 "
        "with the feature store as the run left it (its statistics have moved on since epoch 1): "
        "compare those rows with `as run, pairs sampled again`. Oracle metrics (simulation only); "
        "R = reward under psi_1.\n\n"
        "| row | pairs | oracle revenue | social welfare | ITCTR | ad load | format errors | R (psi_1) |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {line['row']} | {_count(line['pairs'])} | {_cell(line['revenue'])} | "
        + " | ".join(
            f"{line[m]['mean']:{spec}}"
            for m, spec in (
                ("social_welfare", ".3f"),
                ("itctr", ".3f"),
                ("ad_load", ".2f"),
                ("format_error_rate", ".1%"),
                ("reward", ".3f"),
            )
        )
        + " |\n"
        for line in lines
    )
    return head + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="A finished run's folder (make run: runs/local).")
    parser.add_argument("--out", type=Path, help="Output folder (default: RUN/ablation).")
    args = parser.parse_args()
    inputs = run_inputs(args.run)
    out = args.out or args.run / "ablation"
    out.mkdir(parents=True, exist_ok=True)
    chosen = os.environ.get("ABLATION_ROWS")
    rows = [r for r in ROWS if chosen is None or r.name in chosen.split(",") or not r.train]
    results: dict[str, dict] = {}
    start = time.perf_counter()
    for i, row in enumerate(rows, start=1):
        console.print(f"[{i}/{len(rows)}] {row.name} ({time.perf_counter() - start:.0f} s)")
        results[row.name] = train_row(row, inputs, out) if row.train else {"policy": str(inputs.pi0)}
    groups: dict[tuple[str, ...], dict[str, dict]] = {}
    for row in rows:
        groups.setdefault(row.serve, {})[row.name] = results[row.name]
    lines, baselines = [], []
    for serve, members in groups.items():
        console.print(f"evaluating {len(members)} policies ({', '.join(serve) or 'as run'})")
        evaluation = evaluate(members, serve, inputs, out)
        for line in table(members, evaluation):
            (lines if line["row"] in members else baselines).append(line)
    lines += baselines
    (out / "ablation.json").write_text(json.dumps({"rows": lines, "trained": results}, indent=1) + "\n")
    (out / "ablation.md").write_text(markdown(lines, evaluation, inputs))
    grid = Table(title=f"ablation ({time.perf_counter() - start:.0f} s): {out / 'ablation.md'}")
    for column in ("row", "pairs", *METRICS):
        grid.add_column(column)
    for line in lines:
        grid.add_row(line["row"], str(line["pairs"] or ""), *(f"{line[m]['mean']:.3f}" for m in METRICS))
    console.print(grid)


if __name__ == "__main__":
    main()
