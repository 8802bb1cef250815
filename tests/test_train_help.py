"""``fedserve-train --help``: one screen of the app's own help, not Hydra's generic one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TRAIN = str(Path(sys.executable).parent / "fedserve-train")


def test_help_is_one_paragraph_the_main_keys_and_three_examples(tmp_path: Path) -> None:
    done = subprocess.run(
        [TRAIN, "--help"], cwd=tmp_path, env=os.environ, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    lines = text.splitlines()
    assert lines[0].startswith("fedserve-train: federated training on Flower")
    assert "powered by hydra" not in text.lower()
    assert "== Config ==" not in text and "_target_" not in text  # no dump of the config
    assert len(lines) <= 30 and max(len(line) for line in lines) <= 100
    for key in ("dataset=", "strategy=", "rounds=", "num_clients=", "simulation.ray_address="):
        assert key in text
    examples = [line.strip() for line in lines if line.strip().startswith("fedserve-train ")]
    assert len(examples) == 3
    assert any("search=optimizer" in example for example in examples)
