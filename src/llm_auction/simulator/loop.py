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
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import datasets
import httpx
import pandas as pd
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from llm_auction.baselines import PRICED
from llm_auction.config import ConfigError, Settings, load_config
from llm_auction.contracts import AuctionRequest
from llm_auction.evaluation.candidate import RESPONSES_FILE
from llm_auction.evaluation.card import EVALUATION_FILE
from llm_auction.evaluation.report import plot_epoch_curves
from llm_auction.evaluation.report import write_report as write_html
from llm_auction.mechanism.metrics import Estimate
from llm_auction.pipeline.local import run_local
from llm_auction.pipeline.steps import canary as canary_step
from llm_auction.pipeline.steps import ingest as ingest_step
from llm_auction.pipeline.steps import pctr as pctr_step
from llm_auction.policy.warm_start import init_policy, register_existing_policy
from llm_auction.public.catalog import HELD_OUT_FILE, SYNTHETIC_FILE, Catalog, read_requests
from llm_auction.serving.collector import EventStore
from llm_auction.serving.export import export_feedback
from llm_auction.simulator.experiment import Environment, build_environment, export_public
from llm_auction.simulator.oracle import (
    ORACLE_LABEL,
    oracle_layouts,
    oracle_metrics,
    oracle_rollouts,
    paired_differences,
    references,
)
from llm_auction.simulator.run_state import COMPLETE, STATE_FILE, RunState
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
RUN_FILES = (STATE_FILE, "report.json", "report.html")


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


def logged_requests(store_dir: Path) -> tuple[int, set[str]]:
    """How many inferences the collector's store holds, and the ids of the requests they answered."""
    store = EventStore(store_dir)
    try:
        pairs = store.inference_pairs()
    finally:
        store.close()
    return len(pairs), {r["request_id"] for _, q, _ in pairs for r in q["instances"]}


def sign_up(settings: Settings, feedback_dir: Path) -> None:
    """Users and ads enter the feature store before anyone is served: an ingest of no events."""
    feedback_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ingest_step.ingest(
        settings.model_dump_json(), str(feedback_dir), str(now - timedelta(hours=1)), str(now), ""
    )


