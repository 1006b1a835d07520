"""The `llm-auction` command line."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
import yaml
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.table import Table

from llm_auction.baselines import BASELINES, PRICED, make_baseline
from llm_auction.config import ConfigError, Settings, describe_validation_error, load_config
from llm_auction.contracts import Allocator, AuctionRequest
from llm_auction.errors import (
    InputError,
    JudgeError,
    LaunchError,
    PromptFormatError,
    RegistryError,
    UnknownEntityError,
    UnsafeCheckpointError,
)
from llm_auction.evaluation.card import bid_response_line
from llm_auction.mechanism.audits import audit_individual_rationality, audit_monotonicity
from llm_auction.mechanism.metrics import METRICS, Estimate
from llm_auction.public.catalog import HELD_OUT_FILE, Catalog, read_requests
from llm_auction.public.feedback import FeedbackFileError
from llm_auction.simulator.experiment import Environment, build_environment, evaluate_policy
from llm_auction.simulator.oracle import headroom
from llm_auction.simulator.references import ORACLE_REFERENCES, make_reference
from llm_auction.world import generate_world

app = typer.Typer(
    help="Train and serve an LLM whose output distribution is the ad auction.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
world_app = typer.Typer(help="The synthetic advertising world.", no_args_is_help=True)
audit_app = typer.Typer(help="Incentive audits of an allocation rule.", no_args_is_help=True)
policy_app = typer.Typer(help="The policy LLM: build pi_0, sample from a policy.", no_args_is_help=True)
app.add_typer(world_app, name="world")
app.add_typer(audit_app, name="audit")
app.add_typer(policy_app, name="policy")
logs_app = typer.Typer(help="Feedback event logs (impressions and clicks).", no_args_is_help=True)
app.add_typer(logs_app, name="logs")
pctr_app = typer.Typer(help="The pCTR reward model.", no_args_is_help=True)
app.add_typer(pctr_app, name="pctr")
irpo_app = typer.Typer(help="IRPO: pairs, DPO, evaluation and the gate.", no_args_is_help=True)
app.add_typer(irpo_app, name="irpo")
pipeline_app = typer.Typer(help="The irpo-epoch pipeline (kfp.local on this machine).", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
registry_app = typer.Typer(
    help="The MLflow model registry: review, approve, promote, roll back.", no_args_is_help=True
)
app.add_typer(registry_app, name="registry")
canary_app = typer.Typer(
    help="The canary: challenger and champion on live traffic, per-arm metrics, the verdict.",
    no_args_is_help=True,
)
app.add_typer(canary_app, name="canary")

# Wide enough for the metric table when the output is a file or a CI log (rich assumes 80 there).
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, soft_wrap=True)  # a path in an error is never broken across lines

ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML file merged over the profile.")]
ProfileOption = Annotated[str | None, typer.Option("--profile", help="local or cluster.")]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override one key, e.g. --set world.k_candidates=8.")
]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Root seed (world and simulation).")]
WorldOption = Annotated[Path | None, typer.Option("--world", help="A generated world directory.")]
RequestsOption = Annotated[int, typer.Option("--requests", min=1, help="Requests to simulate.")]
JsonOption = Annotated[Path | None, typer.Option("--json", help="Also write the metrics as JSON here.")]
PctrOption = Annotated[
    Path | None,
    typer.Option(
        "--pctr", help="A psi directory: pre/post-generation rank by bid x its pCTR (Feast features)."
    ),
]


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. world.k_candidates=8")
        node = overrides
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else raw
    return overrides


def _settings(
    config: Path | None, profile: str | None, sets: list[str] | None, seed: int | None, **extra: Any
) -> Settings:
    overrides = _parse_sets(sets)
    if seed is not None:
        overrides["seed"] = seed
    for section_key, value in extra.items():
        if value is None:
            continue
        section, key = section_key.split("__")
        overrides.setdefault(section, {})[key] = value
    return load_config(config, profile, overrides=overrides)


def _scorer(settings: Settings, pctr: Path | None):  # noqa: ANN202 (a RewardScorer; torch loads lazily)
    if pctr is None:
        return None
    from llm_auction.reward.scorer import feast_reward_scorer

    if not pctr.is_dir():
        raise InputError(f"--pctr {pctr}: not a directory")
    return feast_reward_scorer(settings, pctr)


def _policy(spec: str, env: Environment, pctr: Path | None = None) -> Allocator:
    """`baseline:NAME` (deployable; pre/post-generation need `--pctr`), `oracle:NAME` or `model:DIR`."""
    kind, _, name = spec.partition(":")
    if kind == "model" and name:
        from llm_auction.policy.allocator import LLMPolicy
        from llm_auction.policy.generation import make_generator
        from llm_auction.reward.scorer import ranker_for
        from llm_auction.simulator.experiment import user_profiles

        generator = make_generator(env.settings.policy.generation, Path(name))
        # psi loads only for the ranking stage: listed as given, a model needs none.
        ecpm = env.settings.policy.ranking == "ecpm"
        ranker = ranker_for(env.settings, _scorer(env.settings, pctr) if ecpm else None)
        return LLMPolicy(generator, user_profiles(env.world), name=spec, ranker=ranker)
    try:
        if kind == "oracle" and name:
            return make_reference(name, env.settings, env.ground_truth)
        if kind == "baseline" and name:
            scorer = _scorer(env.settings, pctr) if name in PRICED else None
            return make_baseline(name, env.settings, scorer)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    raise InputError(
        f"policy: {spec!r} is not a known policy; use baseline:NAME ({', '.join(BASELINES)}), "
        f"oracle:NAME ({', '.join(ORACLE_REFERENCES)}) or model:DIR"
    )


def _requests(env: Environment, n: int, requests_file: Path | None) -> list[AuctionRequest]:
    if requests_file is not None:
        return read_requests(requests_file, env.settings.mechanism.max_bid)[:n]
    available = len(env.world.requests)
    if n > available:
        raise InputError(f"requests: {n} exceeds the {available} requests of the world")
    return env.world.auction_requests(limit=n)


def _fmt(estimate: Estimate) -> str:
    if np.isnan(estimate.mean):
        return "n/a"
    return f"{estimate.mean:.3f} [{estimate.ci[0]:.3f}, {estimate.ci[1]:.3f}]"


def _table(title: str, rows: dict[str, dict[str, Estimate]], columns: tuple[str, ...] = METRICS) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("policy", style="bold", no_wrap=True)
    for metric in columns:
        table.add_column(metric, justify="right", no_wrap=True)
    for policy, metrics in rows.items():
        table.add_row(policy, *(_fmt(metrics[m]) for m in columns))
    return table


def _print_fields(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column summary table (what, value)."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    err_console.print(f"wrote {path}")


@world_app.command("generate")
def world_generate(
    out: Annotated[Path, typer.Option("--out", help="Directory for the parquet tables.")],
    seed: SeedOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Generate a seeded world (advertisers, ads, users, queries, requests) as parquet."""
    settings = _settings(config, profile, sets, seed)
    world = generate_world(settings.world, settings.seed)
    paths = world.save(out)
    rows = [(f"{path.stem} rows", f"{len(getattr(world, path.stem)):,}") for path in paths]
    _print_fields(f"world seed={settings.seed} -> {out}", rows)


