"""The `local` policy's tokenizer: a byte-level BPE trained offline on the world's own text.

Why not MiniLM's 30k WordPiece vocabulary: the output layer of a ~0.5M-parameter model would
dominate every step, one to two orders of magnitude costlier for nothing; the world's text needs a
few hundred tokens. Byte-level BPE round-trips any text (no unknown token; only the space before a
marker is absorbed into it), digits are split one by one so bids are compared digit by digit, and
every ad marker `[AD k]` is a single token.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llm_auction.mechanism.grammar import marker

EOS = "<|endoftext|>"
PAD = "<|pad|>"
MAX_MARKERS = 64


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train the BPE on `corpus` and wrap it for `transformers` (left padding for generation)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer=trainer)
    # lstrip: the space before a marker belongs to the marker, so "memory. [AD 4] [AD 5]" is
    # "memory", ".", "[AD 4]", "[AD 5]" and a repeated marker is the very previous token.
    core.add_tokens([AddedToken(marker(k), normalized=False, lstrip=True) for k in range(1, MAX_MARKERS + 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tokenizer
