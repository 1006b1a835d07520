"""Faults the services survive, each against real processes on 127.0.0.1.

- a burst past `serving.max_in_flight`: 503 with Retry-After at once, the rest served, and a
  client that honours Retry-After gets everything served;
- the policy server SIGKILLed during traffic: restarted by its supervisor, the traffic client
  retries, every request is served and every acknowledged click is stored once; without restarts
  the loop's check fails naming the log;
- the Feast online store (a Redis of the test's own) down: 503 naming the store, then served
  again once Redis is back;
- the collector's disk full (a small tmpfs): 507 with a message, and every acknowledged click is
  in the store.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from helpers import eager_users, mlflow_server_command, pi0_world_config, register_versions
from llm_auction.config import load_config
from llm_auction.errors import ServiceUnavailable
from llm_auction.evaluation.card import EVALUATION_FILE
from llm_auction.pipeline.steps import common, gate
from llm_auction.serving.collector import EventStore
from llm_auction.simulator.experiment import Environment, export_public
from llm_auction.simulator.loop import sign_up
from llm_auction.simulator.services import Service, free_port, service, wait_until
from llm_auction.simulator.traffic import send_traffic
from llm_auction.tracking import registry
from test_evaluation import clear_summary

pytestmark = pytest.mark.slow


def _serve_args(
    config: Path, port: int, model_dir: Path, collector: str | None = None, engine: str = "transformers"
) -> list[str]:
    """Shedding and a store going down are the server's business, not its engine's: by default
    transformers' generate, which starts in seconds. The killed server runs vLLM (the default
    engine, whose engine core is a child process the supervisor must outlive).
    """
    args = ["serve", "--config", str(config), "--port", str(port), "--model-dir", str(model_dir)]
    args += ["--set", f"policy.generation.backend={engine}"]
    return args + (["--logger-url", f"{collector}/v1/events"] if collector else [])


def _live_in_group(pgid: int) -> list[int]:
    """The processes of group `pgid` that are not zombies (a supervised service leads its own group)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue  # gone meanwhile
        if state != "Z" and int(group) == pgid:
            live.append(int(stat.parent.name))
    return live


def _instance(request) -> dict:
    return {"instances": [request.model_dump(mode="json")]}


@pytest.fixture(scope="module")
def signed_up(pi0, policy_env: Environment, tmp_path_factory):
    """The public files and the users signed up in a sqlite Feast store: what every server here needs."""
    root = tmp_path_factory.mktemp("faults")
    config = pi0_world_config(root, serving={"max_in_flight": 2})
    settings = load_config(config, environ={})
    export_public(policy_env, settings.public_dir)
    sign_up(settings, root / "feedback")
    return root, config


def test_a_burst_past_max_in_flight_is_shed_with_503_and_retry_after(signed_up, pi0, policy_env):
    root, config = signed_up
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    requests = policy_env.world.auction_requests(limit=24, offset=2300)
    with service("server", _serve_args(config, port, pi0[0]), f"{endpoint}/v2/health/ready", root / "logs"):

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                url = f"{endpoint}/v1/models/policy:predict"
                return await asyncio.gather(*(client.post(url, json=_instance(r)) for r in requests))

        replies = asyncio.run(burst())
        codes = [r.status_code for r in replies]
        shed = [r for r in replies if r.status_code == 503]
        assert set(codes) <= {200, 503}, codes
        assert 2 <= codes.count(200) < len(requests) and shed, codes
        assert all(r.headers["retry-after"] == "1" for r in shed)
        assert all("serving.max_in_flight" in r.json()["error"] for r in shed)
        metrics = httpx.get(f"{endpoint}/metrics").text
        assert 'llm_auction_shed_total{reason="overloaded"}' in metrics
        # A client that honours Retry-After gets every request served, in the same burst.
        report = asyncio.run(
            send_traffic(endpoint, requests, policy_env.click_model, concurrency=24, progress=False)
        )
        assert (report.served, report.failed, report.rejected) == (len(requests), 0, 0), report.errors


