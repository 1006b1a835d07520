"""Render a kustomize overlay and check every object in it, without a cluster.

An overlay is rendered by `kubectl kustomize` (the same kustomize that `kubectl apply -k` runs, so what is
checked is what would be applied), split into objects, and each object is checked against its schema
(`schemas`) and the project's policies (`policies`). The add-ons' CRDs and runtimes come from the shared
folder beside the repository (`../shared/crds`, `../shared/runtimes`).

    python -m llm_auction.deploy dev prod    # exit 1 and one line per problem if any
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from llm_auction.deploy.policies import RuntimeCatalog, check_policies
from llm_auction.deploy.problem import YAML_LOADER, Manifest, Problem
from llm_auction.deploy.schemas import check_schema

RENDER_TIMEOUT_S = 120


class KubectlNotFoundError(RuntimeError):
    """kubectl is not on PATH, so no overlay can be rendered (a setup error, never a pass)."""


class RenderError(RuntimeError):
    """kustomize could not render an overlay; the message carries its stderr."""


def repo_root() -> Path:
    """The repository this module belongs to (src/llm_auction/deploy/ is three levels down)."""
    return Path(__file__).resolve().parents[3]


def default_deploy_dir() -> Path:
    """The repository's `deploy/` folder."""
    return repo_root() / "deploy"


def default_shared_dir() -> Path:
    """The shared folder beside the repository, which holds the add-ons' CRDs and runtimes."""
    return repo_root().parent / "shared"


def overlay_names(deploy_dir: Path | None = None) -> list[str]:
    """The overlays under `deploy/overlays`, each a folder with a kustomization.yaml."""
    overlays = (deploy_dir or default_deploy_dir()) / "overlays"
    return sorted(path.parent.name for path in overlays.glob("*/kustomization.yaml"))


def render_overlay(name: str, deploy_dir: Path | None = None) -> str:
    """Render one overlay with `kubectl kustomize`.

    Raises:
        KubectlNotFoundError: kubectl is not on PATH.
        RenderError: kustomize failed (a missing file, a patch that matches nothing, ...).
    """
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise KubectlNotFoundError(
            "kubectl not found on PATH: deploy/ overlays are rendered with `kubectl kustomize` "
            "(kubectl >= 1.27, kustomize v5); install kubectl to validate or apply them"
        )
    path = (deploy_dir or default_deploy_dir()) / "overlays" / name
    result = subprocess.run(
        [kubectl, "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=RENDER_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise RenderError(f"kubectl kustomize {path} failed: {result.stderr.strip()}")
    return result.stdout


def split_documents(text: str) -> list[Manifest]:
    """The objects of a multi-document YAML stream, empty documents dropped."""
    return [doc for doc in yaml.load_all(text, Loader=YAML_LOADER) if doc is not None]


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} not found at {path}: the shared folder belongs beside the repository"
        )
    return path


def load_runtime_documents(runtime_dir: Path) -> list[Manifest]:
    """The serving and training runtimes the cluster's add-ons install."""
    docs: list[Manifest] = []
    for path in sorted(_require_dir(runtime_dir, "runtimes").glob("*.yaml")):
        docs += split_documents(path.read_text(encoding="utf-8"))
    return docs


def validate_documents(docs: Sequence[Manifest], shared_dir: Path | None = None) -> list[Problem]:
    """Check rendered objects against their schemas and the project's policies.

    Args:
        docs: the objects, as rendered.
        shared_dir: the folder with `crds/` and `runtimes/`; `../shared` beside the repository by default.

    Returns:
        Every problem found; empty when all objects may be applied.
    """
    shared = shared_dir or default_shared_dir()
    crd_dir = _require_dir(shared / "crds", "CRDs")
    catalog = RuntimeCatalog.from_documents([*load_runtime_documents(shared / "runtimes"), *docs])
    problems: list[Problem] = []
    for index, doc in enumerate(docs):
        if not isinstance(doc, dict):
            problems.append(Problem(f"document {index}", "schema", "not a mapping"))
            continue
        problems += check_schema(doc, crd_dir)
        problems += check_policies(doc, catalog)
    return problems


def validate_overlay(
    name: str, deploy_dir: Path | None = None, shared_dir: Path | None = None
) -> list[Problem]:
    """Render one overlay and check everything in it; a render failure is reported as a problem.

    Raises:
        KubectlNotFoundError: kubectl is not on PATH (a broken setup, not a finding about the overlay).
    """
    try:
        text = render_overlay(name, deploy_dir)
    except RenderError as error:
        return [Problem(f"overlay/{name}", "render", str(error))]
    return validate_documents(split_documents(text), shared_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Validate overlays by name (all of them by default); exit status 1 if any has a problem."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlays", nargs="*", help="overlay names under deploy/overlays (default: all)")
    args = parser.parse_args(argv)
    failed = False
    for name in args.overlays or overlay_names():
        problems = validate_overlay(name)
        failed = failed or bool(problems)
        for problem in problems:
            sys.stderr.write(f"{name}: {problem}\n")
        sys.stderr.write(f"{name}: {'FAILED' if problems else 'ok'} ({len(problems)} problems)\n")
    return 1 if failed else 0
