"""The `llm-auction` command as a user runs it: a real process, its exit code and its output."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "llm-auction")
SMALL = ["--set", "world.n_users=60", "--set", "mechanism.bootstrap_samples=100"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, env=env)


def test_world_generate_is_deterministic(tmp_path: Path):
    for name in ("a", "b"):
        result = run("world", "generate", "--seed", "11", "--out", str(tmp_path / name), *SMALL)
        assert result.returncode == 0, result.stderr
    assert "requests" in result.stdout
    for file in (tmp_path / "a").iterdir():
        assert file.read_bytes() == (tmp_path / "b" / file.name).read_bytes()


def test_simulate_prints_a_table_and_writes_json(tmp_path: Path):
    out = tmp_path / "m.json"
    result = run(
        "simulate",
        "--policy",
        "oracle:pre_generation@oracle",
        "--requests",
        "200",
        "--seed",
        "3",
        "--json",
        str(out),
        *SMALL,
    )
    assert result.returncode == 0, result.stderr
    assert "pre_generation@oracle" in result.stdout and "revenue" in result.stdout
    payload = json.loads(out.read_text())
    assert payload["policy"] == "oracle:pre_generation@oracle"
    for metric in ("revenue", "social_welfare", "itctr", "ad_load", "format_error_rate"):
        entry = payload["metrics"][metric]
        lo, hi = entry["ci"]
        assert lo <= entry["mean"] <= hi and all(math.isfinite(v) for v in (lo, hi))
    assert payload["metrics"]["revenue"]["mean"] > 0


def test_simulate_on_a_saved_world_and_a_requests_file(tmp_path: Path):
    assert run("world", "generate", "--seed", "2", "--out", str(tmp_path / "w"), *SMALL).returncode == 0
    import pyarrow.parquet as pq

    ads = pq.read_table(tmp_path / "w" / "ads.parquet").to_pandas()
    requests = pq.read_table(tmp_path / "w" / "requests.parquet").to_pandas()
    row = requests.iloc[0]
    by_id = ads.set_index("ad_id")
    request = {
        "request_id": "x1",
        "user_id": row["user_id"],
        "query": row["query"],
        "ads": [
            {
                "ad_id": a,
                "advertiser_id": by_id.at[a, "advertiser_id"],
                "text": by_id.at[a, "text"],
                "bid": float(by_id.at[a, "base_bid"]),
            }
            for a in row["ad_ids"]
        ],
    }
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps(request) + "\n")
    result = run(
        "simulate",
        "--policy",
        "oracle:oracle_greedy",
        "--requests",
        "1",
        "--world",
        str(tmp_path / "w"),
        "--requests-file",
        str(path),
        *SMALL,
    )
    assert result.returncode == 0, result.stderr
    result = run("simulate", "--policy", "baseline:no_ads", "--requests", "5", "--world", str(tmp_path / "w"))
    assert result.returncode == 0, result.stderr


def test_compare_lists_every_baseline(tmp_path: Path):
    out = tmp_path / "c.json"
    result = run("compare", "--requests", "150", "--json", str(out), *SMALL)
    assert result.returncode == 0, result.stderr
    policies = json.loads(out.read_text())["policies"]
    # Without a psi only the bid-blind deployable baselines run; the truth-priced ones are references.
    references = {"pre_generation@oracle", "post_generation@oracle", "reward_greedy@oracle", "oracle_greedy"}
    assert set(policies) == {"no_ads", "random", *references}
    assert "simulation only" in result.stdout and "--pctr" in result.stderr
    best = policies["oracle_greedy"]["revenue"]["mean"]
    assert (
        best >= policies["pre_generation@oracle"]["revenue"]["mean"] > policies["random"]["revenue"]["mean"]
    )


def test_a_priced_baseline_without_a_pctr_is_a_clear_error():
    result = run("simulate", "--policy", "baseline:pre_generation", "--requests", "5", *SMALL)
    assert result.returncode == 2
    assert "pre_generation prices with pCTR" in result.stderr and "--pctr" in result.stderr
    assert "Traceback" not in result.stderr


def test_audits(tmp_path: Path):
    policy = "oracle:pre_generation@oracle"
    result = run("audit", "monotonicity", "--policy", policy, "--requests", "5", *SMALL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 violations" in result.stdout
    result = run("audit", "ir", "--policy", "oracle:post_generation@oracle", "--requests", "100", *SMALL)
    assert result.returncode == 0 and "IR holds" in result.stdout


def _request_line(**changes) -> str:
    ad = {"ad_id": "adv0000-0", "advertiser_id": "adv0000", "text": "an ad", "bid": 1.0}
    ad.update(changes.pop("ad", {}))
    request = {"request_id": "r", "user_id": "u00000", "query": "q", "ads": [ad]}
    request.update(changes)
    return json.dumps(request).replace("Infinity", "1e999")


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (_request_line(ad={"bid": -1.0}), "ads.0.bid"),
        (_request_line(ad={"bid": float("nan")}), "ads.0.bid"),
        (_request_line(ad={"bid": 1e9}), "ads.0.bid"),
        (_request_line(ads=[]), "ads"),
        (_request_line(user_id=None), "user_id"),
        ('{"request_id": "r", ', "not valid JSON"),
    ],
)
def test_bad_request_file_names_the_field(tmp_path: Path, line: str, field: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    result = run(
        "simulate", "--policy", "baseline:no_ads", "--requests", "1", "--requests-file", str(path), *SMALL
    )
    assert result.returncode == 2
    assert field in result.stderr and "line 1" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("args", "env_extra", "field"),
    [
        (["--set", "world.k_candidates=0"], {}, "world.k_candidates"),
        ([], {"LLM_AUCTION__WORLD__K_CANDIDATES": "0"}, "world.k_candidates"),
        (["--set", "world.n_userz=5"], {}, "world.n_userz: unknown key"),
        ([], {"LLM_AUCTION__MECHANISM__COLOUR": "red"}, "mechanism.colour: unknown key"),
        (["--policy", "baseline:best"], {}, "policy"),
        (["--policy", "gpt:4"], {}, "policy"),
        (["--requests", "999999999"], {}, "requests"),
        (["--profile", "staging"], {}, "profile"),
    ],
)
def test_bad_cli_input_exits_non_zero_naming_the_field(args, env_extra, field):
    import os

    env = {**os.environ, **env_extra}
    base = ["simulate", "--requests", "10", *SMALL]
    if "--policy" not in args:
        base += ["--policy", "baseline:random"]
    result = run(*base, *args, env=env)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_unknown_user_in_requests_file_is_a_user_error(tmp_path: Path):
    path = tmp_path / "r.jsonl"
    path.write_text(_request_line(user_id="nobody") + "\n")
    result = run(
        "simulate",
        "--policy",
        "oracle:oracle_greedy",
        "--requests",
        "1",
        "--requests-file",
        str(path),
        *SMALL,
    )
    assert result.returncode == 2
    assert "query" in result.stderr or "user_id" in result.stderr
    assert "Traceback" not in result.stderr
