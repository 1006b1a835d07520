"""Offline evaluation of policies and the promotion gate."""
