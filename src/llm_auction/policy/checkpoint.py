"""Weights are loaded from safetensors only: a pickle checkpoint can run code when it is loaded.

Its own module, free of the prompt and the text it reads, so that psi (`reward.pctr`) checks its
weights by the same rule without importing the sentence bank's taxonomy.
"""

from __future__ import annotations

from pathlib import Path

from llm_auction.errors import UnsafeCheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


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
