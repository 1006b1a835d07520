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
from llm_auction.errors import PromptFormatError
from llm_auction.policy.checkpoint import check_safetensors
from llm_auction.policy.prompt import PROMPT_FORMAT


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


CARD_FILE = "policy_card.json"


def check_prompt_format(directory: Path) -> None:
    """Refuse a policy whose card says it learnt another prompt template than `build_prompt` writes:
    served or trained on, it would read prompts it never saw and answer worse without an error.
    A directory without a card (a base model before its SFT) has learnt no template; a card
    without a `prompt_format` is from before the format was recorded: the first template.
    """
    card_path = directory / CARD_FILE
    if not card_path.is_file():
        return
    trained = json.loads(card_path.read_text()).get("prompt_format", 1)
    if trained != PROMPT_FORMAT:
        raise PromptFormatError(
            f"policy {directory}: trained on prompt format {trained}, but this release writes format "
            f"{PROMPT_FORMAT} (`llm_auction.policy.prompt`); train pi_0 again (`llm-auction policy init`)"
        )


def load_policy(
    directory: Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from `directory`; never from a hub, never from pickle."""
    check_safetensors(directory)
    check_prompt_format(directory)
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
    """Save weights as safetensors with the tokenizer, and a JSON card of how it was made (`write_card`)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if card is not None:
        write_card(directory, card)
    return directory


def write_card(directory: Path, card: dict) -> Path:
    """The policy's card beside its weights, stamped with the prompt format it learnt."""
    path = directory / CARD_FILE
    path.write_text(json.dumps({**card, "prompt_format": PROMPT_FORMAT}, indent=2, default=str) + "\n")
    return path


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
