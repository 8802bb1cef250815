"""The benchmark's model repository: versions made by real ``fedserve-train`` runs, built once.

Three training runs publish into one repository (2 clients, 1 local epoch a round, so each run takes
a minute or two here, most of it Flower's and Ray's start-up): a digits MLP (6 versions), an MNIST
CNN (7 versions; ``dataset=idx`` over the 10k MNIST files, 2,000 training images) and a digits
ResNet-18 (3 versions), 16 versions in all. The repository is cached under
``outputs/scheduler_bench/repository`` (gitignored) and built only when missing; ``--rebuild``
makes it again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import ROOT

CACHE = ROOT / "outputs" / "scheduler_bench"
REPOSITORY = CACHE / "repository"


@dataclass(frozen=True)
class Run:
    model_name: str
    overrides: tuple[str, ...]


def runs(mnist: Path) -> list[Run]:
    common = ("num_clients=2", "train.local_epochs=1", "export.keep_last=20", "seed=0")
    return [
        Run("digits_mlp", ("dataset=digits", "model=mlp", "rounds=6", *common)),
        Run(
            "mnist_cnn",
            (
                "dataset=idx",
                f"dataset.root={mnist}",
                "dataset.limit_train=2000",
                "model=cnn",
                "rounds=7",
                *common,
            ),
        ),
        Run("digits_resnet18", ("dataset=digits", "model=resnet18", "rounds=3", *common)),
    ]


def default_mnist() -> Path:
    """``../shared/data/mnist`` next to the checkout (or next to its worktree directory)."""
    for base in (ROOT.parent, ROOT.parent.parent):
        path = base / "shared" / "data" / "mnist"
        if path.is_dir():
            return path
    return ROOT.parent / "shared" / "data" / "mnist"


def ensure_repository(mnist: Path, rebuild: bool = False) -> Path:
    """The cached repository, trained into existence when missing (or with ``rebuild``)."""
    if rebuild and CACHE.exists():
        shutil.rmtree(CACHE)
    done = CACHE / "complete"
    if done.exists():
        return REPOSITORY
    if not mnist.is_dir():
        raise SystemExit(f"MNIST IDX files not found at {mnist}; pass --mnist <dir>")
    shutil.rmtree(REPOSITORY, ignore_errors=True)
    env = dict(
        os.environ,
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONPATH=str(ROOT),
    )
    for run in runs(mnist):
        job = CACHE / "train" / run.model_name
        cmd = [
            sys.executable,
            "-m",
            "server.cli",
            *run.overrides,
            f"repository={REPOSITORY}",
            f"export.model_name={run.model_name}",
            f"hydra.run.dir={job}",
        ]
        print(f"training {run.model_name}: {' '.join(cmd[3:])}", flush=True)
        job.mkdir(parents=True, exist_ok=True)
        with open(job / "train.log", "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"training {run.model_name} failed ({proc.returncode}); see {job}")
    done.write_text("ok\n")
    return REPOSITORY


if __name__ == "__main__":
    print(ensure_repository(default_mnist(), rebuild="--rebuild" in sys.argv))
