"""The architecture's boundary, checked: the import contracts of pyproject.toml and no lazy internal imports.

The contracts themselves live in pyproject.toml `[tool.importlinter]` (`make lint` runs them too). Here they
run on the real tree, and on a scratch copy of the package with one forbidden import planted, to show that a
violation is caught and named rather than the contracts passing vacuously.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "llm_auction"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

ORACLE_CONTRACT = "Production never imports the simulator's hidden truth"
LAYERS_CONTRACT = "No package cycles"

# The entry points may import lazily (start-up time of `llm-auction --help`); nothing else may.
LAZY_IMPORTS_ALLOWED = {PACKAGE / "cli.py", PACKAGE / "__main__.py"}


def lint_imports(*args: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} is missing: pip install -e '.[dev]'"
    env = dict(os.environ, COLUMNS="400")  # rich wraps at 80 columns otherwise, splitting import lines
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def output_of(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def broken_section(output: str, contract: str) -> str:
    """The report lint-imports prints for one broken contract: from its underlined name to the next one."""
    _, marker, report = output.partition("Broken contracts\n")
    assert marker, f"no broken contracts reported:\n{output}"
    lines = [*report.splitlines(), ""]
    underlined = [i for i in range(len(lines) - 1) if lines[i].strip() and set(lines[i + 1].strip()) == {"-"}]
    for start, end in zip(underlined, [*underlined[1:], len(lines)]):
        if lines[start].strip() == contract:
            return "\n".join(lines[start + 2 : end])
    raise AssertionError(f"contract {contract!r} is not reported as broken:\n{output}")


def test_contracts_hold_on_the_source_tree():
    result = lint_imports(cwd=REPO)
    assert result.returncode == 0, output_of(result)
    assert "BROKEN" not in result.stdout, output_of(result)


PLANTS = {
    "production-imports-simulator": (
        "features/ingest.py",
        "import llm_auction.simulator  # planted",
        ORACLE_CONTRACT,
        "llm_auction.features.ingest -> llm_auction.simulator",
    ),
    "lower-layer-imports-higher": (
        "mechanism/payments.py",
        "import llm_auction.serving  # planted",
        LAYERS_CONTRACT,
        "llm_auction.mechanism.payments -> llm_auction.serving",
    ),
}


@pytest.mark.parametrize(("module", "planted", "contract", "reported"), PLANTS.values(), ids=PLANTS.keys())
def test_a_planted_import_breaks_its_contract(
    tmp_path: Path, module: str, planted: str, contract: str, reported: str
):
    scratch = tmp_path / "scratch"
    copy = scratch / "llm_auction"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    assert target.is_file(), f"{module} is gone from src/llm_auction: plant the import into another module"
    source = target.read_text().rstrip("\n")
    target.write_text(f"{source}\n{planted}\n")  # a top-level statement, appended after the module's code
    planted_line = len(source.splitlines()) + 1
    config = tmp_path / "importlinter.toml"  # the real contracts, read from a file outside the repo
    shutil.copyfile(REPO / "pyproject.toml", config)
    workdir = tmp_path / "cwd"  # lint-imports puts its working directory first on sys.path: keep it empty
    workdir.mkdir()

    # grimp analyses whatever `import llm_auction` finds: PYTHONPATH must win over the editable install.
    found = subprocess.run(
        [sys.executable, "-c", "import llm_auction; print(llm_auction.__file__)"],
        cwd=workdir,
        env=dict(os.environ, PYTHONPATH=str(scratch)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).resolve() == (copy / "__init__.py").resolve(), found.stdout

    result = lint_imports(str(config), cwd=workdir, pythonpath=scratch)
    assert result.returncode != 0, output_of(result)
    assert f"{contract} BROKEN" in result.stdout, output_of(result)
    section = broken_section(result.stdout, contract)
    # The line number proves the copy was analysed: the planted line exists nowhere else.
    planted_lines = [line for line in section.splitlines() if reported in line]
    assert any(f"l.{planted_line}" in line for line in planted_lines), output_of(result)


def lazy_internal_imports(path: Path) -> list[str]:
    """`import llm_auction...` / `from llm_auction... import` (or relative) statements inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []

    def internal(node: ast.AST) -> bool:
        if isinstance(node, ast.Import):
            return any(alias.name.split(".")[0] == "llm_auction" for alias in node.names)
        if isinstance(node, ast.ImportFrom):
            return node.level > 0 or (node.module or "").split(".")[0] == "llm_auction"
        if isinstance(node, ast.Call):  # importlib.import_module("llm_auction...") / __import__(...)
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            return (
                name in {"import_module", "__import__"}
                and bool(node.args)
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).split(".")[0] == "llm_auction"
            )
        return False

    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for node in ast.walk(function):
                if node is not function and internal(node):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    return sorted(set(found), key=lambda entry: (entry.split(":")[0], int(entry.split(":")[1])))


def test_no_function_level_imports_of_the_package():
    """Imports inside functions hide cycles from the reader (grimp still sees them); only the CLI may."""
    modules = sorted(path for path in PACKAGE.rglob("*.py") if path not in LAZY_IMPORTS_ALLOWED)
    assert len(modules) > 20, modules
    violations = [entry for path in modules for entry in lazy_internal_imports(path)]
    assert not violations, "function-level imports of llm_auction (move them to the top):\n" + "\n".join(
        violations
    )


HEAVY_LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "feast", "sentence_transformers")
REGISTRY_STEPS = ("common", "canary", "gate", "deploy")
LIGHT_STARTS = (*(f"llm_auction.pipeline.steps.{step}" for step in REGISTRY_STEPS), "llm_auction.cli")


def imported_of(module: str, libraries: tuple[str, ...]) -> list[str]:
    """Which of `libraries` a fresh interpreter holds once it has imported `module`."""
    probe = f"import sys\nimport {module}\nprint(','.join(m for m in {libraries!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return [m for m in out.stdout.strip().split(",") if m]


@pytest.mark.parametrize("module", LIGHT_STARTS)
def test_light_processes_start_without_the_training_libraries(module):
    """Each pipeline step is its own process: a step that only reads logs and moves registry
    aliases must not pay for importing torch or Feast (about 12 s of a 17 s step on 2 cores). Nor
    must every command of the CLI (`--help`, a bad option, the collector): 1 s instead of 9; a
    command that needs psi or the policy imports them when it runs.
    """
    assert imported_of(module, HEAVY_LIBRARIES) == []


@pytest.mark.parametrize("step", ("preferences", "evaluate"))
def test_the_sampling_steps_start_without_the_dpo_libraries(step):
    """build-preferences and evaluate sample and score: TRL, PEFT and datasets are train-dpo's (the
    pairs file's digest once pulled them into build-preferences, about 2 s of each epoch's start).
    The same probe sees torch and Feast, which these steps need: it can fail.
    """
    probed = ("torch", "feast", "trl", "peft", "datasets")
    assert imported_of(f"llm_auction.pipeline.steps.{step}", probed) == ["torch", "feast"]


def test_the_probed_libraries_are_installed_modules():
    """A misspelt name would make the probes above pass for nothing."""
    assert all(importlib.util.find_spec(name) is not None for name in HEAVY_LIBRARIES)
