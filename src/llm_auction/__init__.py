"""LLM-Auction: train and serve an LLM whose output distribution is the ad auction."""

__version__ = "0.1.0"
