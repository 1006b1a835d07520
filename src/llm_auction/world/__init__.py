"""The seeded synthetic advertising world."""

from llm_auction.world.generate import CATEGORY_NAMES, World, generate_world

__all__ = ["CATEGORY_NAMES", "World", "generate_world"]
