"""notebooks/quickstart.ipynb runs top to bottom and its outputs say what it claims.

The notebook asserts in its cells (served predictions == onnxruntime, served accuracy == torch
accuracy, accuracy above chance); this test executes it with nbclient (a fresh kernel of this
interpreter) and then checks the outputs themselves: the two figures were drawn, the lines the
checks print are there, and the server it started is gone.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from process_marker import VARIABLE, new_marker, wait_until_marked_gone

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _text(cell: nbformat.NotebookNode) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "\n".join(parts)


def _has_image(cell: nbformat.NotebookNode) -> bool:
    return any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def test_quickstart_notebook_runs_and_its_outputs_check_out(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    marker = new_marker()  # inherited by the kernel and everything the notebook starts
    monkeypatch.setenv(VARIABLE, marker)
    monkeypatch.setenv("FEDSERVE_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    try:
        client.execute()  # raises CellExecutionError on the first failing cell (its assert)
    finally:
        nbformat.write(notebook, tmp_path / "quickstart.executed.ipynb")

    code = [c for c in notebook.cells if c.cell_type == "code"]
    text = "\n".join(_text(c) for c in code)
    for strategy in ("fedavg", "fedadam"):
        match = re.search(rf"^{strategy}\s+[0-9.]+ s\s+test acc per round: \[(.*)\]$", text, re.M)
        assert match, text
        accs = [float(a) for a in match.group(1).split(",")]
        assert len(accs) == 3 and accs[-1] > 0.5
    assert "versions: [1, 2, 3]" in text
    assert "served predictions == onnxruntime predictions:" in text
    match = re.search(
        r"served accuracy ([0-9.]+) == torch accuracy ([0-9.]+) on (\d+) test images", text
    )
    assert match and match.group(1) == match.group(2), text
    assert int(match.group(3)) == 359  # digits: 20 % of 1,797 images
    assert re.search(r"^\d+/16 correct$", text, re.M)
    assert "fedserve-serve stopped" in text
    figures = [i for i, c in enumerate(code) if _has_image(c)]
    assert len(figures) == 2, figures  # the accuracy curves and the predicted digits
    assert (tmp_path / "model_repository" / "fedserve" / "config.pbtxt").exists()
    assert wait_until_marked_gone(marker) == []
