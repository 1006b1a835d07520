"""`llm-auction run`: the closed loop of the paper on this machine.

    bootstrap: world -> pi_0 (SFT, registered champion) -> pi_0 serves traffic -> psi_0
    epoch t:   the server follows the aliases: the champion, and candidate t-1 as the challenger
               for `serving.canary_percent` percent of users -> traffic -> collector
               -> irpo-epoch (kfp.local): the canary's verdict on candidate t-1 (promote or not),
               then pCTR, DPO and the offline gate, which admits candidate t to the next canary
    last:      one more phase of traffic is candidate T's canary, and its verdict -> report

The policy server and the collector are real processes on 127.0.0.1; users are the simulator's
click model; everything the loop writes lives under `--out`. The loop is the simulation's driver
(oracle side): it exports the world's public files as a platform would, then the production parts
(server, collector, pipeline) see only those, and after each epoch the oracle scores the very
responses the pipeline's evaluation sampled (`simulator.oracle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from llm_auction.config import ConfigError, Settings, load_config
from llm_auction.contracts import AuctionRequest
from llm_auction.evaluation.candidate import EVALUATION_FILE, RESPONSES_FILE
from llm_auction.evaluation.report import plot_epoch_curves
from llm_auction.evaluation.report import write_report as write_html
from llm_auction.mechanism.metrics import Estimate
from llm_auction.pipeline import steps
from llm_auction.pipeline.local import run_local
from llm_auction.policy.warm_start import init_policy, register_existing_policy
from llm_auction.public.catalog import HELD_OUT_FILE, SYNTHETIC_FILE, Catalog, read_requests
from llm_auction.serving.collector import EventStore
from llm_auction.serving.export import export_feedback
from llm_auction.simulator.experiment import Environment, build_environment, export_public
from llm_auction.simulator.oracle import ORACLE_LABEL, oracle_metrics, references
from llm_auction.simulator.services import Service, free_port, service, wait_until
from llm_auction.simulator.traffic import TrafficReport, send_traffic
from llm_auction.tracking import registry
from llm_auction.tracking.registry import Versions, current_versions

ORACLE_METRICS = ("revenue", "social_welfare", "itctr", "ad_load", "format_error_rate")
SECTIONS = {
    "policy": ORACLE_LABEL + "; `reward` is R under the epoch's psi_t",
    "reward_model": "psi_t's estimates of the same responses (what production measured)",
    "baselines": "deployable: pre/post-generation ranked by bid x psi_t's pCTR; oracle metrics",
    "oracle_references": "upper references priced with the simulator's truth, never deployable",
}
STATE_DIRS = ("data", "mlflow", "feedback", "collector", "pipeline", "pi0", "pctr0", "quarantine", "logs")


def loop_settings(base: Settings, out: Path) -> Settings:
    """`base` with every store under `out` (absolute, so kfp.local's subprocesses agree)."""
    out = out.resolve()
    data = out / "data"
    return base.model_copy(
        update={
            "data_dir": data,
            "features": base.features.model_copy(
                update={"data_dir": str(data / "features"), "quarantine_dir": out / "quarantine"}
            ),
            "tracking": base.tracking.model_copy(
                update={
                    "uri": f"sqlite:///{out}/mlflow/mlflow.db",
                    "artifact_location": str(out / "mlflow" / "artifacts"),
                }
            ),
        }
    )


def sign_up(settings: Settings, feedback_dir: Path) -> None:
    """Users and ads enter the feature store before anyone is served: an ingest of no events."""
    feedback_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    steps.ingest(settings.model_dump_json(), str(feedback_dir), str(now - timedelta(hours=1)), str(now), "")


def server_work(endpoint: str) -> dict[str, float]:
    """The server's cumulative work (`/metrics`): seconds per stage, responses, characters, priced ads."""
    text = httpx.get(f"{endpoint}/metrics", timeout=10).text
    work: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llm_auction_stage_seconds_sum":
                work[f"{sample.labels['stage']}_s"] = sample.value
            elif sample.name == "llm_auction_generated_total":
                work[sample.labels["what"]] = sample.value
    return work


@dataclass(frozen=True)
class TrafficPlan:
    """Which requests of the stream each phase sends: after pi_0's SFT set, before the held-out end."""

    bootstrap: list[AuctionRequest]
    epochs: list[list[AuctionRequest]]
    final_canary: list[AuctionRequest]


def plan_traffic(env: Environment, epochs: int) -> TrafficPlan:
    s = env.settings
    start = s.policy.warm_start.n_requests
    end = len(env.world.requests) - s.policy.held_out_requests
    phases = epochs + 1 if epochs else 0  # the last epoch's candidate gets its canary too
    need = s.loop.bootstrap_requests + phases * s.loop.requests_per_epoch
    if start + need > end:
        raise ConfigError(
            f"loop.requests_per_epoch: {epochs} epochs and the last candidate's canary, each of "
            f"{s.loop.requests_per_epoch} requests, and {s.loop.bootstrap_requests} bootstrap requests "
            f"need {need}, but the stream has {end - start} between pi_0's SFT set and the held-out "
            "requests (raise world.n_requests)"
        )
    stream = env.world.auction_requests(limit=need, offset=start)
    b, e = s.loop.bootstrap_requests, s.loop.requests_per_epoch
    chunks = [stream[b + t * e : b + (t + 1) * e] for t in range(phases)]
    return TrafficPlan(stream[:b], chunks[:epochs], chunks[epochs] if epochs else [])


@dataclass
class Timings:
    """Where the loop's wall time went: one row per (phase, step), in the order they ran."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, phase: str, step: str, seconds: float) -> None:
        self.rows.append({"phase": phase, "step": step, "seconds": round(seconds, 2)})

    @contextlib.contextmanager
    def time(self, phase: str, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, step, time.perf_counter() - started)

    def by_phase(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for row in self.rows:
            out[row["phase"]] = out.get(row["phase"], 0.0) + row["seconds"]
        return out


TIMING_COLUMNS = ("phase", "step", "seconds", "share")


def timing_rows(rows: Sequence[Mapping[str, Any]], wall_seconds: float | None = None) -> list[list[str]]:
    """The timing table: every (phase, step), each phase's total, and what no step accounts for."""
    total = wall_seconds or sum(r["seconds"] for r in rows) or 1.0
    out, phases = [], Timings(list(rows)).by_phase()

    def line(phase: str, step: str, seconds: float) -> list[str]:
        return [phase, step, f"{seconds:.1f}", f"{seconds / total:.0%}"]

    for phase, seconds in phases.items():
        steps_of = [r for r in rows if r["phase"] == phase]
        out += [line(phase, r["step"], r["seconds"]) for r in steps_of]
        if len(steps_of) > 1:
            out.append(line(phase, "(phase total)", seconds))
    if wall_seconds is not None:
        out.append(line("", "other (reports, waits between phases)", wall_seconds - sum(phases.values())))
        out.append(line("", "wall time", wall_seconds))
    return out


@contextlib.contextmanager
def stdout_to(log_path: Path) -> Iterator[None]:
    """What libraries print (TRL's step dictionaries, Feast's notices) goes to the run's log file;
    the console keeps the loop's own progress (stderr) and errors.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as sink, contextlib.redirect_stdout(sink):
        yield


class Loop:
    """One closed-loop run under `out`; `run()` returns the report it also writes."""

    def __init__(
        self,
        settings: Settings,
        epochs: int,
        out: Path,
        pi0: Path | None = None,
        console: Console | None = None,
    ) -> None:
        self.out = out.resolve()
        self.pi0 = pi0
        self.settings = loop_settings(settings, self.out)
        self.epochs = epochs
        self.console = console or Console(stderr=True)
        self.config_path = self.out / "config.yaml"
        self.feedback = self.out / "feedback"
        self.collector_store = self.out / "collector"
        self.settings_json = self.settings.model_dump_json()
        self.logs = self.out / "logs"
        self.timings = Timings()

    # --- phases ----------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        self.console.print(f"[bold]{datetime.now().strftime('%H:%M:%S')}[/bold] {text}")

    def prepare(self) -> None:
        if self.out.exists():
            keep = self.pi0.resolve() if self.pi0 is not None else None  # `--pi0 runs/local/pi0` survives
            stale = [
                d
                for d in STATE_DIRS
                if (self.out / d).exists() and not (keep and keep.is_relative_to((self.out / d).resolve()))
            ]
            if stale:
                self._say(f"replacing the previous run in {self.out} ({', '.join(stale)})")
            for d in stale:
                shutil.rmtree(self.out / d)
        self.out.mkdir(parents=True, exist_ok=True)
        self.feedback.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.settings.model_dump(mode="json"), sort_keys=False))

    def export_public(self, env: Environment) -> list[AuctionRequest]:
        """The world's platform files (catalog, profiles, request files); returns the held-out requests."""
        export_public(env)
        self._say(f"public side: catalog, profiles and request files in {self.settings.public_dir}")
        return read_requests(self.settings.public_dir / HELD_OUT_FILE, self.settings.mechanism.max_bid)

    def bootstrap_policy(self, held_out: list[AuctionRequest]) -> str:
        if self.pi0 is not None:
            self._say(f"pi_0: {self.pi0} (no warm start)")
            return register_existing_policy(self.settings, self.pi0)
        self._say("pi_0: SFT warm start of the tiny policy (public request files)")
        public = self.settings.public_dir
        train = read_requests(public / SYNTHETIC_FILE, self.settings.mechanism.max_bid)
        profiles = Catalog.load(public).profiles()
        card = init_policy(self.settings, train, held_out, profiles, self.out / "pi0")
        return str(card["registered_version"])

    def send(
        self,
        endpoint: str,
        collector: str,
        requests: list[AuctionRequest],
        env: Environment,
        seed: int,
        services: Sequence[Service] = (),
    ) -> TrafficReport:
        """One phase of traffic; fails clearly if a service died for good during it."""
        loop = self.settings.loop
        report = asyncio.run(
            send_traffic(
                endpoint,
                requests,
                env.click_model,
                collector=collector,
                model_name=self.settings.serving.model_name,
                concurrency=loop.concurrency,
                seed=seed,
                mean_click_delay_s=loop.mean_click_delay_s,
                retry_budget_s=loop.retry_budget_s,
            )
        )
        for svc in services:
            svc.check()
        if report.served == 0:
            raise RuntimeError(f"no request was served: {report.errors[:3]}")
        if report.failed:
            self._say(f"[yellow]{report.failed} requests failed: {report.errors[:3]}[/yellow]")
        return report

    def collect(self, served_total: int, server_restarts: int = 0) -> None:
        """Wait until the collector holds every served inference, then export the feedback store.

        A server killed with inferences still in its logger's queue never sends them (KServe's
        logger on the cluster loses them the same way): after a restart the shortfall is reported,
        not waited for; without one it is an error.
        """
        store = EventStore(self.collector_store)
        try:
            try:
                wait_until(
                    lambda: len(store.inference_pairs()) >= served_total,
                    "the inference logs to arrive",
                    timeout_s=20 if server_restarts else 120,
                )
            except RuntimeError:
                if not server_restarts:
                    raise
                lost = served_total - len(store.inference_pairs())
                self._say(
                    f"[yellow]{lost} served inferences were never logged: the server was restarted "
                    f"{server_restarts} times with them in its logger's queue[/yellow]"
                )
            export_feedback(store, self.feedback, "collector")
        finally:
            store.close()

    def window(self, traffic: TrafficReport, started: datetime) -> tuple[str, str]:
        last = datetime.fromisoformat(traffic.last_event_at) if traffic.last_event_at else started
        return started.isoformat(), (max(last, datetime.now(UTC)) + timedelta(seconds=1)).isoformat()

    def served_versions(self, endpoint: str) -> dict[str, Any]:
        return httpx.get(f"{endpoint}/served", timeout=5).json()

    def await_arms(self, endpoint: str) -> Versions:
        """Wait until the server serves what the registry's aliases name: the policy's champion and
        challenger, and psi's champion (whose gate may have held the psi just trained).
        """
        versions = current_versions(self.settings)

        def loaded() -> bool:
            served = self.served_versions(endpoint)
            return (
                served["policy_version"],
                served["challenger_version"],
                served["pctr_version"],
            ) == versions

        wait_until(loaded, f"the server to load {versions}")
        return versions

    def run_epoch(
        self, epoch: int, window: tuple[str, str]
    ) -> tuple[dict[str, Any], pd.DataFrame, dict[str, Any]]:
        """One irpo-epoch pipeline run: its evaluation summary, every policy's held-out responses, and
        the canary verdict it took first (on the window's traffic, which ends that canary).
        """
        root = self.out / "pipeline" / f"epoch-{epoch}"
        log = self.logs / f"pipeline-epoch-{epoch}.log"
        self._say(f"  (kfp.local's and the steps' output: {log.relative_to(self.out)})")
        clock = run_local(
            root,
            log,
            epoch=epoch,
            window_start=window[0],
            window_end=window[1],
            feedback_dir=str(self.feedback),
            policy_uri=f"models:/{self.settings.irpo.registered_model}@champion",
            profile=self.settings.profile,
            config_path=str(self.config_path),
            overrides="",
            end_canary=True,
        )
        for task, seconds in clock.seconds.items():
            self.timings.add(f"epoch {epoch}", f"pipeline: {task}", seconds)
        (evaluation,) = root.glob(f"*/evaluate/evaluation/{EVALUATION_FILE}")
        (canary,) = root.glob(f"*/canary/result/{steps.CANARY_FILE}")
        return (
            json.loads(evaluation.read_text()),
            pd.read_parquet(evaluation.parent / RESPONSES_FILE),
            json.loads(canary.read_text()),
        )

    def settle(
        self,
        epoch: int,
        evaluation: Mapping[str, Any],
        oracle: Mapping[str, Mapping[str, Estimate]],
        canary: Mapping[str, Any],
        oracle_refs: Mapping[str, Mapping[str, Estimate]],
        report: dict[str, Any],
    ) -> dict[str, Any]:
        """Epoch `epoch`'s report entry, once live traffic has decided its candidate: the champion
        after that verdict (the candidate if promoted), with the canary's numbers and its plot.
        """
        name = self.settings.irpo.registered_model
        promoted = canary.get("decision") == "promote"
        version = registry.alias_version(self.settings.tracking, name, registry.CHAMPION)
        entry = report_entry(
            epoch, version, evaluation, oracle, oracle_refs, "candidate" if promoted else "champion"
        )
        entry["canary"] = canary_entry(canary)
        plot = next(self.out.glob(f"pipeline/epoch-{epoch + 1}/*/canary/result/{steps.CANARY_PLOT}"), None)
        plot = plot or (self.out / "final-canary" / steps.CANARY_PLOT)
        if plot.is_file():
            shutil.copyfile(plot, self.out / f"canary-epoch-{epoch}.png")
        return entry

    def run(self) -> dict[str, Any]:
        started_all = time.perf_counter()
        clock = self.timings.time
        self.prepare()
        with clock("bootstrap", "world and public files"):
            env = build_environment(self.settings)
            plan = plan_traffic(env, self.epochs)
            held_out = self.export_public(env)
        with clock("bootstrap", "pi_0"), stdout_to(self.logs / "pi0.log"):
            self.bootstrap_policy(held_out)
        self._say("oracle references (simulation only) on the held-out requests")
        with clock("bootstrap", "oracle references"):
            oracle_refs = references(env, held_out, self.settings.seed)
        self._say("feature store: users and ads sign up")
        with clock("bootstrap", "sign-up (Feast)"), stdout_to(self.logs / "bootstrap.log"):
            sign_up(self.settings, self.feedback)
        collector_port, server_port = free_port(), free_port()
        collector = f"http://127.0.0.1:{collector_port}"
        endpoint = f"http://127.0.0.1:{server_port}"
        logs = self.logs
        report: dict[str, Any] = {"sections": SECTIONS, "epochs": [], "traffic": [], "out": str(self.out)}
        report["timings"] = self.timings.rows
        services_started = time.perf_counter()
        with (
            service(
                "collector",
                ["collector", "--store", str(self.collector_store), "--port", str(collector_port)],
                f"{collector}/healthz",
                logs,
                restarts=self.settings.loop.service_restarts,
            ) as collector_service,
            service(
                "server",
                [
                    "serve",
                    "--config",
                    str(self.config_path),
                    "--port",
                    str(server_port),
                    "--logger-url",
                    f"{collector}/v1/events",
                ],
                f"{endpoint}/v2/health/ready",
                logs,
                restarts=self.settings.loop.service_restarts,
            ) as server,
        ):
            services = (collector_service, server)
            self.timings.add("bootstrap", "services start", time.perf_counter() - services_started)
            served_total, work = 0, {}

            def phase(name: str, requests: list[AuctionRequest], seed: int) -> tuple[str, str]:
                """One phase of traffic, logged and exported; its window, and its line in the report."""
                nonlocal served_total, work
                started = datetime.now(UTC) - timedelta(seconds=1)
                with clock(name.replace("-", " "), "traffic"):
                    traffic = self.send(endpoint, collector, requests, env, seed=seed, services=services)
                    served_total += traffic.served
                    self.collect(served_total, server.restarts)
                window = self.window(traffic, started)
                before, work = work, server_work(endpoint)
                # A restarted server counts from 0 again: its counters are then this phase's work.
                phase_work = {
                    k: v - before.get(k, 0.0) if v >= before.get(k, 0.0) else v for k, v in work.items()
                }
                report["traffic"].append(
                    {"phase": name, "window": window, **traffic.to_dict(), "server": phase_work}
                )
                return window

            self._say(f"bootstrap: pi_0 serves {len(plan.bootstrap)} requests")
            window = phase("bootstrap", plan.bootstrap, seed=0)
            self._say("psi_0: pCTR on pi_0's traffic")
            with stdout_to(self.logs / "bootstrap.log"):
                with clock("bootstrap", "ingest"):
                    steps.ingest(self.settings_json, str(self.feedback), *window, "")
                with clock("bootstrap", "psi_0 (pCTR)"):
                    steps.train_pctr(self.settings_json, str(self.out / "pctr0"), *window, 0, "")
            pending: tuple[int, dict[str, Any], dict[str, Any]] | None = None  # awaiting its canary
            for epoch in range(1, self.epochs + 1):
                with clock(f"epoch {epoch}", "serving follows the registry"):
                    arms = self.await_arms(endpoint)
                canary_note = "" if arms.challenger is None else (
                    f", candidate v{arms.challenger} in canary for {self.settings.serving.canary_percent}% "
                    "of users"
                )  # fmt: skip
                requests = plan.epochs[epoch - 1]
                self._say(
                    f"epoch {epoch}: champion v{arms.champion} serves {len(requests)} requests{canary_note}"
                )
                window = phase(f"epoch-{epoch}", requests, seed=epoch)
                self._say(f"epoch {epoch}: irpo-epoch pipeline (kfp.local), its canary verdict first")
                evaluation, responses, canary = self.run_epoch(epoch, window)
                self._say(f"epoch {epoch}: canary {canary['decision']}: {canary['reason']}")
                with clock(f"epoch {epoch}", "oracle scoring (simulation only)"):
                    oracle = oracle_metrics(env, held_out, responses, self.settings.seed)
                if epoch == 1:
                    report["epochs"].append(
                        report_entry(0, arms.champion, evaluation, oracle, oracle_refs, "champion")
                    )
                if pending is not None:
                    report["epochs"].append(self.settle(*pending, canary, oracle_refs, report))
                pending = (epoch, evaluation, oracle)
                write_report(report, self.out)
            if pending is not None:
                arms = self.await_arms(endpoint)
                last = plan.final_canary
                if arms.challenger is not None:
                    self._say(f"the last candidate's canary: v{arms.challenger} beside v{arms.champion}")
                    window = phase("final canary", last, seed=self.epochs + 1)
                else:
                    self._say("the last candidate was held by the offline gate: no final canary")
                with clock("final canary", "verdict"), stdout_to(self.logs / "final-canary.log"):
                    canary = steps.canary(
                        self.settings_json, str(self.feedback), window[1], str(self.out / "final-canary"),
                        "", end=True, who="closed-loop",
                    )  # fmt: skip
                report["epochs"].append(self.settle(*pending, canary, oracle_refs, report))
                self.await_arms(endpoint)  # the last verdict reaches the endpoint too
            report["final_served"] = self.served_versions(endpoint)
        report["wall_seconds"] = time.perf_counter() - started_all
        write_report(report, self.out)
        return report


CANARY_KEYS = ("decision", "reason", "requests", "challenger", "champion", "started_at", "window_end", "test")


def canary_entry(canary: Mapping[str, Any]) -> dict[str, Any]:
    """The canary's verdict for the report: arms, volumes, metrics, the sequences, the decision."""
    keep = (
        *CANARY_KEYS,
        "arms",
        "revenue_difference",
        "itctr_noninferiority",
        "alpha",
        "itctr_margin",
        "test",
    )
    return {k: canary[k] for k in keep if k in canary}


def _metrics(estimates: Mapping[str, Estimate]) -> dict[str, Any]:
    return {k: v.to_dict() for k, v in estimates.items() if k in ORACLE_METRICS}


def report_entry(
    epoch: int,
    version: str | None,
    evaluation: Mapping[str, Any],
    oracle: Mapping[str, Mapping[str, Estimate]],
    oracle_refs: Mapping[str, Mapping[str, Estimate]],
    label: str,
) -> dict[str, Any]:
    """One `report.json` epoch: the champion after the gate on the held-out requests, both sides.

    `label` is the evaluation's policy that is champion after this epoch's gate ("candidate" when
    it was promoted). Epoch 0 (pi_0) has no gate: it is the first evaluation's champion.
    """
    psi = evaluation["policies"]
    deployable = [b for b in psi if b not in ("candidate", "champion")]
    gate = evaluation["gate"] if epoch > 0 else None
    return {
        "epoch": epoch,
        "policy_version": version,
        "policy": {**_metrics(oracle[label]), "reward": psi[label]["reward"]},
        "reward_model": psi[label],
        "baselines": {b: _metrics(oracle[b]) for b in deployable},
        "baselines_reward_model": {b: psi[b] for b in deployable},
        "oracle_references": {r: _metrics(m) for r, m in oracle_refs.items()},
        "gate": None
        if gate is None
        else {"admitted": bool(gate["admitted"]), "reason": gate.get("reason"), "checks": gate["checks"]},
        "held_out_requests": evaluation["requests"],
    }


def revenue_change(first: float | None, last: float | None) -> str:
    """`first -> last (+x%)`; the absolute change instead when pi_0's revenue is 0 or undefined.

    A relative change from 0 is infinite and from NaN meaningless, and `Estimate.to_dict` turns
    an undefined mean into None: neither may crash or mislead the report's summary.
    """

    def fmt(x: float | None) -> str:
        return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"

    if first is None or last is None or not (math.isfinite(first) and math.isfinite(last)):
        return f"{fmt(first)} -> {fmt(last)}"
    if first == 0:
        return f"{first:.3f} -> {last:.3f} ({last - first:+.3f} absolute)"
    return f"{first:.3f} -> {last:.3f} ({last / first - 1:+.1%})"


def write_report(report: Mapping[str, Any], out: Path) -> list[Path]:
    """report.json, epochs.png, traffic.png and report.html."""
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    epochs = list(report["epochs"])
    curves = [
        {
            **e,
            "baselines": {
                **{f"{b} (deployable, psi)": v for b, v in e["baselines"].items()},
                **{f"{r} (oracle reference)": v for r, v in e["oracle_references"].items()},
            },
        }
        for e in epochs
    ]
    images = [plot_epoch_curves(curves, out / "epochs.png")] if epochs else []
    images += [plot_traffic(report["traffic"], out / "traffic.png")] if report["traffic"] else []
    images += [out / f"canary-epoch-{e['epoch']}.png" for e in epochs if e.get("canary")]
    images = [i for i in images if i.is_file()]

    def fmt(estimate: Mapping[str, Any] | None) -> str:
        if not estimate or estimate.get("mean") is None:
            return "n/a"
        lo, hi = estimate.get("ci") or [None, None]
        band = "" if lo is None else f" [{lo:.3f}, {hi:.3f}]"
        return f"{estimate['mean']:.3f}{band}"

    metrics = ("revenue", "social_welfare", "itctr", "ad_load")
    rows = [
        [e["epoch"], e["policy_version"], *(fmt(e["policy"].get(m)) for m in metrics),
         fmt(e["reward_model"].get("reward")), fmt(e["reward_model"].get("revenue")),
         "" if e["gate"] is None else ("admitted" if e["gate"]["admitted"] else "held"),
         (e.get("canary") or {}).get("decision", "")]
        for e in epochs
    ]  # fmt: skip

    def band(s: Mapping[str, Any] | None) -> str:
        if not s or s.get("mean") is None:
            return "n/a"
        lo, hi = (f"{x:+.4f}" if x is not None else "inf" for x in (s["lo"], s["hi"]))
        return f"{s['mean']:+.4f} [{lo}, {hi}]"

    canary_rows = [
        [e["epoch"], f"v{c['challenger']} vs v{c['champion']}",
         *(f"{c['arms'][a]['requests']}" for a in ("challenger", "champion")),
         *(fmt(c["arms"][a]["revenue"]) for a in ("challenger", "champion")),
         *(fmt(c["arms"][a]["itctr"]) for a in ("challenger", "champion")),
         band(c["revenue_difference"]), c["decision"]]
        for e in epochs
        if (c := e.get("canary")) and c.get("arms")
    ]  # fmt: skip
    traffic_rows = [
        [t["phase"], t["served"], t["clicks"], f"{t['revenue']:.1f}", f"{t['throughput_rps']:.1f}",
         f"{t['latency_p50_ms']:.0f}", f"{t['latency_p99_ms']:.0f}", json.dumps(t["policy_versions"])]
        for t in report["traffic"]
    ]  # fmt: skip
    last = epochs[-1] if epochs else {"baselines": {}, "baselines_reward_model": {}, "oracle_references": {}}
    baseline_rows = [
        [f"{b} (deployable, ranked by psi_t)", *(fmt(v.get(m)) for m in metrics),
         fmt(last["baselines_reward_model"][b].get("revenue"))]
        for b, v in last["baselines"].items()
    ] + [
        [f"{r} (oracle reference, simulation only)", *(fmt(v.get(m)) for m in metrics), "n/a"]
        for r, v in last["oracle_references"].items()
    ]  # fmt: skip
    summary = {"epochs": str(max(len(epochs) - 1, 0)), "out": str(out)}
    if "wall_seconds" in report:
        summary["wall time"] = f"{report['wall_seconds'] / 60:.1f} min"
    if len(epochs) > 1:
        first, last = epochs[0]["policy"]["revenue"]["mean"], epochs[-1]["policy"]["revenue"]["mean"]
        summary["oracle revenue, pi_0 -> final champion"] = revenue_change(first, last)
    html = write_html(
        out,
        "LLM-Auction closed loop",
        summary,
        {
            "champion after each epoch's canary (held-out requests): oracle metrics (simulation only) "
            "beside psi_t's estimates; the offline gate admits a candidate to the canary, live traffic "
            "decides": (
                [
                    "epoch",
                    "version",
                    *(f"{m} (oracle)" for m in metrics),
                    "R (psi)",
                    "revenue (psi)",
                    "offline gate",
                    "canary",
                ],
                rows,
            ),
            "each epoch's candidate in canary (live traffic, realised; always-valid sequences)": (
                [
                    "epoch",
                    "challenger vs champion",
                    "requests (ch.)",
                    "requests (champ.)",
                    "revenue/req (ch.)",
                    "revenue/req (champ.)",
                    "ITCTR (ch.)",
                    "ITCTR (champ.)",
                    "revenue difference [sequence]",
                    "decision",
                ],
                canary_rows,
            ),
            "baselines on the same requests, last epoch": (
                ["baseline", *(f"{m} (oracle)" for m in metrics), "revenue (psi)"],
                baseline_rows,
            ),
            "live traffic per phase": (
                ["phase", "served", "clicks", "revenue", "req/s", "p50 ms", "p99 ms", "versions"],
                traffic_rows,
            ),
            "where the time went": (
                list(TIMING_COLUMNS),
                timing_rows(report.get("timings", []), report.get("wall_seconds")),
            ),
        },
        images,
    )
    return [out / "report.json", *images, html]


def plot_traffic(traffic: list[Mapping[str, Any]], path: Path) -> Path:
    """Realised revenue and CTR per served request in each phase (what the live endpoint earned)."""
    from matplotlib.figure import Figure

    phases = [f"{t['phase']}\npolicy v{', v'.join(sorted(t['policy_versions']))}" for t in traffic]
    per_request = [t["revenue"] / max(t["served"], 1) for t in traffic]
    ctr = [t["clicks"] / max(t["impressions"], 1) for t in traffic]
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.bar(phases, per_request, color="C0")
    left.set_title("realised revenue per request (live traffic)")
    right.bar(phases, ctr, color="C2")
    right.set_title("CTR of shown ads (live traffic)")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def run_loop(
    epochs: int,
    out: Path,
    config: Path | None = None,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    pi0: Path | None = None,
) -> dict[str, Any]:
    if epochs < 0:
        raise ConfigError(f"--epochs: {epochs} must be 0 or more")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Loop(load_config(config, profile, overrides=overrides), epochs, out, pi0).run()
