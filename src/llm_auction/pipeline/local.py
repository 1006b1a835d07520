"""Run the irpo-epoch pipeline on this machine through `kfp.local` (the `local` profile's scheduler)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from llm_auction.deploy.validate import repo_root


def pipeline_function():  # noqa: ANN201
    """`pipelines.irpo_epoch.irpo_epoch`, importable from the project root (where `pipelines/` lives)."""
    root = str(repo_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("pipelines.irpo_epoch").irpo_epoch


def run_local(pipeline_root: Path, **arguments: Any) -> Any:
    """One pipeline run in subprocesses of this virtual environment; raises when a step fails."""
    from kfp import local

    pipeline_root.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True
    )
    return pipeline_function()(**arguments)
