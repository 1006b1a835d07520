"""The feedback collector as a real process on 127.0.0.1: bad input, idempotency, auth, durability,
group commit (concurrent requests share a commit, each acknowledged only once durable)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llm_auction.serving.auth import bearer_ok
from llm_auction.serving.collector import MAX_GROUP_ENV, Click, EventStore, StoreWriteError
from llm_auction.simulator.services import free_port

TOKEN = "s3cret"


def start(store: Path, port: int, token: str | None = TOKEN, **env_vars: str) -> subprocess.Popen:
    env = {**os.environ, "LLM_AUCTION_COLLECTOR_TOKEN": token or "", **env_vars}
    command = [sys.executable, "-m", "llm_auction", "collector", "--store", str(store), "--port", str(port),
               "--max-body-bytes", "20000"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                if response.status == 200:
                    return process
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"collector did not start: {process.stderr.read().decode()[-2000:]}")


def post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST")
    for key, value in {
        "content-type": "application/json",
        "authorization": f"Bearer {TOKEN}",
        **(headers or {}),
    }.items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def click(event_id: str, **changes) -> bytes:
    event = {"event_id": event_id, "request_id": "r1", "response_id": "y1", "ad_id": "a1",
             "event_timestamp": "2026-01-01T00:00:05Z", **changes}  # fmt: skip
    return json.dumps(event).encode()


CE = {"ce-id": "inf-1", "ce-source": "policy-predictor", "ce-specversion": "1.0"}


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    store, port = tmp_path_factory.mktemp("collector"), free_port()
    process = start(store, port)
    yield port, store
    process.terminate()
    process.wait(timeout=10)


def test_bearer_ok_accepts_only_the_exact_bearer_token():
    """The shared check of the server and the collector (constant-time compare of the whole header)."""
    assert bearer_ok(f"Bearer {TOKEN}", TOKEN)
    assert not bearer_ok("Bearer s3creX", TOKEN)  # same length, last character wrong
    assert not bearer_ok(None, TOKEN)  # no header
    assert not bearer_ok("", TOKEN)
    assert not bearer_ok(f"Basic {TOKEN}", TOKEN)  # wrong scheme
    assert not bearer_ok(TOKEN, TOKEN)  # no scheme
    assert not bearer_ok(f"Bearer {TOKEN}x", TOKEN) and not bearer_ok("Bearer s3", TOKEN)  # other lengths
    assert not bearer_ok(f"Bearer {TOKEN} ", TOKEN)
    non_ascii = "t\u00f6ken"
    assert bearer_ok(f"Bearer {non_ascii}", non_ascii) and not bearer_ok(f"Bearer {non_ascii}", "token")


def test_events_are_paired_by_ce_id_and_stored_once(collector):
    port, store = collector
    request = {**CE, "ce-type": "org.kubeflow.serving.inference.request"}
    response = {**CE, "ce-type": "org.kubeflow.serving.inference.response"}
    assert post(port, "/v1/events", b'{"instances": [{"request_id": "r1"}]}', request) == (
        202, {"accepted": True, "duplicate": False},
    )  # fmt: skip
    assert post(port, "/v1/events", b'{"instances": [{"request_id": "r1"}]}', request)[1]["duplicate"] is True
    assert post(port, "/v1/events", b'{"predictions": [{"response": "text"}]}', response)[0] == 202
    assert post(port, "/v1/clicks", click("c1"))[0] == 202
    assert post(port, "/v1/clicks", click("c1")) == (202, {"accepted": 1, "duplicates": 1})
    pairs = EventStore(store).inference_pairs()
    assert pairs == [
        ("inf-1", {"instances": [{"request_id": "r1"}]}, {"predictions": [{"response": "text"}]})
    ]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [
        ("/v1/clicks", b"{not json", {}, 422, "invalid click"),
        ("/v1/clicks", click("c2", ad_id=None), {}, 422, "ad_id"),
        ("/v1/clicks", b'{"event_id": "c3"}', {}, 422, "request_id: Field required"),
        ("/v1/clicks", click("c4", event_timestamp="2026-01-01T00:00:05"), {}, 422, "event_timestamp"),
        ("/v1/clicks", click("c5", extra=1), {}, 422, "extra: unknown key"),
        ("/v1/clicks", click("c6"), {"authorization": "Bearer wrong"}, 401, "bearer token"),
        ("/v1/clicks", click("c7"), {"authorization": ""}, 401, "bearer token"),
        (
            "/v1/clicks",
            b"[" + b",".join([click(f"x{i}") for i in range(400)]) + b"]",
            {},
            413,
            "exceeds the limit",
        ),
        ("/v1/events", b"{}", {"ce-type": "org.kubeflow.serving.inference.request"}, 400, "ce-id, ce-source"),
        ("/v1/events", b"{}", {**CE, "ce-type": "something.else"}, 400, "ce-type"),
        ("/v1/events", b"{oops", {**CE, "ce-type": "x.request"}, 400, "body: not valid JSON"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_problem_and_the_collector_stays_healthy(
    collector, path, body, headers, status, message
):
    port, store = collector
    code, reply = post(port, path, body, headers)
    assert code == status and message in reply["error"], reply
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        assert response.status == 200
    assert not {"c2", "c3", "c4", "c5", "c6", "c7"} & set(EventStore(store).click_ids())


def test_metrics_count_what_happened(collector):
    port, _ = collector
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'collector_events_total{kind="click",outcome="duplicate"}' in text
    assert 'collector_rejected_total{reason="auth"}' in text
    assert "collector_commit_seconds_bucket" in text
    assert "collector_arm_refresh_errors_total 1.0" in text  # the test pair above is no auction request


@pytest.mark.slow
def test_every_acknowledged_click_survives_a_sigkill_exactly_once(tmp_path):
    port = free_port()
    process = start(tmp_path, port, token=None)
    acknowledged: list[str] = []
    lock = threading.Lock()

    def burst(worker: int) -> None:
        for i in range(10_000):
            event_id = f"w{worker}-{i}"
            try:
                code, _ = post(port, "/v1/clicks", click(event_id), {"authorization": ""})
            except OSError:
                return  # the collector is gone: this one was never acknowledged
            if code == 202:
                with lock:
                    acknowledged.append(event_id)

    threads = [threading.Thread(target=burst, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    while len(acknowledged) < 300:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    for thread in threads:
        thread.join(timeout=30)

    restarted = start(tmp_path, port, token=None)
    try:
        stored = EventStore(tmp_path).click_ids()
        assert len(stored) == len(set(stored))
        assert set(acknowledged) <= set(stored), (
            f"lost {len(set(acknowledged) - set(stored))} acknowledged clicks"
        )
        # A client retrying after the crash is acknowledged again and stored once.
        assert post(port, "/v1/clicks", click(acknowledged[0]), {"authorization": ""})[1]["duplicates"] == 1
        assert len(EventStore(tmp_path).click_ids()) == len(stored)
    finally:
        restarted.terminate()
        restarted.wait(timeout=10)


def test_export_turns_logged_inferences_and_clicks_into_the_feedback_that_ingest_reads(env, tmp_path):
    """Round trip: simulated traffic as the logger and users would send it -> store -> feedback files."""
    import numpy as np
    import pandas as pd

    from llm_auction.baselines import make_baseline
    from llm_auction.public.feedback import read_feedback
    from llm_auction.serving.export import export_feedback
    from llm_auction.simulator.experiment import evaluate_policy
    from llm_auction.simulator.feedback import feedback_logs

    requests = env.world.auction_requests(limit=60)
    result, _ = evaluate_policy(env, make_baseline("random", env.settings), requests, seed=4)
    served_at = env.world.requests.set_index("request_id")["timestamp"]
    impressions, clicks = feedback_logs(result, requests, served_at, "v3", np.random.default_rng(4))

    store = EventStore(tmp_path / "store")
    for request in requests:
        shown = impressions[impressions["request_id"] == request.request_id].sort_values("position")
        response = result.requests.set_index("request_id").loc[request.request_id, "response"]
        prediction = {
            "request_id": request.request_id,
            "response_id": f"v3:{request.request_id}",
            "response": response,
            "policy_version": "v3",
            "served_at": served_at[request.request_id].isoformat(),
            "allocation": shown[["ad_id", "advertiser_id", "position", "bid"]].to_dict("records"),
        }
        instance = request.model_dump(mode="json")
        store.add_inference(request.request_id, "request", "x.request", "policy", {"instances": [instance]})
        store.add_inference(
            request.request_id, "response", "x.response", "policy", {"predictions": [prediction]}
        )
    store.add_clicks([Click(**row) for row in clicks.to_dict("records")])
    export_feedback(store, tmp_path / "feedback")
    got_impressions, got_clicks = read_feedback(tmp_path / "feedback")

    key = ["event_id"]
    expected = impressions.sort_values(key).reset_index(drop=True)
    got = got_impressions.sort_values(key).reset_index(drop=True)
    expected["event_timestamp"] = pd.to_datetime(expected["event_timestamp"], utc=True)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    assert sorted(got_clicks["event_id"]) == sorted(clicks["event_id"])
    export_feedback(store, tmp_path / "feedback")  # again: same files, nothing added
    assert len(read_feedback(tmp_path / "feedback")[0]) == len(impressions)


def _metric(port: int, name: str) -> float:
    """One unlabelled sample of the collector's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_concurrent_clicks_share_commits_each_acknowledged_and_stored_once(tmp_path):
    """32 clients, one click per request: every request 202 once durable, every click stored once,
    far fewer commits than requests; the same click sent by all 32 at once is new to exactly one."""
    port, workers, per_worker = free_port(), 32, 12
    process = start(tmp_path, port, token=None)
    replies: list[tuple[str, int, dict]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(workers)

    def client(worker: int) -> None:
        barrier.wait()
        for i in range(per_worker):
            for event_id in (f"w{worker}-{i}", f"shared-{i}"):  # shared-i: every worker, about at once
                code, reply = post(port, "/v1/clicks", click(event_id), {"authorization": ""})
                with lock:
                    replies.append((event_id, code, reply))

    try:
        commits_before = _metric(port, "collector_commits_total")
        threads = [threading.Thread(target=client, args=(w,)) for w in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        commits = _metric(port, "collector_commits_total") - commits_before
        grouped = _metric(port, "collector_group_requests_count")
    finally:
        process.terminate()
        process.wait(timeout=10)

    assert len(replies) == 2 * workers * per_worker
    assert {code for _, code, _ in replies} == {202}, [r for r in replies if r[1] != 202][:3]
    for i in range(per_worker):
        duplicates = [reply["duplicates"] for event_id, _, reply in replies if event_id == f"shared-{i}"]
        assert sorted(duplicates) == [0] + [1] * (workers - 1), (i, duplicates)
    assert all(reply["duplicates"] == 0 for event_id, _, reply in replies if event_id.startswith("w"))
    stored = EventStore(tmp_path).click_ids()
    assert len(stored) == len(set(stored)) == (workers + 1) * per_worker
    assert set(stored) == {event_id for event_id, _, _ in replies}
    assert grouped == commits  # every commit was observed with its group size
    assert commits < len(replies) / 2, f"{commits:.0f} commits for {len(replies)} concurrent requests"


def _click(event_id: str) -> Click:
    return Click(
        event_id=event_id,
        request_id="r1",
        response_id="y1",
        ad_id="a1",
        event_timestamp="2026-01-01T00:00:05Z",
    )


def test_one_group_is_one_commit_and_tells_duplicates_inside_it_apart(tmp_path):
    """Writes queued while the connection is busy go in one transaction, in arrival order."""
    store = EventStore(tmp_path)
    try:
        assert store.add_clicks([_click("old")]) == [True] and store.commits == 1
        assert store.add_clicks([_click("next")]) == [True] and store.commits == 2  # alone: its own commit
        with store._lock:  # the connection busy (as a reader holds it): the next writes queue up
            futures = [
                store.submit_clicks([_click("a"), _click("b")]),
                store.submit_clicks([_click("a")]),  # a duplicate of a write of the same group
                store.submit_clicks([_click("c"), _click("c")]),  # a duplicate inside one request
                store.submit_clicks([_click("old")]),  # a duplicate of an earlier group
                store.submit_inference("i1", "request", "x.request", "test", {"instances": []}),
                store.submit_inference("i1", "request", "x.request", "test", {"instances": []}),
            ]
        results = [f.result(timeout=30) for f in futures]
        assert results == [[True, True], [False], [True, False], [False], [True], [False]]
        assert store.commits == 3
        assert store.click_ids() == ["a", "b", "c", "next", "old"]
    finally:
        store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.add_clicks([_click("late")])


def test_a_refused_write_fails_its_group_only(tmp_path):
    """The disk refuses one group (SQLITE_FULL from a page limit, as on a full disk): every request of
    that group gets StoreWriteError, even one that alone would have fitted, and nothing of it is
    stored; the group queued behind it commits and is acknowledged."""
    store = EventStore(tmp_path, max_group=302)  # 300 + 1 + 1 rows: the first three writes, not more
    try:
        store.add_clicks([_click("old")])
        with store._lock:
            pages = store._db.execute("PRAGMA page_count").fetchone()[0]
            store._db.execute(f"PRAGMA max_page_count = {pages + 4}")  # room for a few clicks, not 300
            big = store.submit_clicks([_click(f"big-{i}-{'x' * 150}") for i in range(300)])
            small = store.submit_clicks([_click("small")])  # fits alone: refused with its group
            duplicate = store.submit_clicks([_click("old")])
            after = [
                store.submit_clicks([_click("after-1"), _click("old")]),
                store.submit_clicks([_click("x")]),
            ]
        for future in (big, small, duplicate):
            with pytest.raises(StoreWriteError, match="nothing of this request was stored") as refused:
                future.result(timeout=30)
            assert refused.value.full
        assert [f.result(timeout=30) for f in after] == [[True, False], [True]]
        assert store.commits == 2
        assert store.click_ids() == ["after-1", "old", "x"]
    finally:
        store.close()


def test_group_size_one_commits_every_request_alone(tmp_path, monkeypatch):
    """`max_group=1` (what the bench compares against): concurrent requests, one commit each."""
    store = EventStore(tmp_path, max_group=1)
    try:
        with store._lock:
            futures = [store.submit_clicks([_click(f"c{i}")]) for i in range(8)]
        assert [f.result(timeout=30) for f in futures] == [[True]] * 8
        assert store.commits == 8
    finally:
        store.close()
    monkeypatch.setenv(MAX_GROUP_ENV, "1")
    assert EventStore(tmp_path / "env").max_group == 1
    monkeypatch.setenv(MAX_GROUP_ENV, "0")
    with pytest.raises(ValueError, match=MAX_GROUP_ENV):
        EventStore(tmp_path / "bad")


def test_a_dropped_store_stops_its_writer(tmp_path):
    """No thread outlives a store that was never closed (tests and steps open many)."""
    store = EventStore(tmp_path)
    store.add_clicks([_click("c")])
    writer = store._writer._thread
    assert writer is not None and writer.is_alive()
    del store
    gc.collect()
    writer.join(timeout=10)
    assert not writer.is_alive()


def test_the_http_path_groups_concurrent_writes_and_fails_only_a_refused_group(tmp_path):
    """`write_clicks`/`write_inference` (what the routes await): the writes of one event loop that
    arrive while a group commits form the next group; a refused group fails its own writes only."""
    store = EventStore(tmp_path, max_group=302)

    async def burst() -> list:
        await store.write_clicks([_click("old")])
        with store._lock:
            pages = store._db.execute("PRAGMA page_count").fetchone()[0]
            store._db.execute(f"PRAGMA max_page_count = {pages + 4}")
        writes = [
            store.write_clicks([_click(f"big-{i}-{'x' * 150}") for i in range(300)]),
            store.write_clicks([_click("small")]),
            store.write_inference("i1", "request", "x.request", "test", {"instances": []}),
            # 303 rows so far: the next group
            store.write_clicks([_click("after-1"), _click("old")]),
            store.write_inference("i1", "request", "x.request", "test", {"instances": []}),
            store.write_inference("i1", "request", "x.request", "test", {"instances": []}),
        ]
        return await asyncio.gather(*writes, return_exceptions=True)

    try:
        results = asyncio.run(burst())
        assert all(isinstance(r, StoreWriteError) and r.full for r in results[:3]), results[:3]
        assert results[3:] == [[True, False], True, False]
        assert store.commits == 2
        assert store.click_ids() == ["after-1", "old"]
        assert [ce_id for ce_id, *_ in store._db.execute("SELECT ce_id FROM inference_events")] == ["i1"]
    finally:
        store.close()
