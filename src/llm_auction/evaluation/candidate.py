"""Step 5 of an IRPO epoch, as a library: the candidate against the champion and the baselines.

Only what production has: held-out auction requests (a public file), the user profiles, the two
policies, and psi_t (R, its expected revenue and clicks, and the audits under it). The responses
of every policy are kept (`responses.parquet`), so that in simulation the oracle can score exactly
the same samples (`simulator.oracle`); nothing here reads the simulator.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llm_auction.baselines import PRICED, make_baseline
from llm_auction.config import GenerationConfig, Settings
from llm_auction.contracts import AuctionRequest
from llm_auction.errors import RegistryError
from llm_auction.evaluation.card import CARD_METRICS, EVALUATION_FILE, bid_response_line, format_estimate
from llm_auction.evaluation.gate import GateInputs, decide
from llm_auction.evaluation.offline import (
    price_responses,
    reward_model_metrics,
    sample_responses,
)
from llm_auction.evaluation.report import plot_comparison, plot_epoch_curves, write_report
from llm_auction.mechanism.audits import audit_monotonicity
from llm_auction.mechanism.metrics import bootstrap
from llm_auction.mechanism.ranking import to_listed_markers
from llm_auction.policy.allocator import LLMPolicy, prompts_for, rank_requests
from llm_auction.policy.generation import Generator, make_generator
from llm_auction.policy.likelihood import response_logprobs
from llm_auction.policy.model import load_policy
from llm_auction.reward.scorer import PCTRClickModel, RewardScorer, ranker_for
from llm_auction.tracking import registry

logger = logging.getLogger(__name__)

RESPONSES_FILE = "responses.parquet"
BASELINES = ("pre_generation", "post_generation")
"""The deployable auctions every evaluation compares with; IRPO's anchors join them (`compared_baselines`)."""
IR_NOTE = "first-price PPC is individually rational by construction: no one pays more than its bid per click"


def drift_kl(
    candidate_dir: Path,
    reference_dirs: Sequence[Path],
    prompts: Sequence[str],
    responses: Sequence[str],
    generation: GenerationConfig,
) -> list[float]:
    """KL(candidate || reference) for each reference, in nats per response, Monte Carlo over the
    candidate's own samples, between the distributions the sampler draws from (with
    `generation.max_ads`: renormalised over well-formed pages, as generated; at the sampling
    temperature). The candidate's likelihoods are computed once, each distinct reference's once.
    """
    sampled = {"max_ads": generation.max_ads, "temperature": generation.temperature}
    candidate = response_logprobs(*load_policy(candidate_dir), prompts, responses, **sampled)
    kls = {
        d: float(np.mean(candidate - response_logprobs(*load_policy(d), prompts, responses, **sampled)))
        for d in dict.fromkeys(reference_dirs)
    }
    return [kls[d] for d in reference_dirs]


@dataclasses.dataclass(frozen=True)
class CandidateEvaluation:
    """The summary (JSON-able, what the gate and the card read) and every policy's responses."""

    summary: dict[str, Any]
    responses: pd.DataFrame


def evaluate_candidate(
    settings: Settings,
    requests: Sequence[AuctionRequest],
    profiles: Mapping[str, str],
    candidate_dir: Path,
    champion_dir: Path,
    reference_dir: Path,
    scorer: RewardScorer,
    baselines: Sequence[str] | None = None,
    initial_dir: Path | None = None,
) -> CandidateEvaluation:
    """Candidate vs champion vs the deployable baselines on held-out requests, under psi_t.

    Candidate and champion are compared on the same requests: the gain is the bootstrap of the
    per-request difference (paired), which is tighter than two separate intervals. The baselines
    rank by bid x psi_t's standalone pCTR, the very model the policy is rewarded with. The drift is
    measured against the DPO reference and, given `initial_dir`, against pi_0 (how far the lineage
    has moved in all). `baselines` defaults to `compared_baselines(settings)`.
    """
    baselines = compared_baselines(settings) if baselines is None else baselines
    generation = settings.policy.generation
    with closing(make_generator(generation, candidate_dir)) as candidate_generator:
        with closing(make_generator(generation, champion_dir)) as champion_generator:
            return _evaluate(
                settings, requests, profiles, (candidate_generator, champion_generator),
                (candidate_dir, champion_dir, reference_dir, initial_dir), scorer, baselines,
            )  # fmt: skip


