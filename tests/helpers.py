"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from llm_auction.config import Settings, deep_merge
from llm_auction.simulator.experiment import Environment
from llm_auction.simulator.parametric import ParametricClickModel

POLICY_OVERRIDES = {
    "world": {"n_requests": 2600},
    "policy": {
        "held_out_requests": 300,
        "warm_start": {"n_requests": 2300, "epochs": 3.0},
        # The pi_0 of these tests samples its SFT distribution (1.5 ads an answer, 15% with three):
        # the `local` profile's 0.5 sharpens it to 0.5 ads (three in 4% of answers), too few for the
        # tests that count pages, ads and clicks to pass by more than chance.
        "generation": {"temperature": 1.0},
    },
    "tracking": {"uri": None},
}
"""The world of the `pi0` fixture (conftest.py) and how its pi_0 is trained and sampled."""


def pi0_world_config(root: Path, **sections: Mapping[str, Any]) -> Path:
    """`root/config.yaml`: the `local` profile on the `pi0` fixture's world, sampled as the in-process
    tests sample it (`POLICY_OVERRIDES`), every store under `root`; `sections` merged into it.

    For the tests that serve pi_0 from a subprocess: the server must read the world pi_0 was trained on.
    """
    stores = {
        "data_dir": str(root / "data"),
        "features": {"data_dir": str(root / "data" / "features"), "quarantine_dir": str(root / "quarantine")},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(deep_merge(deep_merge(POLICY_OVERRIDES, stores), sections)))
    return path


TINY_EPOCH = {
    "world": {"n_requests": 2600},
    "policy": {"held_out_requests": 100, "warm_start": {"n_requests": 2300}},
    "mechanism": {"bootstrap_samples": 200},
    "pctr": {"max_epochs": 8},
    "irpo": {"n_prompts": 24, "m_samples": 4},
    "gate": {"audit_requests": 1},
}
"""Settings for one IRPO epoch in about a minute on 2 cores (the world of the `pi0` fixture)."""


def register_champion(settings: Settings, policy_dir, reason: str = "pi_0") -> str:
    """Log `policy_dir` to MLflow as a new version of the policy and make it the champion."""
    from llm_auction.tracking import registry
    from llm_auction.tracking.runs import tracked_run

    with tracked_run(settings.tracking, "policy-init") as run:
        run.log_artifacts(str(policy_dir), "policy")
        version = registry.register_version(
            settings.tracking, settings.irpo.registered_model, run.run_id, "policy"
        )
    registry.promote(settings.tracking, settings.irpo.registered_model, version, "test", reason)
    return version


def eager_users(env: Environment) -> ParametricClickModel:
    """`env`'s simulated users, each ad's click logit raised by 4 (about a third of the ads clicked).

    For tests of the click plumbing: at the world's CTR of a few percent the tests' pi_0 (about 1.3
    ads an answer at temperature 1; 0.5 at the `local` profile's 0.5) leaves a few clicks per hundred
    requests, or none, and "no click lost" then checks little or nothing.
    """
    cfg = env.settings.click_model
    return ParametricClickModel(env.world, cfg.model_copy(update={"intercept": cfg.intercept + 4.0}))


def random_traffic_frame(settings: Settings):
    """(environment, pCTR training frame, rollout): random-insertion traffic on `settings`' world
    with its simulated clicks, one row per impression (`clicked`, ad and profile texts,
    `n_same_category`). Random insertion explores positions and ads, as a logging policy should.
    """
    import numpy as np

    from llm_auction.baselines import make_baseline
    from llm_auction.simulator.experiment import build_environment, evaluate_policy
    from llm_auction.simulator.feedback import feedback_logs

    env = build_environment(settings)
    requests = env.world.auction_requests()
    rollout, _ = evaluate_policy(env, make_baseline("random", settings), requests, seed=1)
    timestamps = env.world.requests.set_index("request_id")["timestamp"]
    impressions, clicks = feedback_logs(rollout, requests, timestamps, "random", np.random.default_rng(0))
    ads = env.world.ads.set_index("ad_id")
    frame = impressions.assign(
        clicked=impressions["event_id"]
        .str.replace("imp:", "clk:", regex=False)
        .isin(set(clicks["event_id"])),
        ad_text=impressions["ad_id"].map(ads["text"]),
        category=impressions["ad_id"].map(ads["category"]),
        profile_text=impressions["user_id"].map(env.world.users.set_index("user_id")["profile_text"]),
    )
    frame["clicked"] = frame["clicked"].astype(int)
    frame["n_same_category"] = frame.groupby(["response_id", "category"])["ad_id"].transform("count") - 1
    return env, frame, rollout


class HashEncoder:
    """A stand-in for phi: a fixed random unit vector per text (no model to load, no encoding time),
    for tests of the machinery around psi rather than of what phi knows."""

    def encode(self, texts: list[str]):
        import zlib

        import numpy as np

        from llm_auction.features.encoder import EMBEDDING_DIM

        rows = [np.random.default_rng(zlib.crc32(t.encode())).normal(size=EMBEDDING_DIM) for t in texts]
        out = np.asarray(rows, dtype=np.float32).reshape(len(texts), EMBEDDING_DIM)
        return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12)


def mlflow_server_command(root, port: int) -> list[str]:
    """`mlflow server` on 127.0.0.1:`port` with its stores under `root` (one worker, our host allowed)."""
    import sys

    return [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1", "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
    ]  # fmt: skip


def register_versions(settings: Settings, model_dir, n: int) -> list[str]:
    """`n` policy versions of `model_dir` in the registry, each from its own run."""
    from llm_auction.tracking import registry
    from llm_auction.tracking.runs import tracked_run

    name, versions = settings.irpo.registered_model, []
    for _ in range(n):
        with tracked_run(settings.tracking, "dpo") as run:
            run.log_artifacts(model_dir, "policy")
            versions.append(registry.register_version(settings.tracking, name, run.run_id, "policy"))
    return versions


BLOCK_ORACLE = """
import importlib.abc, sys

class _OracleSide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[:2] in (["llm_auction", "simulator"], ["llm_auction", "world"]):
            raise ImportError(f"{name}: the oracle side is not available to the pipeline")
        return None

sys.meta_path.insert(0, _OracleSide())
"""


@contextlib.contextmanager
def oracle_blocked(folder):
    """Processes started inside begin with a sitecustomize (in `folder`) that refuses the simulator
    and the world: a pipeline step that reached for the hidden truth would fail its run.
    """
    import os

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCK_ORACLE)
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), before) if p)
    try:
        yield folder
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = before
