"""Log-likelihood of given responses under a policy: what drift (KL) estimates are made of."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.inference_mode()
def response_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 32,
) -> np.ndarray:
    """Log pi(response | prompt) summed over the response tokens and the end-of-sequence token.

    The text is tokenized as in training (prompt, then " " + response + eos), so the numbers are
    those DPO moved.
    """
    model.eval()
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
        token_logps = (
            logits[:, :-1].float().log_softmax(-1).gather(2, input_ids[:, 1:, None].to(model.device))[..., 0]
        )
        for i, (ids, n_prompt) in enumerate(rows):
            out.append(float(token_logps[i, n_prompt - 1 : len(ids) - 1].sum()))
    return np.asarray(out)