def compared_baselines(settings: Settings) -> tuple[str, ...]:
    """Pre- and post-generation, and each IRPO anchor: the policy is shown beside what it learns from."""
    return tuple(name for name in PRICED if name in (*BASELINES, *settings.irpo.anchors))


def _evaluate(
    settings: Settings,
    requests: Sequence[AuctionRequest],
    profiles: Mapping[str, str],
    generators: tuple[Generator, Generator],
    directories: tuple[Path, Path, Path, Path | None],
    scorer: RewardScorer,
    baselines: Sequence[str],
) -> CandidateEvaluation:
    m = settings.mechanism
    seed = settings.seed
    candidate_dir, champion_dir, reference_dir, initial_dir = directories
    ranker = ranker_for(settings, scorer)
    candidate = LLMPolicy(generators[0], profiles, "candidate", ranker)
    allocators = [
        ("candidate", candidate),
        ("champion", LLMPolicy(generators[1], profiles, "champion", ranker)),
        *[(name, make_baseline(name, settings, scorer)) for name in baselines],
    ]
    priced, rows = {}, {}
    for label, allocator in allocators:
        priced[label] = price_responses(scorer, requests, sample_responses(allocator, requests, seed))
        rows[label] = reward_model_metrics(priced[label], settings, seed)
    rng = np.random.default_rng([seed, 21])
    gains = {
        metric: bootstrap(
            priced["candidate"][metric].to_numpy() - priced["champion"][metric].to_numpy(),
            None,
            m.bootstrap_samples,
            m.ci_level,
            rng,
        )
        for metric in ("reward", "revenue")
    }
    # The KL of what the sampler drew: the prompts as listed, the responses as written for them.
    shown, orders = rank_requests(requests, ranker)
    prompts = prompts_for(shown, profiles)
    drawn = priced["candidate"]["response"]
    responses = [to_listed_markers(y, o) for y, o in zip(drawn, orders, strict=True)]
    references = [reference_dir] if initial_dir is None else [reference_dir, initial_dir]
    kl, *kl_to_pi0 = drift_kl(candidate_dir, references, prompts, responses, settings.policy.generation)
    audited = list(requests[: settings.gate.audit_requests])
    audit = audit_monotonicity(
        candidate,
        audited,
        PCTRClickModel(scorer),
        m.monotonicity_factors,
        n_samples=m.monotonicity_samples,
        seed=seed,
        max_ads=m.max_ads,
        bootstrap_samples=m.bootstrap_samples,
        ci_level=m.ci_level,
    )
    champion_itctr = rows["champion"]["itctr"].mean
    inputs = GateInputs(
        gain_mean=gains["reward"].mean,
        gain_ci=gains["reward"].ci,
        candidate_itctr=rows["candidate"]["itctr"].mean,
        champion_itctr=None if np.isnan(champion_itctr) else champion_itctr,
        ad_load=rows["candidate"]["ad_load"].mean,
        format_error_rate=rows["candidate"]["format_error_rate"].mean,
        kl=kl,
        monotonicity_violation_rate=audit.violation_rate,
    )
    decision = decide(inputs, settings.gate)
    summary = {
        "gate_inputs": dataclasses.asdict(inputs),
        "requests": len(requests),
        "seed": seed,
        "candidate": str(candidate_dir),
        "champion": str(champion_dir),
        "reference": str(reference_dir),
        "section": "reward model: psi_t's estimates (what production measures)",
        "policies": {label: {k: v.to_dict() for k, v in metrics.items()} for label, metrics in rows.items()},
        "gain": {name: {"metric": name, **estimate.to_dict()} for name, estimate in gains.items()},
        "kl": kl,
        "kl_to_pi0": kl_to_pi0[0] if kl_to_pi0 else None,
        "monotonicity": {
            "click_model": "psi_t",
            "requests": len(audited),
            "n_checks": audit.n_checks,
            "violations": len(audit.violations),
            "violation_rate": audit.violation_rate,
            **audit.power(m.monotonicity_samples),
        },
        "ir": IR_NOTE,
        "gate": decision.to_dict(),
    }
    responses = pd.concat(
        [frame[["request_id", "response"]].assign(policy=label) for label, frame in priced.items()],
        ignore_index=True,
    )
    return CandidateEvaluation(summary, responses[["policy", "request_id", "response"]])


