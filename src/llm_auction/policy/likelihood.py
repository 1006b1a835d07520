"""Log-likelihood of given responses under a policy: what drift (KL) estimates are made of."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_auction.policy.generation import bracket_token_ids, forbidden_markers, marker_token_ids


@torch.inference_mode()
def response_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 32,
    max_ads: int | None = None,
    temperature: float = 1.0,
) -> np.ndarray:
    """Log pi(response | prompt) summed over the response tokens and the end-of-sequence token.

    The text is tokenized as in training (prompt, then " " + response + eos), so the numbers are
    those DPO moved. With `max_ads`, pi is the distribution the samplers draw from: the policy
    renormalised over well-formed pages at every step (`generation.WellFormedPages`, vLLM's page
    grammar), so a KL between two policies is the KL between what they actually sample. The
    `temperature` the samplers divide the logits by is applied too (the nucleus of `top_p` < 1 is
    not: a KL across two nuclei is infinite wherever one policy samples outside the other's).
    """
    model.eval()
    markers = marker_token_ids(tokenizer) if max_ads is not None else None
    brackets = None if markers is None else bracket_token_ids(tokenizer, markers)
    out: list[float] = []
    eos = tokenizer.eos_token or ""
    for start in range(0, len(prompts), batch_size):
        rows = []
        for prompt, response in zip(
            prompts[start : start + batch_size], responses[start : start + batch_size]
        ):
            prompt_ids = tokenizer(prompt)["input_ids"]
            full_ids = tokenizer(prompt + " " + response + eos)["input_ids"]
            rows.append((full_ids, len(prompt_ids)))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, _) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)).logits
        logits = logits[:, :-1].float().cpu()
        if markers is not None and brackets is not None and max_ads is not None:
            prompt_lengths = torch.tensor([n_prompt for _, n_prompt in rows])
            logits = _constrain(logits, input_ids, prompt_lengths, markers, brackets, max_ads)
        token_logps = (logits / temperature).log_softmax(-1).gather(2, input_ids[:, 1:, None])[..., 0]
        for i, (ids, n_prompt) in enumerate(rows):
            out.append(float(token_logps[i, n_prompt - 1 : len(ids) - 1].sum()))
    return np.asarray(out)


def _constrain(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    markers: torch.Tensor,
    brackets: torch.Tensor,
    max_ads: int,
) -> torch.Tensor:
    """The page grammar's mask at every position: logits[:, p] predicts token p + 1, given tokens <= p."""
    forbid = forbidden_markers(input_ids, prompt_lengths, markers, max_ads)[:, :-1]
    logits = logits.clone()
    logits[:, :, markers] = logits[:, :, markers].masked_fill(forbid, float("-inf"))
    logits[:, :, brackets] = float("-inf")
    return logits
