"""MLflow tracking and registry."""
