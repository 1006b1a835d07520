"""The policy model: build the tiny local LM, or load any causal LM from a directory (safetensors only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llm_auction.config import PolicyModelConfig
from llm_auction.errors import UnsafeCheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def build_model(cfg: PolicyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A freshly initialised small Llama: the architecture vLLM and PEFT both know.

    Input and output embeddings are not tied: in a model this small, tying makes "repeat the
    current token" the default prediction, and pi_0 then repeats ad markers.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def check_safetensors(directory: Path) -> None:
    """Refuse a model directory whose weights are pickle files: loading those can execute code."""
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory}: not found")
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointError(
            f"model directory {directory}: refusing pickle checkpoint(s) {', '.join(pickles)}; "
            "only safetensors weights are loaded (convert with `save_pretrained(safe_serialization=True)`)"
        )
    if not any(directory.glob("*.safetensors")):
        raise UnsafeCheckpointError(f"model directory {directory}: no *.safetensors weights found")


def load_policy(
    directory: Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from `directory`; never from a hub, never from pickle."""
    check_safetensors(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, use_safetensors=True, dtype=dtype
    )
    model.eval()
    return model, tokenizer


def save_policy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path, card: dict | None = None
) -> Path:
    """Save weights as safetensors with the tokenizer (and a JSON card describing how it was made)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if card is not None:
        (directory / "policy_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    return directory


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
