"""Step 4 of an IRPO epoch: DPO (Eq. 6) of pi_{t-1} on the epoch's pairs, with TRL and PEFT LoRA.

How Eq. 6's averaging is done with TRL. Eq. 6 averages the loss over a prompt's losers S, then over
prompts; TRL's `DPOTrainer` averages over the pairs of a mini-batch. `PromptBalancedDPOTrainer`
keeps TRL's loss and changes only which pairs a mini-batch holds: each draw picks a pair with
probability 1 / (n_prompts * |S_prompt|) (the pair set's `weight` / n_pairs), i.e. a prompt
uniformly, then one of its losers uniformly. The expected mini-batch loss is then exactly Eq. 6, on
one process or many (every rank draws the same stream and takes its share of each global batch).

The reference is the policy at the start of the epoch: the model loaded from `policy_dir` (pi_0,
or the previous epoch's merged policy) with the new LoRA adapter disabled, which is what TRL does
for a PEFT model given no `ref_model`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from datasets import Dataset
from torch.utils.data import Sampler, WeightedRandomSampler
from transformers import TrainerCallback, set_seed
from trl import DPOConfig, DPOTrainer

from llm_auction.config import Settings
from llm_auction.irpo.launch import strategy_arguments
from llm_auction.policy.lora import attach_lora, merge_adapter, save_adapter
from llm_auction.policy.model import count_parameters, load_policy, save_policy
from llm_auction.policy.warm_start import trainer_defaults
from llm_auction.tracking.registry import ADAPTER_DIR

logger = logging.getLogger(__name__)

Logger = Callable[[Mapping[str, float], int], None]


def eq6_loss(pair_losses: torch.Tensor, request_ids: list[str]) -> torch.Tensor:
    """Eq. 6 written out: the mean over each prompt's losers, then the mean over prompts (for tests)."""
    groups: dict[str, list[int]] = {}
    for index, request_id in enumerate(request_ids):
        groups.setdefault(request_id, []).append(index)
    return torch.stack([pair_losses[idx].mean() for idx in groups.values()]).mean()


def pair_dataset(pairs: pd.DataFrame) -> Dataset:
    """TRL's standard preference format; the leading space matches pi_0's SFT completions."""
    return Dataset.from_dict(
        {
            "prompt": pairs["prompt"].tolist(),
            "chosen": (" " + pairs["chosen"]).tolist(),
            "rejected": (" " + pairs["rejected"]).tolist(),
            "weight": pairs["weight"].astype(float).tolist(),
        }
    )


def prompt_balanced_sampler(weights: list[float], seed: int) -> WeightedRandomSampler:
    """Draws pair i with probability weight_i / sum(weights): a prompt uniformly, then one of its losers.

    Seeded, so every rank of a distributed run draws the same stream and takes its own share of it.
    """
    generator = torch.Generator().manual_seed(seed)
    probabilities = torch.tensor(weights, dtype=torch.double)
    return WeightedRandomSampler(probabilities, len(weights), replacement=True, generator=generator)


class PromptBalancedDPOTrainer(DPOTrainer):
    """TRL's DPO whose mini-batches sample pairs by their Eq. 6 weight (see the module docstring)."""

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler | None:
        return prompt_balanced_sampler(self.train_dataset["weight"], self.args.seed)


class _StepLogger(TrainerCallback):
    """Sends the trainer's logs (loss, rewards/margins, rewards/accuracies, ...) to MLflow, rank 0 only."""

    def __init__(self, log: Logger) -> None:
        self.log = log
        self.history: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero and logs:
            numeric = {k.replace("/", "_"): float(v) for k, v in logs.items() if isinstance(v, int | float)}
            self.history.append({"step": state.global_step, **numeric})
            self.log(numeric, state.global_step)


def dpo_arguments(settings: Settings, output_dir: str, max_steps: int | None = None) -> DPOConfig:
    """TRL's configuration from ours: every knob that matters is in `irpo.dpo` and `irpo.distributed`."""
    cfg = settings.irpo.dpo
    return DPOConfig(
        output_dir=output_dir,
        beta=cfg.beta,
        # Eq. 6, plus (sft_weight > 0) the NLL of the chosen response: DPO alone lets probability mass
        # leak to responses no pair showed it, e.g. a fourth ad marker (README, IRPO).
        loss_type=["sigmoid", "sft"] if cfg.sft_weight > 0 else ["sigmoid"],
        loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight > 0 else None,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=max_steps if max_steps is not None else -1,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        disable_tqdm=False,
        **trainer_defaults(settings),
        **strategy_arguments(settings.irpo.distributed),
    )


def train_dpo(
    settings: Settings,
    policy_dir: Path,
    pairs: pd.DataFrame,
    out_dir: Path,
    log: Logger | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """LoRA-DPO of the policy in `policy_dir`; rank 0 writes the merged policy pi_t and its adapter.

    Returns the training summary (steps, seconds, losses, the log history); on rank 0 `out_dir`
    holds pi_t (safetensors + tokenizer + card) and `out_dir/adapter` the LoRA adapter alone.
    """
    if pairs.empty:
        raise ValueError("pairs: the pair set is empty; lower irpo.delta_th or sample more prompts")
    model, tokenizer = load_policy(policy_dir)
    model.train()
    # The adapter's A matrices are drawn from torch's global stream: seed it, or runs (and ranks) differ.
    set_seed(settings.seed)
    peft_model = attach_lora(model, settings.policy.lora)
    step_logger = _StepLogger(log or (lambda metrics, step: None))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = PromptBalancedDPOTrainer(
            model=peft_model,
            ref_model=None,
            args=dpo_arguments(settings, scratch, max_steps),
            train_dataset=pair_dataset(pairs),
            processing_class=tokenizer,
            callbacks=[step_logger],
        )
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in step_logger.history if "loss" in entry]
    summary: dict[str, Any] = {
        "steps": int(result.global_step),
        "seconds": seconds,
        "train_loss": float(result.training_loss),
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": losses[-1] if losses else float("nan"),
        "pairs": len(pairs),
        "prompts": int(pairs["request_id"].nunique()),
        "trainable_parameters": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "world_size": trainer.args.world_size,
        "history": step_logger.history,
    }
    if trainer.is_world_process_zero():
        save_adapter(trainer.model, out_dir / ADAPTER_DIR)
        merged = merge_adapter(trainer.model)
        card = {
            "policy": out_dir.name,
            "reference": str(policy_dir),
            "parameters": count_parameters(merged),
            "dpo": {k: v for k, v in summary.items() if k != "history"},
            "config": settings.irpo.dpo.model_dump(),
            "lora": settings.policy.lora.model_dump(mode="json"),
        }
        save_policy(merged, tokenizer, out_dir, card)
        (out_dir / "dpo_history.json").write_text(json.dumps(step_logger.history, indent=1) + "\n")
    return summary
