"""The irpo-epoch pipeline's steps as plain functions (what the KFP components call)."""