@world_app.command("export")
def world_export(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder of the public files (default: the settings' public dir)."),
    ] = None,
    seed: SeedOption = None,
    world: WorldOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Write what a platform would export from the world: catalog, profiles, request files."""
    from llm_auction.simulator.experiment import export_public

    settings = _settings(config, profile, sets, seed)
    paths = export_public(build_environment(settings, world), out)
    _print_fields(f"public side -> {out or settings.public_dir}", [(k, str(v)) for k, v in paths.items()])


@app.command()
def simulate(
    policy: Annotated[str, typer.Option("--policy", help="baseline:NAME")],
    requests: RequestsOption = 1000,
    seed: SeedOption = None,
    json_path: JsonOption = None,
    world: WorldOption = None,
    requests_file: Annotated[
        Path | None, typer.Option("--requests-file", help="JSON lines of auction requests (world ids).")
    ] = None,
    pctr: PctrOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Run one policy on simulated users and report oracle metrics with 95% intervals."""
    settings = _settings(config, profile, sets, seed, world__n_requests=requests if world is None else None)
    env = build_environment(settings, world)
    allocator = _policy(policy, env, pctr)
    _, metrics = evaluate_policy(env, allocator, _requests(env, requests, requests_file), settings.seed)
    console.print(
        _table(f"{policy} on {requests} requests (expected clicks, seed {settings.seed})", {policy: metrics})
    )
    if json_path is not None:
        _write_json(json_path, {"policy": policy, "metrics": {m: metrics[m].to_dict() for m in METRICS}})


@app.command()
def compare(
    requests: RequestsOption = 1000,
    seed: SeedOption = None,
    json_path: JsonOption = None,
    world: WorldOption = None,
    pctr: PctrOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Every baseline on the same requests: deployable ones (psi-ranked, --pctr) and oracle references."""
    settings = _settings(config, profile, sets, seed, world__n_requests=requests if world is None else None)
    env = build_environment(settings, world)
    batch = _requests(env, requests, None)
    specs = [f"baseline:{b}" for b in BASELINES if pctr is not None or b not in PRICED]
    specs += [f"oracle:{r}" for r in ORACLE_REFERENCES]
    rows, rollouts = {}, {}
    with console.status("simulating baselines") as status:
        for spec in specs:
            status.update(f"simulating {spec} on {len(batch)} requests")
            name = spec.partition(":")[2]
            rollouts[name], rows[name] = evaluate_policy(env, _policy(spec, env, pctr), batch, settings.seed)
    title = (
        f"baselines on {len(batch)} requests (expected clicks, seed {settings.seed}; oracle: simulation only)"
    )
    console.print(_table(title, rows))
    m = settings.mechanism
    deployable = {name: rollouts[name] for name in BASELINES if name in rollouts}
    gaps = headroom(rollouts["oracle_greedy"], deployable, m.bootstrap_samples, m.ci_level, settings.seed)
    _print_fields(
        "headroom: oracle_greedy over the best deployable baseline (paired 95% interval)",
        [
            (f"{g.metric} (vs {g.best})", f"x{g.ratio.mean:.3f} [{g.ratio.ci[0]:.3f}, {g.ratio.ci[1]:.3f}]")
            for g in gaps
        ],
    )
    if pctr is None:
        err_console.print(f"{', '.join(PRICED)} rank by bid x pCTR: pass --pctr DIR to include them")
    if json_path is not None:
        payload = {name: {m: metrics[m].to_dict() for m in METRICS} for name, metrics in rows.items()}
        gap_payload = {g.metric: {"best_deployable": g.best, "ratio": g.ratio.to_dict()} for g in gaps}
        _write_json(
            json_path,
            {"requests": len(batch), "seed": settings.seed, "policies": payload, "headroom": gap_payload},
        )


@audit_app.command("monotonicity")
def audit_monotonicity_cmd(
    policy: Annotated[str, typer.Option("--policy", help="baseline:NAME")],
    requests: RequestsOption = 50,
    seed: SeedOption = None,
    world: WorldOption = None,
    pctr: PctrOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Raise each advertiser's bid step by step; report when its expected clicks fall."""
    settings = _settings(config, profile, sets, seed)
    env = build_environment(settings, world)
    m = settings.mechanism
    report = audit_monotonicity(
        _policy(policy, env, pctr),
        _requests(env, requests, None),
        env.click_model,
        m.monotonicity_factors,
        m.monotonicity_samples,
        settings.seed,
        m.max_ads,
        bootstrap_samples=m.bootstrap_samples,
        ci_level=m.ci_level,
    )
    console.print(
        f"{policy}: {len(report.violations)} violations in {report.n_checks} checks "
        f"(rate {report.violation_rate:.4f}, factors {list(m.monotonicity_factors)})"
    )
    console.print(f"  {bid_response_line(report.power(m.monotonicity_samples))}")
    for v in report.violations[:10]:
        console.print(
            f"  {v.request_id} ad {v.ad_index + 1}: bid x{v.factors[0]} -> x{v.factors[1]}, "
            f"clicks {v.clicks[0]:.4f} -> {v.clicks[1]:.4f}"
        )
    if report.violations:
        raise typer.Exit(1)


@audit_app.command("ir")
def audit_ir_cmd(
    policy: Annotated[str, typer.Option("--policy", help="baseline:NAME")],
    requests: RequestsOption = 1000,
    seed: SeedOption = None,
    world: WorldOption = None,
    pctr: PctrOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Check individual rationality of first-price PPC on a simulated impression log (true values)."""
    settings = _settings(config, profile, sets, seed, world__n_requests=requests if world is None else None)
    env = build_environment(settings, world)
    result, _ = evaluate_policy(
        env, _policy(policy, env, pctr), _requests(env, requests, None), settings.seed
    )
    report = audit_individual_rationality(result.impressions)
    console.print(
        f"{policy}: IR {'holds' if report.holds else 'VIOLATED'}; {report.n_impressions} impressions, "
        f"{report.n_overcharged} overcharged; {report.n_truthful_negative_utility} of "
        f"{report.n_truthful_advertisers} advertisers bidding <= value lose money "
        f"(min utility {report.min_truthful_utility:.4f})"
    )
    if not report.holds:
        raise typer.Exit(1)


@logs_app.command("simulate")
def logs_simulate(
    policy: Annotated[str, typer.Option("--policy", help="baseline:NAME or model:DIR")],
    out: Annotated[Path, typer.Option("--out", help="Feedback store folder (impressions/, clicks/).")],
    requests: RequestsOption = 1000,
    offset: Annotated[int, typer.Option("--offset", min=0, help="First request of the stream to serve.")] = 0,
    name: Annotated[
        str | None, typer.Option("--name", help="Batch name (default: the request range).")
    ] = None,
    seed: SeedOption = None,
    world: WorldOption = None,
    pctr: PctrOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Serve requests with a policy to simulated users and log the request, impression and click events."""
    from llm_auction.public.feedback import request_rows, write_feedback
    from llm_auction.simulator.feedback import feedback_logs

    settings = _settings(config, profile, sets, seed)
    env = build_environment(settings, world)
    available = len(env.world.requests) - offset
    if requests > available:
        raise InputError(f"requests: {requests} from offset {offset} exceeds the {available} requests left")
    batch = env.world.auction_requests(limit=requests, offset=offset)
    allocator = _policy(policy, env, pctr)
    result, metrics = evaluate_policy(env, allocator, batch, settings.seed + offset)
    timestamps = env.world.requests.set_index("request_id")["timestamp"]
    impressions, clicks = feedback_logs(
        result, batch, timestamps, policy, np.random.default_rng([settings.seed, offset, 5])
    )
    log = request_rows(batch, [timestamps[r.request_id] for r in batch])
    paths = write_feedback(out, name or f"r{offset:07d}-{offset + requests:07d}", impressions, clicks, log)
    console.print(
        f"{policy}: {len(batch)} requests, {len(impressions)} impressions, {len(clicks)} clicks "
        f"({timestamps[batch[0].request_id]} .. {timestamps[batch[-1].request_id]}) -> "
        + ", ".join(str(p) for p in paths)
    )
    console.print(_table("oracle metrics of this traffic", {policy: metrics}))


@logs_app.command("export")
def logs_export(
    store: Annotated[Path, typer.Option("--store", help="The collector's store folder.")],
    out: Annotated[Path, typer.Option("--out", help="Feedback store folder (impressions/, clicks/).")],
    name: Annotated[str, typer.Option("--name", help="Batch name (a file per kind).")] = "collector",
) -> None:
    """Write what the collector received as a feedback batch that `llm-auction ingest` reads."""
    from llm_auction.serving.collector import DB_FILE, EventStore
    from llm_auction.serving.export import export_feedback

    if not (store / DB_FILE).is_file():
        raise InputError(f"--store {store}: no {DB_FILE}; is it a collector's store?")
    paths = export_feedback(EventStore(store), out, name)
    console.print("wrote " + ", ".join(str(p) for p in paths))


WINDOW_EXAMPLE = "2026-01-01T00:00/2026-01-01T01:00"


def _window(window: str) -> tuple[Any, Any]:
    from llm_auction.features.ingest import to_utc

    try:
        start, end = (to_utc(part) for part in window.split("/"))
    except ValueError:
        raise InputError(f"--window {window!r}: expected START/END, e.g. {WINDOW_EXAMPLE}") from None
    if not start < end:
        raise InputError(f"--window {window!r}: START must be before END")
    return start, end


@app.command()
def ingest(
    window: Annotated[
        str,
        typer.Option(
            "--window", help=f"START/END in ISO 8601, UTC when no zone is given, e.g. {WINDOW_EXAMPLE}."
        ),
    ],
    feedback: Annotated[
        Path, typer.Option("--feedback", help="Feedback store folder (impressions/, clicks/).")
    ],
    catalog: Annotated[
        Path | None,
        typer.Option("--catalog", help="Folder of the platform's ads/users parquet (default: public dir)."),
    ] = None,
    json_path: JsonOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Ingest one feedback window into Feast: validate, label, upsert entities, update stats, materialize."""
    from llm_auction.features.encoder import encoder_for
    from llm_auction.features.ingest import ingest_window
    from llm_auction.features.store import open_store

    start, end = _window(window)
    if not feedback.is_dir():
        raise InputError(f"--feedback {feedback}: not a folder")
    settings = _settings(config, profile, sets, None)
    tables = Catalog.load(catalog or settings.public_dir)
    encoder = encoder_for(settings)
    report = ingest_window(
        open_store(settings), settings, feedback, tables.users, tables.ads, start, end, encoder
    )
    encoder.flush()
    _print_fields(f"ingest {report.window}", [(k, str(v)) for k, v in dataclasses.asdict(report).items()])
    if json_path is not None:
        _write_json(json_path, json.loads(json.dumps(dataclasses.asdict(report), default=str)))


@pctr_app.command("train")
def pctr_train(
    out: Annotated[Path, typer.Option("--out", help="Directory for the pCTR model (safetensors + config).")],
    window: Annotated[
        str | None, typer.Option("--window", help="Train on impressions in START/END only (default: all).")
    ] = None,
    json_path: JsonOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Train psi on the point-in-time training set of the ingested feedback; log and register it."""
    from llm_auction.features.encoder import encoder_for
    from llm_auction.features.ingest import labeled_impressions
    from llm_auction.features.retrieval import pctr_inputs, training_frame
    from llm_auction.features.store import open_store
    from llm_auction.reward.training import train_and_register

    settings = _settings(config, profile, sets, None)
    start, end = _window(window) if window else (None, None)
    labeled = labeled_impressions(settings, start, end)
    if labeled.empty:
        raise InputError("window: no labeled impressions; run `llm-auction ingest` first")
    frame = pctr_inputs(training_frame(open_store(settings), labeled, settings.features))
    encoder = encoder_for(settings)
    lineage = {"window": window or "all", "rows": len(frame)}
    _, card = train_and_register(settings, frame, encoder, out, lineage)
    encoder.flush()
    keys = ("rows", "click_rate", "epochs", "best_epoch", "test_n", "test_auc", "test_log_loss", "test_ece")
    rows = [(k, f"{card[k]:.4f}" if isinstance(card[k], float) else str(card[k])) for k in keys]
    rows += [
        (
            f"position {position}: predicted / observed (n)",
            f"{c['predicted']:.3f} / {c['observed']:.3f} ({c['n']})",
        )
        for position, c in card["calibration_by_position"].items()
    ]
    if "registered_version" in card:
        rows.append(("registered", f"{settings.pctr.registered_model} v{card['registered_version']}"))
    rows.append(("gate", f"{card['gate']['decision']}: {card['gate']['reason']}"))
    _print_fields(f"pCTR -> {out}", rows)
    if json_path is not None:
        _write_json(json_path, card)


@policy_app.command("init")
def policy_init(
    out: Annotated[Path, typer.Option("--out", help="Directory for pi_0 (safetensors + tokenizer).")],
    seed: SeedOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Tokenizer + base model + SFT on bid-blind imitation responses -> pi_0 (reads the public files)."""
    from llm_auction.public.catalog import SYNTHETIC_FILE

    settings = _settings(config, profile, sets, seed)
    public, max_bid = settings.public_dir, settings.mechanism.max_bid
    train, held_out = (
        read_requests(public / SYNTHETIC_FILE, max_bid),
        read_requests(public / HELD_OUT_FILE, max_bid),
    )
    profiles = Catalog.load(public).profiles()
    from llm_auction.policy.warm_start import init_policy  # torch and TRL: after the inputs are known good

    card = init_policy(settings, train, held_out, profiles, out)
    held, sft = card["held_out"], card["sft"]
    rows = [
        ("parameters", f"{card['parameters']:,}"),
        ("vocabulary", f"{card['vocab_size']:,}"),
        ("SFT requests / steps", f"{sft['requests']:,} / {sft['steps']:,}"),
        ("SFT seconds", f"{sft['seconds']:.1f}"),
        ("SFT loss first -> last", f"{sft['first_loss']:.3f} -> {sft['last_loss']:.3f}"),
        ("held-out requests", f"{held['requests']:,}"),
        ("held-out well-formed rate", f"{held['well_formed_rate']:.3f}"),
        ("held-out ads per response", f"{held['mean_ads']:.2f}"),
        ("held-out format errors", json.dumps(held["format_errors"])),
        ("bid-selection correlation (0 = bid-blind)", f"{held['bid_selection_corr']:+.3f}"),
        ("selected / candidate mean bid (1 = bid-blind)", f"{held['selected_bid_ratio']:.3f}"),
    ]
    _print_fields(f"pi_0 -> {out}", rows)


@policy_app.command("sample")
def policy_sample(
    model: Annotated[Path, typer.Option("--model", help="A policy directory (safetensors).")],
    requests: RequestsOption = 64,
    m: Annotated[int, typer.Option("--m", min=1, max=64, help="Responses per prompt.")] = 4,
    json_path: JsonOption = None,
    seed: SeedOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Sample M responses for each of N held-out requests (the public file) and report their format."""
    import time

    from llm_auction.mechanism.diagnostics import format_report
    from llm_auction.policy.allocator import prompts_for
    from llm_auction.policy.generation import make_generator

    settings = _settings(config, profile, sets, seed)
    held_out = read_requests(settings.public_dir / HELD_OUT_FILE, settings.mechanism.max_bid)
    if requests > len(held_out):
        raise InputError(f"requests: {requests} exceeds the {len(held_out)} held-out requests")
    batch = held_out[:requests]
    generator = make_generator(settings.policy.generation, model)
    start = time.perf_counter()
    samples = generator.generate(
        prompts_for(batch, Catalog.load(settings.public_dir).profiles()), m, settings.seed
    )
    seconds = time.perf_counter() - start
    flat_requests = [r for r in batch for _ in range(m)]
    report = format_report(flat_requests, [s for group in samples for s in group], settings.mechanism.max_ads)
    console.print(
        f"{requests} prompts x {m} samples in {seconds:.2f}s ({requests * m / seconds:.1f} responses/s); "
        f"well-formed {report['well_formed_rate']:.3f}, {report['mean_ads']:.2f} ads per response, "
        f"errors {report['format_errors']}"
    )
    if json_path is not None:
        _write_json(
            json_path,
            {
                "model": str(model),
                "m": m,
                "seed": settings.seed,
                "seconds": seconds,
                **report,
                "samples": [{"request_id": r.request_id, "responses": s} for r, s in zip(batch, samples)],
            },
        )


@app.command()
def evaluate(
    policies: Annotated[
        list[str], typer.Option("--policy", help="baseline:NAME or model:DIR; repeat to compare.")
    ],
    pctr: Annotated[
        Path | None, typer.Option("--pctr", help="pCTR model: adds R, the reward model's estimate.")
    ] = None,
    requests: Annotated[
        int | None, typer.Option("--requests", min=1, help="Held-out requests (all).")
    ] = None,
    seed: SeedOption = None,
    json_path: JsonOption = None,
    world: WorldOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Policies on the held-out requests: R under psi beside the simulator's oracle metrics (same samples)."""
    import pandas as pd

    from llm_auction.evaluation.offline import price_responses, reward_model_metrics, sample_responses
    from llm_auction.simulator import oracle

    settings = _settings(config, profile, sets, seed)
    env = build_environment(settings, world)
    held_out = read_requests(settings.public_dir / HELD_OUT_FILE, settings.mechanism.max_bid)[:requests]
    scorer = _scorer(settings, pctr)
    responses = {
        spec: sample_responses(_policy(spec, env, pctr), held_out, settings.seed) for spec in policies
    }
    frame = pd.DataFrame(
        [
            {"policy": spec, "request_id": r.request_id, "response": y}
            for spec, ys in responses.items()
            for r, y in zip(held_out, ys)
        ]
    )
    rows = oracle.oracle_metrics(
        env, oracle.oracle_rollouts(env, held_out, frame, settings.seed), settings.seed
    )
    if scorer is not None:
        for spec, ys in responses.items():
            psi = reward_model_metrics(price_responses(scorer, held_out, ys), settings, settings.seed)
            rows[spec] = {"reward": psi["reward"], **rows[spec]}
    columns = (("reward",) if scorer else ()) + METRICS
    title = f"{len(held_out)} held-out requests (seed {settings.seed}): oracle metrics, simulation only"
    console.print(_table(title + ("; reward = R under psi" if scorer else ""), rows, columns))
    if json_path is not None:
        payload = {name: {m: metrics[m].to_dict() for m in columns} for name, metrics in rows.items()}
        _write_json(json_path, {"requests": len(held_out), "seed": settings.seed, "policies": payload})


EpochOption = Annotated[int, typer.Option("--epoch", min=1, help="IRPO epoch t (lineage tags).")]


@irpo_app.command("pairs")
def irpo_pairs(
    policy: Annotated[Path, typer.Option("--policy", help="pi_{t-1}: the policy directory to sample.")],
    pctr: Annotated[Path, typer.Option("--pctr", help="psi_t: the pCTR model directory behind R.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for pairs.parquet, samples.parquet, stats.")],
    feedback: Annotated[
        Path | None,
        typer.Option("--feedback", help="Feedback store: its request log gives the online prompts."),
    ] = None,
    window: Annotated[
        str | None, typer.Option("--window", help="Only the request log of START/END (default: all of it).")
    ] = None,
    prompts: Annotated[int | None, typer.Option("--prompts", min=1, help="Prompts (irpo.n_prompts).")] = None,
    m: Annotated[int | None, typer.Option("--m", min=1, max=64, help="Samples M (irpo.m_samples).")] = None,
    delta_th: Annotated[
        float | None, typer.Option("--delta-th", min=0.0, help="Reward gap of a loser (irpo.delta_th).")
    ] = None,
    epoch: EpochOption = 1,
    json_path: JsonOption = None,
    seed: SeedOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Sample M responses per prompt from pi_{t-1}, score them with R, keep winner/loser pairs."""
    from llm_auction.pipeline.steps import preferences

    if feedback is not None and not feedback.is_dir():
        raise InputError(f"--feedback {feedback}: not a folder")
    start, end = (part.isoformat() for part in _window(window)) if window else ("", "")
    if not window:
        start, end = "1970-01-01T00:00:00+00:00", "2200-01-01T00:00:00+00:00"
    settings = _settings(
        config, profile, sets, seed, irpo__n_prompts=prompts, irpo__m_samples=m, irpo__delta_th=delta_th
    )
    stats = preferences.build_preferences(
        settings.model_dump_json(),
        str(policy),
        str(pctr),
        str(feedback or ""),
        start,
        end,
        str(out),
        epoch,
        "",
    )
    keys = (
        "prompts", "pairs", "prompts_with_pairs", "share_prompts_without_pair", "pairs_per_prompt_mean",
        "gap_p10", "gap_p50", "gap_p90", "reward_sampled_mean", "reward_chosen_mean", "reward_rejected_mean",
    )  # fmt: skip
    _print_fields(f"preference pairs -> {out}", [(k, f"{stats[k]:.4g}") for k in keys])
    if json_path is not None:
        _write_json(json_path, stats)


def _without_option(argv: list[str], name: str) -> list[str]:
    """`argv` less one `--name VALUE` / `--name=VALUE` option (to relaunch a command under torchrun)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == name:
            skip = True
        elif not item.startswith(f"{name}="):
            out.append(item)
    return out


@irpo_app.command("dpo")
def irpo_dpo(
    policy: Annotated[Path, typer.Option("--policy", help="pi_{t-1}: policy to improve, and the reference.")],
    pairs: Annotated[Path, typer.Option("--pairs", help="Pair set: `irpo pairs` folder or parquet.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for pi_t (merged) and its LoRA adapter.")],
    nproc: Annotated[
        int | None,
        typer.Option("--nproc", min=1, help="Processes under torchrun (irpo.distributed.nproc_per_node)."),
    ] = None,
    epoch: EpochOption = 1,
    pctr_version: Annotated[str | None, typer.Option("--pctr-version", help="psi_t version.")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="Stop after N steps.")] = None,
    settings_json: Annotated[
        Path | None,
        typer.Option("--settings-json", help="Resolved settings (what a pipeline step passes on)."),
    ] = None,
    parent_run_id: Annotated[
        str | None, typer.Option("--parent-run-id", help="The epoch's MLflow run.")
    ] = None,
    base_version: Annotated[
        str | None,
        typer.Option("--base-version", help="Registry version of --policy (the adapter's base), if any."),
    ] = None,
    json_path: JsonOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """DPO (Eq. 6) with TRL and LoRA; one process, or N under torchrun (gloo on CPU, NCCL on GPUs)."""
    from llm_auction.irpo.launch import run_torchrun
    from llm_auction.pipeline.steps.common import is_main_process
    from llm_auction.pipeline.steps.dpo import dpo_step

    if settings_json is not None:
        settings = Settings.model_validate_json(settings_json.read_text())
    else:
        settings = _settings(config, profile, sets, None)
    n = nproc or settings.irpo.distributed.nproc_per_node
    if n > 1 and "LOCAL_RANK" not in os.environ:
        err_console.print(f"launching {n} processes with torchrun")
        run_torchrun(n, _without_option(sys.argv[1:], "--nproc"))
        return
    lineage = {
        "epoch": epoch,
        **({"pctr_version": pctr_version} if pctr_version else {}),
        **({"parent_run_id": parent_run_id} if parent_run_id else {}),
        **({"base_version": base_version} if base_version else {}),
    }
    summary = dpo_step(settings, policy, pairs, out, lineage, max_steps)
    if not is_main_process():
        return
    keys = (
        "pairs",
        "prompts",
        "steps",
        "world_size",
        "trainable_parameters",
        "seconds",
        "first_loss",
        "last_loss",
    )
    rows = [(k, f"{summary[k]:.4g}" if isinstance(summary[k], float) else str(summary[k])) for k in keys]
    if "registered_version" in summary:
        rows.append(("registered", f"{settings.irpo.registered_model} v{summary['registered_version']}"))
    _print_fields(f"DPO -> {out}", rows)
    if json_path is not None:
        _write_json(json_path, summary)


@irpo_app.command("evaluate")
def irpo_evaluate(
    candidate: Annotated[Path, typer.Option("--candidate", help="pi_t: the policy directory to evaluate.")],
    champion: Annotated[Path, typer.Option("--champion", help="The serving champion's policy directory.")],
    pctr: Annotated[Path, typer.Option("--pctr", help="psi_t: the reward model the gain is measured with.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for evaluation.json, plots and report.html.")],
    reference: Annotated[
        Path | None, typer.Option("--reference", help="pi_{t-1} for the drift KL (default: the champion).")
    ] = None,
    epoch: EpochOption = 1,
    json_path: JsonOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Candidate vs champion vs baselines on held-out requests under psi; audits, drift, the gate."""
    from llm_auction.pipeline.steps import evaluate as evaluate_step

    settings_json = _settings(config, profile, sets, None).model_dump_json()
    summary = evaluate_step.evaluate(
        settings_json, str(candidate), str(champion), str(pctr), str(out), epoch, "", "", str(reference or "")
    )
    _print_gate(summary["gate"])
    if json_path is not None:
        _write_json(json_path, summary)


def _print_gate(gate: dict[str, Any]) -> None:
    table = Table(title=f"offline gate: {gate['reason']}", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("check", "value", "bound", "result"):
        table.add_column(column, justify="left" if column == "check" else "right")
    for c in gate["checks"]:
        table.add_row(
            c["name"], f"{c['value']:.4g}", f"{c['op']} {c['bound']:.4g}", "pass" if c["passed"] else "FAIL"
        )
    console.print(table)


@irpo_app.command("gate")
def irpo_gate(
    evaluation: Annotated[Path, typer.Option("--evaluation", help="The folder `irpo evaluate` wrote.")],
    version: Annotated[str, typer.Option("--version", help="The candidate's version in the registry.")],
    by: Annotated[str, typer.Option("--by", help="Who promotes (recorded in the tags).")] = "irpo-pipeline",
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Write the review card and tags onto the version; it enters the canary when the gate passes."""
    from llm_auction.evaluation.card import EVALUATION_FILE
    from llm_auction.pipeline.steps.gate import gate_step

    path = evaluation / EVALUATION_FILE
    if not path.is_file():
        raise InputError(
            f"--evaluation {evaluation}: no {EVALUATION_FILE}; run `llm-auction irpo evaluate` first"
        )
    decision = gate_step(_settings(config, profile, sets, None), json.loads(path.read_text()), version, by)
    _print_gate(decision)
    if not decision["admitted"]:
        raise typer.Exit(3)


@pipeline_app.command("run")
def pipeline_run(
    epoch: EpochOption,
    window: Annotated[
        str, typer.Option("--window", help=f"The feedback window START/END, e.g. {WINDOW_EXAMPLE}.")
    ],
    feedback: Annotated[
        Path, typer.Option("--feedback", help="Feedback store folder (impressions/, clicks/).")
    ],
    policy: Annotated[
        str,
        typer.Option(
            "--policy",
            help="pi_{t-1}: a models:/ URI or a policy folder; default: irpo.start_policy (champion, head).",
        ),
    ] = "",
    root: Annotated[Path, typer.Option("--root", help="kfp.local pipeline root (step outputs).")] = Path(
        "runs/local/pipeline"
    ),
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """One IRPO epoch through kfp.local.SubprocessRunner(use_venv=False): the cluster's pipeline."""
    from llm_auction.pipeline.local import run_local

    start, end = _window(window)
    if not feedback.is_dir():
        raise InputError(f"--feedback {feedback}: not a folder")
    settings = _settings(config, profile, sets, None)
    clock = run_local(
        root.resolve(),
        epoch=epoch,
        window_start=start.isoformat(),
        window_end=end.isoformat(),
        feedback_dir=str(feedback.resolve()),
        policy_uri=policy,
        profile=settings.profile,
        config_path=str(config.resolve()) if config else "",
        overrides=yaml.safe_dump(_parse_sets(sets)) if sets else "",
    )
    table = Table(title="irpo-epoch steps", box=box.SIMPLE_HEAVY)
    for column in ("step", "status", "seconds"):
        table.add_column(column)
    for task, seconds in clock.seconds.items():
        table.add_row(task, clock.status.get(task, ""), f"{seconds:.1f}")
    console.print(table)
    console.print(f"epoch {epoch}: pipeline finished; step outputs under {root}")


@app.command()
def collector(
    store: Annotated[Path, typer.Option("--store", help="Folder of the event store (SQLite, WAL).")],
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8080,
    token_env: Annotated[
        str, typer.Option("--token-env", help="Environment variable with the bearer token (unset: no auth).")
    ] = "LLM_AUCTION_COLLECTOR_TOKEN",
    max_body_bytes: Annotated[
        int, typer.Option("--max-body-bytes", min=1, help="Largest request body.")
    ] = 1_000_000,
) -> None:
    """Serve the feedback collector: inference-logger CloudEvents and clicks, acknowledged once durable."""
    import uvicorn

    from llm_auction.serving.arm_metrics import ArmMetrics
    from llm_auction.serving.collector import EventStore, create_app

    token = os.environ.get(token_env) or None
    events = EventStore(store)
    app_ = create_app(events, token, max_body_bytes, [ArmMetrics(events)])
    err_console.print(f"collector on http://{host}:{port} (store {store}, auth {'on' if token else 'off'})")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "--http_port", min=1, max=65535, help="TCP port.")] = 8080,
    model_dir: Annotated[
        Path | None,
        typer.Option("--model-dir", help="Serve this policy directory (default: the registry's champion)."),
    ] = None,
    transformer: Annotated[
        bool,
        typer.Option(
            "--transformer", help="Run as the InferenceService's transformer: generation is the predictor's."
        ),
    ] = False,
    predictor_host: Annotated[
        str | None,
        typer.Option(
            "--predictor-host",
            "--predictor_host",
            help="The OpenAI-compatible predictor (host:port or URL); KServe passes it to a transformer.",
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option("--model-name", "--model_name", help="Model name (default: config).")
    ] = None,
    logger_url: Annotated[
        str | None, typer.Option("--logger-url", help="Collector URL for inference CloudEvents.")
    ] = None,
    batching: Annotated[
        bool | None, typer.Option("--batching/--no-batching", help="Dynamic batching (default: config).")
    ] = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Serve the policy: KServe V1 predict, V2 health, OpenAI-compatible completions; follows the champion."""
    from llm_auction.serving.server import serve as run_server

    settings = _settings(
        config, profile, sets, None, serving__logger_url=logger_url, serving__model_name=model_name
    )
    if model_dir is not None and not model_dir.is_dir():
        raise InputError(f"--model-dir {model_dir}: not a directory")
    if transformer != (predictor_host is not None):
        raise InputError("--transformer and --predictor-host go together (KServe passes the host)")
    predictor_url = None
    if predictor_host is not None:
        predictor_url = predictor_host if "://" in predictor_host else f"http://{predictor_host}"
    token = os.environ.get(settings.serving.token_env) or None
    err_console.print(
        f"policy server on http://{host}:{port} (model {settings.serving.model_name}, "
        f"{'transformer of ' + predictor_url if predictor_url else 'in-process policy'}, "
        f"auth {'on' if token else 'off'}, logger {settings.serving.logger_url or 'off'})"
    )
    run_server(settings, host, port, model_dir, predictor_url, batching, token)


@app.command()
def traffic(
    endpoint: Annotated[
        str, typer.Option("--endpoint", help="The policy server, e.g. http://127.0.0.1:8080.")
    ],
    collector_url: Annotated[
        str | None, typer.Option("--collector", help="The collector for clicks, e.g. http://127.0.0.1:8081.")
    ] = None,
    requests: Annotated[int, typer.Option("--requests", min=1, help="Requests to send.")] = 500,
    offset: Annotated[int, typer.Option("--offset", min=0, help="First request of the world's stream.")] = 0,
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", min=1, help="Requests in flight (default: loop.concurrency)."),
    ] = None,
    json_path: JsonOption = None,
    seed: SeedOption = None,
    world: WorldOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Send the world's requests to the endpoint; simulated users click; clicks go to the collector."""
    import asyncio

    from llm_auction.simulator.traffic import send_traffic

    settings = _settings(config, profile, sets, seed, loop__concurrency=concurrency)
    env = build_environment(settings, world)
    batch = env.world.auction_requests(limit=requests, offset=offset)
    if not batch:
        raise InputError(f"--offset {offset}: the stream has only {len(env.world.requests)} requests")
    report = asyncio.run(
        send_traffic(
            endpoint,
            batch,
            env.click_model,
            collector=collector_url,
            model_name=settings.serving.model_name,
            concurrency=settings.loop.concurrency,
            seed=settings.seed,
            mean_click_delay_s=settings.loop.mean_click_delay_s,
            retry_budget_s=settings.loop.retry_budget_s,
            token=os.environ.get(settings.serving.token_env) or None,
            collector_token=os.environ.get(settings.serving.logger_token_env) or None,
        )
    )
    rows = [
        (
            "sent / served / rejected / failed",
            f"{report.sent} / {report.served} / {report.rejected} / {report.failed}",
        ),
        (
            "impressions / clicks (acknowledged)",
            f"{report.impressions} / {report.clicks} ({report.clicks_acknowledged})",
        ),
        ("realised revenue (bids of clicks)", f"{report.revenue:.2f}"),
        ("throughput", f"{report.throughput:.1f} req/s"),
        ("latency p50 / p99", f"{report.latency_p50_ms:.0f} / {report.latency_p99_ms:.0f} ms"),
        ("policy versions", json.dumps(report.policy_versions)),
    ]
    _print_fields(f"traffic -> {endpoint}", rows)
    for error in report.errors[:5]:
        err_console.print(f"  {error}", highlight=False, markup=False)
    if json_path is not None:
        _write_json(json_path, report.to_dict())
    if report.failed or report.rejected:
        raise typer.Exit(1)


@app.command("run")
def run_closed_loop(
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=0, help="IRPO epochs after the bootstrap (default 3).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder of the run (stores, logs, report).")] = Path(
        "runs/local"
    ),
    pi0: Annotated[
        Path | None,
        typer.Option("--pi0", help="Start from this pi_0 (a `policy init` output) instead of a warm start."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the interrupted run in --out from its last finished phase."),
    ] = False,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """The closed loop: pi_0 and psi_0, then each epoch: serve the champion, traffic, irpo-epoch."""
    from llm_auction.simulator.loop import TIMING_COLUMNS, run_loop, timing_rows

    report = run_loop(epochs, out, config, profile, _parse_sets(sets) or None, pi0, resume=resume)
    metrics = ("revenue", "social_welfare", "itctr", "ad_load")
    table = Table(title=f"closed loop -> {out}/report.json", box=box.SIMPLE_HEAVY)
    for column in ("epoch", "version", *metrics, "offline gate", "canary"):
        table.add_column(column, justify="right")
    for entry in report["epochs"]:
        gate = entry["gate"]
        cells = [
            f"{entry['policy'][m]['mean']:.3f}"
            if entry["policy"].get(m, {}).get("mean") is not None
            else "n/a"
            for m in metrics
        ]
        verdict = "" if gate is None else ("admitted" if gate["admitted"] else "held")
        canary = (entry.get("canary") or {}).get("decision", "")
        table.add_row(str(entry["epoch"]), str(entry["policy_version"]), *cells, verdict, canary)
    console.print(table)
    timing = Table(title="where the time went", box=box.SIMPLE_HEAVY)
    for column in TIMING_COLUMNS:
        timing.add_column(column, justify="left" if column in ("phase", "step") else "right")
    for row in timing_rows(report["timings"], report["wall_seconds"]):
        timing.add_row(*row)
    console.print(timing)
    console.print(f"wall time {report['wall_seconds'] / 60:.1f} min; report {out}/report.html")


ModelOption = Annotated[
    str | None, typer.Option("--model", help="Registered model (default: irpo.registered_model).")
]
ByOption = Annotated[str, typer.Option("--by", help="Who does this (recorded in the version's tags).")]


@registry_app.command("show")
def registry_show(
    model: ModelOption = None,
    json_path: JsonOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Versions with their aliases, lineage, offline gate and canary outcome."""
    from llm_auction.tracking import registry

    settings = _settings(config, profile, sets, None)
    info = registry.show(settings.tracking, model or settings.irpo.registered_model)
    table = Table(
        title=f"{info['name']} (champion history {info['champion_history'] or '-'})", box=box.SIMPLE_HEAD
    )
    for column in ("version", "aliases", "epoch", "admitted", "canary", "created", "run"):
        table.add_column(column)
    for v in info["versions"]:
        tags = v["tags"]
        table.add_row(
            v["version"], ",".join(v["aliases"]), tags.get("lineage.epoch", ""),
            tags.get("gate.admitted", ""), tags.get("canary.status", ""), v["created"], v["run_id"] or "",
        )  # fmt: skip
    console.print(table)
    if json_path is not None:
        _write_json(json_path, info)


@registry_app.command("approve")
def registry_approve(
    version: Annotated[str, typer.Option("--version", help="The version to approve.")],
    by: ByOption,
    model: ModelOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Manual gate: tag the version approved=true (the next gate run may then promote it)."""
    from llm_auction.tracking import registry

    settings = _settings(config, profile, sets, None)
    name = model or settings.irpo.registered_model
    registry.approve(settings.tracking, name, version, by)
    console.print(f"{name} v{version}: approved by {by}")


@registry_app.command("promote")
def registry_promote(
    version: Annotated[str, typer.Option("--version", help="The version to make champion.")],
    by: ByOption,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the tags).")],
    model: ModelOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Move the `champion` alias to a version by hand (the gate does this in the pipeline)."""
    from llm_auction.tracking import registry

    settings = _settings(config, profile, sets, None)
    name = model or settings.irpo.registered_model
    previous = registry.promote(settings.tracking, name, version, by, reason)
    console.print(f"{name}: champion v{previous or '-'} -> v{version}")


@registry_app.command("rollback")
def registry_rollback(
    by: ByOption,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the tags).")],
    model: ModelOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Move `champion` back to the version promoted before the current one."""
    from llm_auction.tracking import registry

    settings = _settings(config, profile, sets, None)
    name = model or settings.irpo.registered_model
    current, target = registry.rollback(settings.tracking, name, by, reason)
    console.print(f"{name}: champion v{current} -> v{target} (rolled back by {by}: {reason})")


USER_ERRORS = (
    ConfigError,
    InputError,
    UnknownEntityError,
    FileNotFoundError,
    ValidationError,
    UnsafeCheckpointError,
    PromptFormatError,
    JudgeError,
    LaunchError,
    RegistryError,
    FeedbackFileError,
)


def main() -> None:
    """Entry point: user errors print one line naming the field and exit 2, never a traceback."""
    logging.basicConfig(level=os.environ.get("LLM_AUCTION_LOG_LEVEL", "WARNING"))
    try:
        app()
    except USER_ERRORS as exc:
        message = describe_validation_error(exc, "invalid input") if isinstance(exc, ValidationError) else exc
        err_console.print(f"error: {message}", highlight=False, markup=False)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the last line of defence for users
        if os.environ.get("LLM_AUCTION_DEBUG"):
            raise
        err_console.print(
            f"internal error: {type(exc).__name__}: {exc} (set LLM_AUCTION_DEBUG=1 for the traceback)",
            highlight=False,
            markup=False,
        )
        sys.exit(1)


def _print_canary(result: dict[str, Any]) -> None:
    if result.get("arms") is None:
        console.print(f"canary: {result['reason']} (champion v{result['champion']})")
        return
    table = Table(
        title=f"canary: challenger v{result['challenger']} vs champion v{result['champion']} "
        f"since {result['started_at']}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    columns = (
        "arm",
        "versions",
        "requests",
        "impressions",
        "clicks",
        "revenue / request",
        "ITCTR",
        "ad load",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "arm" else "right")

    def fmt(e: dict[str, Any]) -> str:
        if e["mean"] is None:
            return "n/a"
        lo, hi = e["ci"]
        return f"{e['mean']:.4f}" + ("" if lo is None else f" [{lo:.4f}, {hi:.4f}]")

    for arm, m in result["arms"].items():
        table.add_row(
            arm, ",".join(m["policy_versions"]), str(m["requests"]), str(m["impressions"]), str(m["clicks"]),
            fmt(m["revenue"]), fmt(m["itctr"]), fmt(m["ad_load"]),
        )  # fmt: skip
    console.print(table)

    def band(s: dict[str, Any]) -> str:
        if s["mean"] is None:
            return "n/a"
        lo = "-inf" if s["lo"] is None else f"{s['lo']:+.4f}"
        hi = "+inf" if s["hi"] is None else f"{s['hi']:+.4f}"
        return f"{s['mean']:+.4f} [{lo}, {hi}]"

    console.print(
        f"revenue per request, challenger - champion: {band(result['revenue_difference'])}; "
        f"ITCTR - (1 - {result['itctr_margin']:.0%}) x champion's: {band(result['itctr_noninferiority'])} "
        f"({result['test']}, alpha {result['alpha']})"
    )
    console.print(f"[bold]verdict: {result['decision']}[/bold] — {result['reason']}")


FeedbackDirOption = Annotated[
    Path | None,
    typer.Option("--feedback", help="A feedback store folder (requests/, impressions/, clicks/)."),
]
StoreOption = Annotated[
    Path | None, typer.Option("--store", help="The collector's event store folder (the freshest view).")
]


def _canary_frames(feedback: Path | None, store: Path | None) -> tuple[Any, Any, Any]:
    from llm_auction.pipeline.steps.canary import read_logs
    from llm_auction.serving.collector import DB_FILE, EventStore
    from llm_auction.serving.export import feedback_frames

    if (feedback is None) == (store is None):
        raise InputError("--feedback or --store: give exactly one source of the live traffic's logs")
    if store is not None:
        if not (store / DB_FILE).is_file():
            raise InputError(f"--store {store}: no collector store ({DB_FILE}) there")
        events = EventStore(store)
        try:
            return feedback_frames(events)
        finally:
            events.close()
    assert feedback is not None
    if not feedback.is_dir():
        raise InputError(f"--feedback {feedback}: not a folder")
    return read_logs(feedback)


@canary_app.command("status")
def canary_status_cmd(
    feedback: FeedbackDirOption = None,
    store: StoreOption = None,
    json_path: JsonOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Per-arm online metrics of the running canary and the verdict the next decision would take."""
    from llm_auction.pipeline.steps.canary import canary_status

    settings = _settings(config, profile, sets, None)
    if (feedback is None) == (store is None):
        raise InputError("--feedback or --store: give exactly one source of the live traffic's logs")
    result, _, _ = canary_status(settings, lambda: _canary_frames(feedback, store))
    _print_canary(result)
    if json_path is not None:
        _write_json(json_path, result)


@canary_app.command("decide")
def canary_decide_cmd(
    feedback: Annotated[Path, typer.Option("--feedback", help="The feedback store folder.")],
    out: Annotated[Path, typer.Option("--out", help="Where canary.json and canary.png go.")] = Path("canary"),
    end: Annotated[
        bool, typer.Option("--end", help="No more traffic comes: without a verdict it ends inconclusive.")
    ] = False,
    by: ByOption = "llm-auction-cli",
    config: ConfigOption = None,
    profile: ProfileOption = None,
    sets: SetOption = None,
) -> None:
    """Take the canary's verdict and carry it out (promote, roll back, end inconclusive or keep going)."""
    from llm_auction.pipeline.steps.canary import canary

    settings = _settings(config, profile, sets, None)
    if not feedback.is_dir():
        raise InputError(f"--feedback {feedback}: not a folder")
    _print_canary(canary(settings.model_dump_json(), str(feedback), "", str(out), "", end, by))