def test_a_killed_server_is_restarted_and_traffic_loses_no_request_and_no_click(signed_up, pi0, policy_env):
    root, config = signed_up
    collector_port, server_port = free_port(), free_port()
    collector, endpoint = f"http://127.0.0.1:{collector_port}", f"http://127.0.0.1:{server_port}"
    store_dir = root / "collector-kill"
    requests = policy_env.world.auction_requests(limit=120, offset=2300)
    with (
        service("collector", ["collector", "--store", str(store_dir), "--port", str(collector_port)],
                f"{collector}/healthz", root / "logs"),
        service("server", _serve_args(config, server_port, pi0[0], collector, engine="vllm"),
                f"{endpoint}/v2/health/ready", root / "logs", restarts=1) as server,
    ):  # fmt: skip
        result = {}

        def traffic() -> None:
            result["report"] = asyncio.run(
                send_traffic(endpoint, requests, eager_users(policy_env), collector=collector,
                             concurrency=8, progress=False, mean_click_delay_s=0.0, retry_budget_s=120)
            )  # fmt: skip

        thread = threading.Thread(target=traffic)
        thread.start()
        store = EventStore(store_dir)
        try:
            wait_until(lambda: len(store.inference_pairs()) >= 20, "20 logged inferences", timeout_s=120)
            first_pid = server.pid
            os.kill(first_pid, signal.SIGKILL)
            thread.join(timeout=300)
            assert not thread.is_alive()
            report = result["report"]
            assert server.restarts == 1 and server.pid != first_pid
            server.check()
            assert (report.served, report.failed, report.rejected) == (len(requests), 0, 0), report.errors
            assert report.policy_versions  # answered by the restarted server too
            # Every acknowledged click is stored, once.
            stored = store.click_ids()
            assert len(stored) == len(set(stored)) == report.clicks_acknowledged == report.clicks > 0
        finally:
            store.close()


def test_a_sigterm_stops_the_server_and_its_engine_core(signed_up, pi0):
    """SIGTERM, what Kubernetes or a process manager sends, is a graceful stop that takes vLLM's
    engine core with it; it used to outlive the server. Started but not watched: the watcher, like
    the loop's `stop()`, kills the whole process group once the server is gone, which hid that.
    """
    root, config = signed_up
    port = free_port()
    server = Service("server", _serve_args(config, port, pi0[0], engine="vllm"),
                     f"http://127.0.0.1:{port}/v2/health/ready", root / "logs")  # fmt: skip
    try:
        server.start()
        assert len(_live_in_group(server.pid)) >= 2  # the server and its engine core
        os.kill(server.pid, signal.SIGTERM)
        assert server.process.wait(60) == 128 + signal.SIGTERM
        wait_until(lambda: not _live_in_group(server.pid), "its engine core to stop", timeout_s=30)
    finally:
        server.stop()


