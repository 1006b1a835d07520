"""Sampling M responses per prompt, behind one interface: `transformers` (CPU/GPU) or vLLM (GPU).

Both are seeded: the same prompts, seed and batch size give the same samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from llm_auction.config import GenerationConfig
from llm_auction.mechanism.grammar import marker
from llm_auction.policy.model import load_policy
from llm_auction.policy.tokenizer import MAX_MARKERS

logger = logging.getLogger(__name__)


class Generator(Protocol):
    def generate(self, prompts: Sequence[str], n: int, seed: int) -> list[list[str]]:
        """`n` sampled responses for each prompt, in prompt order."""
        ...


class WellFormedPages(LogitsProcessor):
    """Grammar-constrained sampling: only the ads listed in the prompt, each at most once, `max_ads` in all.

    Markers are single tokens, so the grammar is a mask on the logits: what is sampled is the
    policy's distribution renormalised over well-formed pages. Without it, DPO's shifts leak mass
    to a fourth or a repeated marker, which the gate counts as format errors.
    """

    def __init__(self, marker_ids: torch.Tensor, prompt_length: int, max_ads: int) -> None:
        self.marker_ids = marker_ids
        self.prompt_length = prompt_length
        self.max_ads = max_ads
        self._listed: torch.Tensor | None = None  # the prompts never change during one generate call

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        markers = self.marker_ids.to(input_ids.device)
        if self._listed is None or self._listed.shape[0] != input_ids.shape[0]:
            self._listed = (input_ids[:, : self.prompt_length, None] == markers).any(1)
        listed = self._listed
        written = input_ids[:, self.prompt_length :, None] == markers
        full = written.sum((1, 2)) >= self.max_ads
        forbid = ~listed | written.any(1) | full[:, None]
        scores[:, markers] = scores[:, markers].masked_fill(forbid, float("-inf"))
        return scores


def marker_token_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor | None:
    """Token ids of `[AD 1]`..`[AD 64]` when each is one token (the local tokenizer); else None."""
    ids = []
    for k in range(1, MAX_MARKERS + 1):
        encoded = tokenizer(marker(k), add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            return None
        ids.append(encoded[0])
    return torch.tensor(ids, dtype=torch.long)


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

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], n: int, seed: int) -> list[list[str]]:
        out: list[list[str]] = []
        device = self.model.device
        # fork_rng: seeding here must not change the caller's torch random stream.
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.cfg.batch_size):
                batch = list(prompts[start : start + self.cfg.batch_size])
                encoded = self.tokenizer(batch, return_tensors="pt", padding=True).to(device)
                grammar = LogitsProcessorList()
                if self.marker_ids is not None and self.cfg.max_ads is not None:
                    width = encoded["input_ids"].shape[1]
                    grammar.append(WellFormedPages(self.marker_ids, width, self.cfg.max_ads))
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
    """vLLM's `LLM.generate` with `n` samples per prompt and an optional LoRA adapter (GPU only)."""

    def __init__(self, model_dir: Path, cfg: GenerationConfig, lora_dir: Path | None = None) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError(
                "generation.backend=vllm needs the `vllm` package and a GPU (pip install '.[gpu]'); "
                "set policy.generation.backend=transformers to sample on the CPU"
            ) from exc
        self.cfg = cfg
        self.lora_dir = lora_dir
        self.llm = LLM(model=str(model_dir), enable_lora=lora_dir is not None, seed=0)

    def generate(self, prompts: Sequence[str], n: int, seed: int) -> list[list[str]]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        params = SamplingParams(
            n=n,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            max_tokens=self.cfg.max_new_tokens,
            seed=seed,
        )
        lora = LoRARequest("policy-adapter", 1, str(self.lora_dir)) if self.lora_dir else None
        results = self.llm.generate(list(prompts), params, lora_request=lora, use_tqdm=False)
        return [[o.text.strip() for o in result.outputs] for result in results]


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
