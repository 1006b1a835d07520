"""Feast feature store: feedback ingest, point-in-time training sets, online profiles."""
