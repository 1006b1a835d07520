"""Pipeline definitions: the irpo-epoch DAG and its recurring run."""
