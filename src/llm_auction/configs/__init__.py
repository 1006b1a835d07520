"""Shipped configuration profiles (YAML), read with importlib.resources."""