def epoch_history(settings: Settings, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Metrics by IRPO epoch: earlier gated versions from the registry's tags, then this candidate.

    The champion stands for the epoch before when the registry has no gated version yet.
    """
    name = settings.irpo.registered_model
    epoch = int(summary.get("lineage", {}).get("epoch", 1))
    policies = summary["policies"]
    baselines = {b: policies[b] for b in PRICED if b in policies}
    versions = []
    if settings.tracking.uri is not None:
        try:
            versions = registry.show(settings.tracking, name)["versions"]
        except RegistryError:
            versions = []
    history = []
    for version in reversed(versions):
        tags = version["tags"]
        if "gate.admitted" in tags and int(tags.get("lineage.epoch", epoch)) < epoch:
            metrics = {
                k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")
            }
            history.append(
                {
                    "epoch": int(tags["lineage.epoch"]),
                    "policy_version": version["version"],
                    "policy": {k: {"mean": v, "ci": [None, None]} for k, v in metrics.items()},
                    "baselines": {},
                }
            )
    if not history:
        history.append(
            {
                "epoch": epoch - 1,
                "policy_version": "champion",
                "policy": policies["champion"],
                "baselines": {},
            }
        )
    return [
        *history,
        {
            "epoch": epoch,
            "policy_version": "candidate",
            "policy": policies["candidate"],
            "baselines": baselines,
        },
    ]


def write_evaluation_report(
    evaluation: CandidateEvaluation, out_dir: Path, history: Sequence[Mapping[str, Any]] = ()
) -> list[Path]:
    """evaluation.json, responses.parquet, comparison.png, epochs.png (with a history), report.html."""
    summary = evaluation.summary
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EVALUATION_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    evaluation.responses.to_parquet(out_dir / RESPONSES_FILE, index=False)
    image = plot_comparison(summary["policies"], out_dir / "comparison.png")
    images = [image]
    if history:
        images.append(plot_epoch_curves(list(history), out_dir / "epochs.png"))
    header = ["policy", *CARD_METRICS]
    table = [
        [label, *(format_estimate(m.get(k, {})) for k in CARD_METRICS)]
        for label, m in summary["policies"].items()
    ]
    checks = [
        [c["name"], f"{c['value']:.4g}", f"{c['op']} {c['bound']:.4g}", "pass" if c["passed"] else "fail"]
        for c in summary["gate"]["checks"]
    ]
    report = write_report(
        out_dir,
        f"Candidate evaluation: {'enters the canary' if summary['gate']['admitted'] else 'hold'}",
        {
            "held-out requests": str(summary["requests"]),
            "metrics": "psi_t's estimates (reward model side)",
            "reward gain": format_estimate(summary["gain"]["reward"]),
            "revenue gain under psi": format_estimate(summary["gain"]["revenue"]),
            "KL to reference": f"{summary['kl']:.4f}",
            "KL to pi_0": "n/a" if summary.get("kl_to_pi0") is None else f"{summary['kl_to_pi0']:.4f}",
            "bids drive the allocation": bid_response_line(summary["monotonicity"]),
            "gate": summary["gate"]["reason"],
        },
        {"policies": (header, table), "gate checks": (["check", "value", "bound", "result"], checks)},
        images,
    )
    return [out_dir / EVALUATION_FILE, out_dir / RESPONSES_FILE, *images, report]
