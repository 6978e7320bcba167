"""docs/quickstart.ipynb runs, every cell, on generated data (nbclient, a real kernel): the notebook
that shows the Python API cannot fall behind it. It is committed without outputs, and its first
steps are the README's Python example."""
from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "quickstart.ipynb"

pytestmark = pytest.mark.slow


def test_the_quickstart_notebook_runs_every_cell_without_an_error(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}})  # the kernel starts in the repository
    began = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as exc:  # names the cell and the traceback
        pytest.fail(f"docs/quickstart.ipynb: a cell failed:\n{exc}")
    seconds = time.perf_counter() - began
    code = [c for c in notebook.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors and all(c.execution_count for c in code)
    shown = "".join(o.get("data", {}).get("text/plain", "") for c in code for o in c.get("outputs", []))
    assert "prediction" in shown and "baseline_wape" in shown and "promoted" in shown
    assert any("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", [])), "the plot"
    assert seconds < 120, f"the notebook took {seconds:.0f} s"


def test_the_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_the_notebook_and_the_readme_show_the_same_example():
    """The README's Python example's data and fit lines are the notebook's, word for word."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- python-example -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    notebook = "\n".join(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code")
    lines = [line.strip() for line in block.splitlines()]
    shared = [line for line in lines if line.startswith(("from manymodels", "from shared.data.synthetic", "sales = "))]
    assert len(shared) == 3 and all(line in notebook for line in shared)
    start = next(i for i, line in enumerate(lines) if "ManyModels(keys=" in line)
    call = " ".join(lines[start:start + 2]).replace("with ", "").split(" as mm")[0]
    assert " ".join(notebook.split()).count(" ".join(call.split())) == 1, call
