"""`python -m llm_auction` is the `llm-auction` command (what `torchrun -m llm_auction` launches)."""

from llm_auction.cli import main

main()