def server_work(endpoint: str) -> dict[str, float]:
    """The server's cumulative work (`/metrics`): seconds per stage, responses, characters, priced ads,
    engines started.
    """
    text = httpx.get(f"{endpoint}/metrics", timeout=10).text
    work: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llm_auction_stage_seconds_sum":
                work[f"{sample.labels['stage']}_s"] = sample.value
            elif sample.name == "llm_auction_generated_total":
                work[sample.labels["what"]] = sample.value
            elif sample.name == "llm_auction_engine_starts_total":
                work["engine_starts"] = sample.value
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
def output_to(log_path: Path) -> Iterator[None]:
    """What libraries print or log (TRL's step dictionaries and progress bars, MLflow's and Feast's
    notices, warnings) goes to the run's log file. The console keeps the loop's own progress (its
    console holds the terminal's stream), and errors still reach it: they raise.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        log_path.open("a") as sink,
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
        contextlib.ExitStack() as stack,
    ):
        if not datasets.are_progress_bars_disabled():  # one bar per dataset pass: noise, even in a file
            datasets.disable_progress_bars()
            stack.callback(datasets.enable_progress_bars)
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
        resume: bool = False,
    ) -> None:
        self.out = out.resolve()
        self.pi0 = pi0
        self.resume = resume
        self.settings = loop_settings(settings, self.out)
        self.epochs = epochs
        self.console = console or Console(file=sys.stderr)  # this stream, not one redirected later
        self.config_path = self.out / "config.yaml"
        self.feedback = self.out / "feedback"
        self.collector_store = self.out / "collector"
        self.settings_json = self.settings.model_dump_json()
        self.logs = self.out / "logs"
        self.timings = Timings()

    # --- phases ----------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        self.console.print(f"[bold]{datetime.now().strftime('%H:%M:%S')}[/bold] {text}")

    def prepare(self) -> RunState:
        """A fresh run replaces the previous one's stores; a resumed one keeps them and its state."""
        if self.resume:
            state = RunState.load(self.out)
            self._say(
                f"resuming the run in {self.out}: finished {', '.join(state.data['finished']) or 'nothing'}"
            )
            return state
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
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.feedback.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.settings.model_dump(mode="json"), sort_keys=False))
        return RunState.new(self.out, self.epochs, self.pi0)

    def registry_snapshot(self) -> dict[str, Any]:
        """The aliases a pipeline or verdict step may move, so an interrupted one can be undone."""
        names = (self.settings.irpo.registered_model, self.settings.pctr.registered_model)
        return registry.snapshot(self.settings.tracking, names)

    def undo(self, state: RunState) -> None:
        """Put the registry back as it was when an interrupted step began (a pipeline run or the last
        verdict), before anything serves: its rerun decides again on the same durable logs, so a
        verdict already carried out is taken again, identically.
        """
        for key, begun in state.data["begun"].items():
            if "registry" in begun:
                self._say(
                    f"{key} was cut short: the registry's aliases go back to where it began; it runs again"
                )
                registry.restore(self.settings.tracking, begun["registry"])

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
        skip: Collection[str] = (),
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
                skip=skip,
            )
        )
        for svc in services:
            svc.check()
        if report.served == 0 and report.skipped < len(requests):
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

    def serving_note(self, arms: Versions) -> str:
        if arms.challenger is None:
            return f"champion v{arms.champion}"
        percent = self.settings.serving.canary_percent
        return f"champion v{arms.champion} and candidate v{arms.challenger} (canary, {percent}% of users)"

    def await_arms(self, endpoint: str) -> Versions:
        """Wait until the server serves what the registry's aliases name: the policy's champion and
        challenger, and psi's champion (whose gate may have held the psi just trained).
        """
        versions = current_versions(self.settings)

        def loaded() -> bool:
            try:
                served = self.served_versions(endpoint)
            except httpx.TimeoutException:  # busy starting the new version's engine: ask again
                return False
            return (
                served["policy_version"],
                served["challenger_version"],
                served["pctr_version"],
            ) == versions

        wait_until(loaded, f"the server to load {versions}")
        return versions

    def run_epoch(
        self, epoch: int, window: tuple[str, str], state: RunState
    ) -> tuple[dict[str, Any], pd.DataFrame, dict[str, Any]]:
        """One irpo-epoch pipeline run: its evaluation summary, every policy's held-out responses, and
        the canary verdict it took first (on the window's traffic, which ends that canary).
        An interrupted run is undone in the registry and run again from its first step.
        """
        root = self.out / "pipeline" / f"epoch-{epoch}"
        key = f"pipeline epoch {epoch}"
        if not state.done(key):
            if state.begun(key) is not None:  # cut short: its registry moves were undone on resume
                shutil.rmtree(root, ignore_errors=True)
            state.begin(key, registry=self.registry_snapshot())
            self.pipeline(epoch, window, root)
            state.finish(key)
        (evaluation,) = root.glob(f"*/evaluate/evaluation/{EVALUATION_FILE}")
        (canary,) = root.glob(f"*/canary/result/{canary_step.CANARY_FILE}")
        return (
            json.loads(evaluation.read_text()),
            pd.read_parquet(evaluation.parent / RESPONSES_FILE),
            json.loads(canary.read_text()),
        )

    def pipeline(self, epoch: int, window: tuple[str, str], root: Path) -> None:
        log = self.logs / f"pipeline-epoch-{epoch}.log"
        self._say(f"epoch {epoch}: irpo-epoch pipeline (kfp.local), its canary verdict first")
        self._say(f"  (kfp.local's and the steps' output: {log.relative_to(self.out)})")
        clock = run_local(
            root,
            log,
            epoch=epoch,
            window_start=window[0],
            window_end=window[1],
            feedback_dir=str(self.feedback),
            policy_uri="",  # irpo.start_policy: the champion or the head the canary step leaves
            profile=self.settings.profile,
            config_path=str(self.config_path),
            overrides="",
            end_canary=True,
        )
        for task, seconds in clock.seconds.items():
            self.timings.add(f"epoch {epoch}", f"pipeline: {task}", seconds)

    def settle(
        self,
        epoch: int,
        evaluation: Mapping[str, Any],
        oracle: Mapping[str, Mapping[str, Any]],
        canary: Mapping[str, Any],
        oracle_refs: Mapping[str, Mapping[str, Any]],
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
        plot = next(
            self.out.glob(f"pipeline/epoch-{epoch + 1}/*/canary/result/{canary_step.CANARY_PLOT}"), None
        )
        plot = plot or (self.out / "final-canary" / canary_step.CANARY_PLOT)
        if plot.is_file():
            shutil.copyfile(plot, self.out / f"canary-epoch-{epoch}.png")
        return entry

    def run(self) -> dict[str, Any]:
        state = self.prepare()
        if state.done(COMPLETE):
            self._say(f"the run in {self.out} finished already: nothing to resume")
            return json.loads((self.out / "report.json").read_text())
        self.undo(state)
        report: dict[str, Any] = state.data.setdefault(
            "report", {"sections": SECTIONS, "epochs": [], "traffic": [], "out": str(self.out), "timings": []}
        )
        self.timings = Timings(report["timings"])  # a resumed run keeps the finished phases' times
        clock = self.timings.time
        # A bootstrap step cut short runs again whole; what a resumed session rebuilds is its own phase.
        start = "resume" if self.resume else "bootstrap"
        with clock(start, "world and public files"):
            env = build_environment(self.settings)
            plan = plan_traffic(env, self.epochs)
            held_out = self.export_public(env)
        if not state.done("pi_0"):
            with (
                clock("bootstrap", "pi_0"),
                self.console.status("pi_0: SFT (its progress: logs/pi0.log)"),
                output_to(self.logs / "pi0.log"),
            ):
                self.bootstrap_policy(held_out)
            state.finish("pi_0")
        if not state.done("oracle references"):
            self._say("oracle references (simulation only) on the held-out requests")
            with clock("bootstrap", "oracle references"):
                refs = oracle_rows(references(env, held_out, self.settings.seed))
            state.finish("oracle references", oracle_refs=refs)
        oracle_refs = state.data["oracle_refs"]
        if not state.done("sign-up"):
            self._say("feature store: users and ads sign up")
            with clock("bootstrap", "sign-up (Feast)"), output_to(self.logs / "bootstrap.log"):
                sign_up(self.settings, self.feedback)
            state.finish("sign-up")
        collector_port, server_port = free_port(), free_port()
        collector = f"http://127.0.0.1:{collector_port}"
        endpoint = f"http://127.0.0.1:{server_port}"
        logs = self.logs
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
            self.timings.add(start, "services start", time.perf_counter() - services_started)
            served_total, logged = logged_requests(self.collector_store)  # by earlier sessions, if any
            work: dict[str, float] = {}

            def phase(name: str, requests: list[AuctionRequest], seed: int) -> tuple[str, str]:
                """One phase of traffic, logged and exported; its window, and its line in the report.
                A phase cut short sends only the requests the collector has not logged.
                """
                nonlocal served_total, work
                key = f"traffic {name}"
                if state.done(key):
                    return tuple(state.data["windows"][name])
                skip: set[str] = set()
                if (begun := state.begun(key)) is not None:
                    started = datetime.fromisoformat(begun["started"])
                    skip = logged & {r.request_id for r in requests}
                    self._say(
                        f"{name} resumes: {len(skip)} of its {len(requests)} requests were served and logged"
                    )
                else:
                    started = datetime.now(UTC) - timedelta(seconds=1)
                    state.begin(key, started=started.isoformat())
                with clock(name.replace("-", " "), "traffic"):
                    traffic = self.send(
                        endpoint, collector, requests, env, seed=seed, services=services, skip=skip
                    )
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
                state.data["windows"][name] = window
                state.finish(key)
                return window

            if not state.done("traffic bootstrap"):
                self._say(f"bootstrap: pi_0 serves {len(plan.bootstrap)} requests")
            window = phase("bootstrap", plan.bootstrap, seed=0)

            if not state.done("psi_0"):
                self._say("psi_0: pCTR on pi_0's traffic")
                with output_to(self.logs / "bootstrap.log"):
                    with clock("bootstrap", "ingest"):
                        ingest_step.ingest(self.settings_json, str(self.feedback), *window, "")
                    with clock("bootstrap", "psi_0 (pCTR)"):
                        pctr_step.train_pctr(self.settings_json, str(self.out / "pctr0"), *window, 0, "")
                state.finish("psi_0")
            for epoch in range(1, self.epochs + 1):
                if state.done(f"epoch {epoch}"):
                    window = tuple(state.data["windows"][f"epoch-{epoch}"])
                    continue
                with clock(f"epoch {epoch}", "serving follows the registry"):
                    arms = self.await_arms(endpoint)
                requests = plan.epochs[epoch - 1]
                if not state.done(f"traffic epoch-{epoch}"):
                    self._say(f"epoch {epoch}: {self.serving_note(arms)} serve {len(requests)} requests")
                window = phase(f"epoch-{epoch}", requests, seed=epoch)
                evaluation, responses, canary = self.run_epoch(epoch, window, state)
                self._say(f"epoch {epoch}: canary {canary['decision']}: {canary['reason']}")
                with clock(f"epoch {epoch}", "oracle scoring (simulation only)"):
                    rollouts = oracle_rollouts(env, held_out, responses, self.settings.seed)
                    oracle = oracle_rows(oracle_metrics(env, rollouts, self.settings.seed))
                    for policy, terms in oracle_layouts(env, held_out, responses).items():
                        oracle[policy]["page"] = terms  # how the truth reads each policy's pages
                    # the policies and each deployable auction minus every deployable one, per request
                    # (the search under R against post-generation too: no scratch pairing needed)
                    paired = paired_differences(
                        env, rollouts, self.settings.seed, ("candidate", "champion", *PRICED), PRICED
                    )
                    for policy, versus in paired.items():
                        oracle[policy]["versus"] = oracle_rows(versus)
                if epoch == 1:
                    report["epochs"].append(
                        report_entry(0, arms.champion, evaluation, oracle, oracle_refs, "champion")
                    )
                if (pending := state.data.get("pending")) is not None:
                    report["epochs"].append(self.settle(*pending, canary, oracle_refs))
                write_report({**report, "wall_seconds": state.wall_seconds}, self.out)
                state.finish(f"epoch {epoch}", pending=(epoch, evaluation, oracle))
            if (pending := state.data.get("pending")) is not None:
                arms = self.await_arms(endpoint)
                last = plan.final_canary
                if arms.challenger is not None:
                    if not state.done("traffic final canary"):
                        self._say(f"the last candidate's canary: v{arms.challenger} beside v{arms.champion}")
                    window = phase("final canary", last, seed=self.epochs + 1)
                elif not state.done("traffic final canary"):
                    self._say("the last candidate was held by the offline gate: no final canary")
                state.begin("final canary", registry=self.registry_snapshot())
                with clock("final canary", "verdict"), output_to(self.logs / "final-canary.log"):
                    canary = canary_step.canary(
                        self.settings_json, str(self.feedback), window[1], str(self.out / "final-canary"),
                        "", end=True, who="closed-loop",
                    )  # fmt: skip
                report["epochs"].append(self.settle(*pending, canary, oracle_refs))
                state.finish("final canary", pending=None)
                self.await_arms(endpoint)  # the last verdict reaches the endpoint too
            report["final_served"] = self.served_versions(endpoint)
        report["wall_seconds"] = state.wall_seconds
        write_report(report, self.out)
        state.finish(COMPLETE)
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


def oracle_rows(scored: Mapping[str, Mapping[str, Estimate]]) -> dict[str, dict[str, Any]]:
    """The oracle's estimates per policy in report form (JSON, kept in the run's state)."""
    return {p: {k: v.to_dict() for k, v in est.items() if k in ORACLE_METRICS} for p, est in scored.items()}


def report_entry(
    epoch: int,
    version: str | None,
    evaluation: Mapping[str, Any],
    oracle: Mapping[str, Mapping[str, Any]],
    oracle_refs: Mapping[str, Mapping[str, Any]],
    label: str,
) -> dict[str, Any]:
    """One `report.json` epoch: the champion after the gate on the held-out requests, both sides.

    `label` is the evaluation's policy that is champion after this epoch's gate ("candidate" when
    it was promoted). Epoch 0 (pi_0) has no gate: it is the first evaluation's champion.
    """
    psi, lineage = evaluation["policies"], evaluation.get("lineage", {})
    deployable = [b for b in psi if b not in ("candidate", "champion")]
    gate = evaluation["gate"] if epoch > 0 else None
    return {
        "epoch": epoch,
        "policy_version": version,
        "policy": {**oracle[label], "reward": psi[label]["reward"]},
        "reward_model": psi[label],
        "baselines": {b: dict(oracle[b]) for b in deployable},
        "baselines_reward_model": {b: psi[b] for b in deployable},
        "oracle_references": {r: dict(m) for r, m in oracle_refs.items()},
        "gate": None
        if gate is None
        else {"admitted": bool(gate["admitted"]), "reason": gate.get("reason"), "checks": gate["checks"]},
        "held_out_requests": evaluation["requests"],
        # the epoch's candidate: its monotonicity audit, power and response to a doubled bid (psi_t)
        "candidate_monotonicity": evaluation.get("monotonicity") if epoch > 0 else None,
        # ... and what it earns, promoted or not, and the policy it improved (pi_{t-1})
        "candidate": None
        if epoch == 0
        else {
            "version": lineage.get("candidate_version"),
            "improves": lineage.get("reference_version") or lineage.get("reference"),
            "policy": {**oracle["candidate"], "reward": psi["candidate"]["reward"]},
            "reward_model": psi["candidate"],
            "kl_to_reference": evaluation.get("kl"),
            "kl_to_pi0": evaluation.get("kl_to_pi0"),
        },
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


def _version_label(version: str | None) -> str:
    """`v3` for a registered version, the policy's URI or path as it is otherwise."""
    return f"v{version}" if version and str(version).isdigit() else str(version)


# `oracle_layouts`' terms, in the report's order: what the page's writing does to every ad's CTR.
PAGE_TERMS = ("ads", "useful", "talk", "bridges", "below_quality_floor", "nativeness", "answer_factor")


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
         (e.get("canary") or {}).get("decision", ""),
         fmt((e.get("candidate_monotonicity") or {}).get("bid_doubling"))]
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
    candidate_rows = [
        [e["epoch"], _version_label(c["version"]), _version_label(c["improves"]),
         *(fmt(c["policy"].get(m)) for m in metrics),
         fmt(c["reward_model"].get("reward")), fmt(c["reward_model"].get("revenue")),
         *("n/a" if c.get(k) is None else f"{c[k]:.3f}" for k in ("kl_to_reference", "kl_to_pi0"))]
        for e in epochs
        if (c := e.get("candidate"))
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
    versus_rows = [
        [b, *(fmt(d.get(m)) for m in ("revenue", "social_welfare"))]
        for b, d in last.get("policy", {}).get("versus", {}).items()
    ]
    page_rows = [
        [name, *("n/a" if (x := page.get(k)) is None else f"{x:.3f}" for k in PAGE_TERMS)]
        for name, entry in (("final champion", last.get("policy", {})), *last["baselines"].items())
        if (page := entry.get("page"))
    ]
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
                    "candidate: doubling a bid, insertion probability",
                ],
                rows,
            ),
            "each epoch's candidate, promoted or not (held-out requests): oracle metrics (simulation "
            "only) beside psi_t's estimates, the policy it improved and its KL to it and to pi_0": (
                [
                    "epoch",
                    "candidate",
                    "improves",
                    *(f"{m} (oracle)" for m in metrics),
                    "R (psi)",
                    "revenue (psi)",
                    "KL to it",
                    "KL to pi_0",
                ],
                candidate_rows,
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
            "final champion minus each deployable baseline, per request on the same requests (oracle, "
            "simulation only; paired 95% bootstrap: above 0, the learned auction beats it)": (
                ["baseline", "revenue difference", "social welfare difference"],
                versus_rows,
            ),
            "pages as the simulator's users read them, last epoch (simulation only): means per answer; "
            "two policies inserting the same ads earn differently by these": (
                ["policy", *PAGE_TERMS],
                page_rows,
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
    epochs: int | None,
    out: Path,
    config: Path | None = None,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    pi0: Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """A new closed-loop run in `out` (3 epochs unless told), or with `resume` the one there, continued
    from its last finished phase with its own settings (`out/config.yaml`) and epochs.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not resume:
        epochs = 3 if epochs is None else epochs
        if epochs < 0:
            raise ConfigError(f"--epochs: {epochs} must be 0 or more")
        return Loop(load_config(config, profile, overrides=overrides), epochs, out, pi0).run()
    given = {"--config": config, "--profile": profile, "--set": overrides or None, "--pi0": pi0}
    if clash := [flag for flag, value in given.items() if value is not None]:
        raise ConfigError(f"--resume: continues with the run's own settings; drop {', '.join(clash)}")
    saved = RunState.load(out.resolve()).data
    if epochs is not None and epochs != saved["epochs"]:
        raise ConfigError(
            f"--epochs: the run in {out} was started with {saved['epochs']} epochs, not {epochs}"
        )
    settings = load_config(out / "config.yaml")
    pi0 = None if saved["pi0"] is None else Path(saved["pi0"])
    return Loop(settings, saved["epochs"], out, pi0, resume=True).run()
