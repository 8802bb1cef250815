"""The Flower app as ``flwr run`` ships it (a FAB), built without walking ignored trees.

``flwr run <dir>`` walks every file under ``<dir>`` (``flwr.cli.utils.collect_files``), resolving
each, and only then drops what ``.gitignore`` and the FAB rules exclude. In a checkout whose
virtual environment lives in the project (``.venv/``, ~67,000 files here) that walk is ~7 s of every
``fedserve-train`` start. :func:`app_files` collects the same files but never enters a directory
that the project's ``.gitignore`` ignores; :func:`stage_app` copies those of them that flwr's
publish rules keep into a directory of its own, which the launcher hands to ``flwr run``: the FAB
it builds there has the same bytes (and hash) as the one ``flwr run .`` builds from the checkout
(``tests/test_packaging.py`` checks).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pathspec
from flwr.cli.utils import filter_paths_for_publish


def app_files(root: Path) -> dict[str, Path]:
    """Relative POSIX path -> file under ``root``, as ``flwr.cli.utils.collect_files`` gives,
    less the directories ``root/.gitignore`` ignores (their files would be dropped anyway).

    Symlinks are skipped as flwr skips them. A ``.gitignore`` with a negation (``!pattern``) may
    re-include a file below an ignored directory, so then every directory is walked.
    """
    root = root.resolve()
    ignore = root / ".gitignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    spec = None
    if not any(line.strip().startswith("!") for line in lines):
        spec = pathspec.PathSpec.from_lines("gitwildmatch", lines)
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        relative_dir = base.relative_to(root).as_posix()
        prefix = "" if relative_dir == "." else f"{relative_dir}/"
        if spec is not None:
            dirnames[:] = [
                name
                for name in dirnames
                if not (base / name).is_symlink() and not spec.match_file(f"{prefix}{name}/")
            ]
        for name in filenames:
            path = base / name
            if not path.is_symlink():
                files[f"{prefix}{name}"] = path
    return files


def stage_app(root: Path, destination: Path) -> Path:
    """Copy the app's publishable files into ``destination`` (created, must not exist) and
    return it: a directory ``flwr run`` builds the same FAB from, quickly.

    Publishable: what flwr's publish rules (``.gitignore`` and its built-in excludes such as
    ``.git/``) keep, ~2.6 MB here. That is more than the FAB ships (``benchmarks/``, ``tests/``...):
    flwr refuses a ``fab-exclude`` pattern of ``pyproject.toml`` that matches no file.
    """
    destination.mkdir(parents=True)
    for relative, source in filter_paths_for_publish(app_files(root)).items():
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)  # type: ignore[arg-type]
    return destination
