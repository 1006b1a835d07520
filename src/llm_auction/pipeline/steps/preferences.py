"""Step 3: preference pairs, M samples per prompt from pi_{t-1} scored by R under psi_t."""

from __future__ import annotations

import json
import tempfile
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd

from llm_auction.baselines import make_baseline
from llm_auction.irpo.pairs import PAIRS_FILE, SAMPLES_FILE, STATS_FILE, file_digest
from llm_auction.irpo.sampling import build_preference_set, prompt_requests
from llm_auction.pipeline.steps.common import resolve_window, settings_from
from llm_auction.policy.generation import make_generator
from llm_auction.public.catalog import SYNTHETIC_FILE, Catalog, read_requests
from llm_auction.public.feedback import logged_requests
from llm_auction.reward.scorer import feast_reward_scorer, ranker_for
from llm_auction.tracking.registry import resolve_model
from llm_auction.tracking.runs import lineage_tags, tracked_run


def build_preferences(
    settings_json: str,
    policy_uri: str,
    pctr_dir: str,
    feedback_dir: str,
    window_start: str,
    window_end: str,
    out_dir: str,
    epoch: int,
    parent_run_id: str,
) -> dict:
    """Step 3: M samples per prompt from pi_{t-1}, scored by R under psi_t, paired.

    The prompts are the requests the server logged in the window (`irpo.prompt_source: online`),
    the public synthetic-request file, or both; user and ad features come from Feast's online
    store, as they would for a live request.
    """
    settings = settings_from(settings_json)
    cfg = settings.irpo
    start, end = resolve_window(window_start, window_end, settings.features.window_hours)
    online = (
        logged_requests(Path(feedback_dir), pd.Timestamp(start), pd.Timestamp(end)) if feedback_dir else []
    )
    synthetic_path = settings.public_dir / SYNTHETIC_FILE
    synthetic = (
        read_requests(synthetic_path, settings.mechanism.max_bid)
        if cfg.prompt_source != "online" or not online
        else []
    )
    profiles = Catalog.load(settings.public_dir).profiles()
    rng = np.random.default_rng([settings.seed, 11, epoch])
    requests = prompt_requests(online, synthetic, cfg, rng)
    if not requests:
        raise ValueError(f"window {start}/{end}: no logged requests and no synthetic requests to prompt with")
    lineage = {"epoch": epoch, "policy": policy_uri, "parent_run_id": parent_run_id}
    scorer = feast_reward_scorer(settings, Path(pctr_dir))
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        policy_dir = resolve_model(settings.tracking, policy_uri, Path(scratch))
        with closing(make_generator(settings.policy.generation, policy_dir)) as generator:
            seed = int(rng.integers(2**31))
            anchors = [make_baseline(name, settings, scorer) for name in cfg.anchors]
            ranker = ranker_for(settings, scorer)
            result = build_preference_set(
                generator, scorer, requests, profiles, cfg, seed, ranker=ranker, anchors=anchors
            )
    scorer.flush()
    out.mkdir(parents=True, exist_ok=True)
    result.pairs.to_parquet(out / PAIRS_FILE, index=False)
    result.samples.to_parquet(out / SAMPLES_FILE, index=False)
    stats = {
        **result.stats,
        "prompts_online": len({r.request_id for r in requests} & {r.request_id for r in online}),
        "policy": policy_uri,
        "pctr": pctr_dir,
        "pairs_sha256": file_digest(out / PAIRS_FILE),
        "lineage": lineage,
    }
    (out / STATS_FILE).write_text(json.dumps(stats, indent=2, default=str) + "\n")
    tags = lineage_tags("build_preferences", lineage)
    with tracked_run(settings.tracking, "irpo-pairs", tags, parent_run_id=parent_run_id or None) as run:
        if run is not None:
            params = cfg.model_dump(exclude={"dpo", "distributed"})
            run.log_params({"policy": policy_uri, "pctr": pctr_dir, **params})
            run.log_metrics({k: v for k, v in result.stats.items() if isinstance(v, float)})
            run.log_artifacts(out, "pairs")
            stats["mlflow_run_id"] = run.run_id
    return stats