def _redis(port: int, directory: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ping = ["redis-cli", "-p", str(port), "ping"]
    wait_until(lambda: subprocess.run(ping, capture_output=True).returncode == 0, "redis to answer", 30, 0.2)
    return process


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_the_online_store_down_is_a_503_naming_it_and_service_resumes_when_it_is_back(
    pi0, policy_env, tmp_path
):
    redis_port = free_port()
    redis = _redis(redis_port, tmp_path)
    try:
        config = pi0_world_config(tmp_path, features={"redis_url": f"127.0.0.1:{redis_port}"})
        settings = load_config(config, environ={})
        export_public(policy_env, settings.public_dir)
        sign_up(settings, tmp_path / "feedback")
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        url = f"{endpoint}/v1/models/policy:predict"
        body = _instance(policy_env.world.auction_requests(limit=1, offset=2300)[0])
        with service("server", _serve_args(config, port, pi0[0]), f"{endpoint}/v2/health/ready", tmp_path):
            assert httpx.post(url, json=body, timeout=60).status_code == 200
            # Down: the profiles are on disk (SAVE), the server is gone.
            subprocess.run(["redis-cli", "-p", str(redis_port), "shutdown", "save"], check=False)
            redis.wait(timeout=30)
            down = httpx.post(url, json=body, timeout=60)
            assert down.status_code == 503, down.text
            assert down.headers["retry-after"] == "1"
            assert "feature store: the online store did not answer" in down.json()["error"]
            assert httpx.get(f"{endpoint}/v2/health/live").status_code == 200
            redis = _redis(redis_port, tmp_path)  # back, with the same data
            again = wait_until(
                lambda: (r := httpx.post(url, json=body, timeout=60)).status_code == 200 and r,
                "the server to answer again",
                timeout_s=30,
            )
            assert again.json()["predictions"][0]["response"]
    finally:
        redis.terminate()
        redis.wait(timeout=30)


def _click(event_id: str) -> dict:
    return {"event_id": event_id, "request_id": "r1", "response_id": "y1", "ad_id": "a1",
            "event_timestamp": "2026-01-01T00:00:05Z"}  # fmt: skip


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root, as on the developers' and CI's machines)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_a_507_and_nothing_unstored_is_acknowledged(small_disk, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["collector", "--store", str(small_disk / "store"), "--port", str(port)]
    acknowledged: list[str] = []
    refusals: list[httpx.Response] = []
    with service("collector", args, f"{base}/healthz", tmp_path / "logs"):
        with httpx.Client(base_url=base, timeout=30) as client:
            for batch in range(400):  # about 10 kB per batch: the 2 MiB disk fills well before the end
                ids = [f"clk-{batch}-{i}-{'x' * 150}" for i in range(50)]
                reply = client.post("/v1/clicks", content=json.dumps([_click(e) for e in ids]))
                if reply.status_code == 202:
                    acknowledged += ids
                else:
                    refusals.append(reply)
                    if len(refusals) >= 3:
                        break
            assert refusals, "the disk never filled"
            assert {r.status_code for r in refusals} == {507}, [r.text for r in refusals]
            assert "database or disk is full" in refusals[0].json()["error"]
            assert "nothing of this request was stored" in refusals[0].json()["error"]
            assert client.get("/healthz").status_code == 200
    # Read back outside the full disk's process: every acknowledged click, none of the refused.
    copy = tmp_path / "copy"
    shutil.copytree(small_disk / "store", copy)
    store = EventStore(copy)
    try:
        stored = set(store.click_ids())
    finally:
        store.close()
    assert acknowledged and set(acknowledged) <= stored
    refused = {f"clk-{len(acknowledged) // 50}-0-{'x' * 150}"}
    assert not refused & stored


def _mlflow_server(root: Path, port: int) -> subprocess.Popen:
    command = mlflow_server_command(root, port)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    health = f"http://127.0.0.1:{port}/health"
    wait_until(lambda: _answers(health), "the mlflow server", timeout_s=120)
    return process


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_tracking_server_down_fails_the_gate_step_clearly_and_leaves_champion(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    settings = load_config(environ={}, overrides={"tracking": {"uri": uri}})
    name = settings.irpo.registered_model
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "card.json").write_text("{}")
    mlflow = _mlflow_server(tmp_path, port)
    try:
        versions = register_versions(settings, tmp_path / "m", 2)
        registry.promote(settings.tracking, name, versions[0], "bootstrap", "pi_0")
        (tmp_path / "evaluation").mkdir()
        (tmp_path / "evaluation" / EVALUATION_FILE).write_text(json.dumps(clear_summary()))
        mlflow.terminate()
        mlflow.wait(timeout=30)

        with pytest.raises(ServiceUnavailable, match=rf"MLflow tracking server {uri} did not answer"):
            with common.failing_epoch(
                settings.model_dump_json(), "a-parent-run"
            ):  # cannot mark it FAILED either
                gate.gate(
                    settings.model_dump_json(), str(tmp_path / "evaluation"), versions[1], "a-parent-run"
                )

        mlflow = _mlflow_server(tmp_path, port)  # back: nothing moved, nothing was half-written
        assert registry.alias_version(settings.tracking, name, registry.CHAMPION) == versions[0]
        assert registry.alias_version(settings.tracking, name, registry.CHALLENGER) is None
        info = {v["version"]: v for v in registry.show(settings.tracking, name)["versions"]}
        assert "gate.admitted" not in info[versions[1]]["tags"]
    finally:
        mlflow.terminate()
        mlflow.wait(timeout=30)
