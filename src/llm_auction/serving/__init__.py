"""Serving: the KServe model, the transformer, the feedback collector and rollouts."""
