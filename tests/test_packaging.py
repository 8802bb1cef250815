"""Packaging: what the FAB ships, and that every third-party import is a declared dependency."""

from __future__ import annotations

import ast
import io
import sys
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk, build_fab_from_files
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from server.app_bundle import app_files, stage_app

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: what runs from an install or a checkout (scripts/ is run as `python scripts/...`)
SHIPPED = ("task", "client", "server", "serving", "scripts")
FIRST_PARTY = {*SHIPPED, "benchmarks", "tests"}
#: run by an interpreter of their own, never ours: the venv the benchmark creates pins them
OWN_INTERPRETER = {"benchmarks/serving/pytriton_server.py"}  # PyTriton needs numpy<2
#: which dependency lists may satisfy an import from each part of the tree
GROUPS = {
    SHIPPED: ("dependencies",),
    ("tests",): ("dependencies", "dev"),
    ("benchmarks",): ("dependencies", "dev", "bench"),
}


def _fab(extra: dict[str, bytes] | None = None) -> zipfile.ZipFile:
    files: dict[str, bytes | Path] = dict(app_files(ROOT))
    files.update(extra or {})
    fab, _ = build_fab_from_files(files)
    return zipfile.ZipFile(io.BytesIO(fab))


def test_the_fab_ships_the_apps_and_conf_only() -> None:
    # what a user's checkout holds after a few runs: .gitignore keeps it out of the FAB
    runs = {
        "outputs/2026-12-04/10-00-00/history.json": b"{}",
        "multirun/2026-12-04/10-00-00/0/config.json": b"{}",
        "model_repository/fedserve/1/metadata.json": b"{}",
    }
    names = _fab(runs).namelist()
    tops = {name.split("/")[0] for name in names if "/" in name}
    assert tops == {".info", "task", "client", "server", "serving", "conf"}, tops
    assert {"pyproject.toml", "README.md"} <= set(names)
    assert "client/app.py" in names and "server/app.py" in names  # the components it names
    assert "conf/config.yaml" in names and "conf/search/optimizer.yaml" in names
    assert not any(name.endswith(".ipynb") for name in names)
    size = sum(info.compress_size for info in _fab().infolist())
    # 1.6 MB with benchmarks/ (their results), tests/ and scripts/; ~0.5 MB without
    assert size < 1_000_000, size


def test_the_staged_app_builds_the_fab_flwr_run_builds_from_the_checkout(tmp_path: Path) -> None:
    """What fedserve-train hands `flwr run` (server/app_bundle.py) ships the same bytes as
    `flwr run .`, which walks the whole checkout (.venv included)."""
    from_checkout = build_fab_from_disk(ROOT)
    assert build_fab_from_files(app_files(ROOT))[0] == from_checkout
    staged = stage_app(ROOT, tmp_path / "app")
    assert not (staged / ".venv").exists() and not (staged / ".git").exists()
    assert build_fab_from_disk(staged) == from_checkout


def test_app_files_walks_ignored_directories_when_gitignore_negates(tmp_path: Path) -> None:
    (tmp_path / ".gitignore").write_text("build/\n!build/keep.py\n")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "keep.py").write_text("")
    assert "build/keep.py" in app_files(tmp_path)
    (tmp_path / ".gitignore").write_text("build/\n")
    assert "build/keep.py" not in app_files(tmp_path)


def _requirements(key: str) -> set[str]:
    """Canonical names in ``dependencies`` or the optional list ``key`` (``fedserve[x]``
    expanded)."""
    project = PYPROJECT["project"]
    lines = (
        project["dependencies"] if key == "dependencies" else project["optional-dependencies"][key]
    )
    names: set[str] = set()
    for line in lines:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == "fedserve":
            for extra in requirement.extras:
                names |= _requirements(extra)
        else:
            names.add(canonicalize_name(requirement.name))
    return names


def _imports(part: str) -> dict[str, str]:
    """Top-level third-party modules imported anywhere under ``part`` -> one file importing it."""
    local = {path.stem for path in (ROOT / part).rglob("*.py")}
    found: dict[str, str] = {}
    for path in sorted((ROOT / part).rglob("*.py")):
        if str(path.relative_to(ROOT)) in OWN_INTERPRETER:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in FIRST_PARTY or top in local:
                    continue
                found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("parts", list(GROUPS), ids=lambda parts: "+".join(parts))
def test_every_import_is_a_declared_dependency(parts: tuple[str, ...]) -> None:
    declared = set().union(*(_requirements(key) for key in GROUPS[parts]))
    distributions = packages_distributions()
    undeclared = []
    for part in parts:
        for module, where in sorted(_imports(part).items()):
            providers = {canonicalize_name(d) for d in distributions.get(module, [])}
            if not providers & declared:
                undeclared.append(f"{module} (imported by {where}; from {sorted(providers)})")
    assert undeclared == [], f"declare these in pyproject.toml {GROUPS[parts]}: {undeclared}"


def test_the_import_walk_sees_what_it_checks() -> None:
    """The walk is not vacuous: it finds imports of each kind (plain, from, nested)."""
    shipped = {module for part in SHIPPED for module in _imports(part)}
    assert {"flwr", "torch", "hydra", "onnxruntime", "starlette", "cryptography"} <= shipped
    assert "pytest" in _imports("tests")


def test_the_search_configs_sweeper_plugin_is_declared() -> None:
    """conf/search/ selects Hydra's Optuna sweeper: a plugin no module imports."""
    assert "override /hydra/sweeper: optuna" in (ROOT / "conf/search/optimizer.yaml").read_text()
    assert "hydra-optuna-sweeper" in _requirements("dependencies")
