"""PEFT LoRA adapters on the policy: attach, save, load onto a base, merge."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from llm_auction.config import LoRAConfig
from llm_auction.policy.checkpoint import check_safetensors


def attach_lora(model: PreTrainedModel, cfg: LoRAConfig) -> PeftModel:
    """Wrap `model` with fresh adapters; only the adapters train."""
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_adapter(model: PeftModel, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def load_adapter(base: PreTrainedModel, directory: Path, trainable: bool = False) -> PeftModel:
    """Put a saved adapter onto `base` (safetensors only)."""
    check_safetensors(directory)
    return PeftModel.from_pretrained(base, directory, is_trainable=trainable)


def merge_adapter(model: PeftModel) -> PreTrainedModel:
    """Fold the adapter into the base weights: one plain model to serve or to use as the next reference."""
    return model.merge_and_unload()
