"""The scaling-law notebook: stored without outputs, runs top to bottom on the shipped example,
and the example is exactly what its script makes."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import nbformat
from conftest import REPO
from nbclient import NotebookClient

NOTEBOOKS = REPO / "notebooks"
NOTEBOOK = NOTEBOOKS / "scaling_laws.ipynb"


def test_example_results_match_their_script():
    spec = importlib.util.spec_from_file_location("make_example_results", NOTEBOOKS / "make_example_results.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.example_csv() == (NOTEBOOKS / "example_results.csv").read_text(encoding="utf-8")


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_notebook_runs(tmp_path, monkeypatch):
    # A kernelspec of our own, first on JUPYTER_PATH, so the kernel is this interpreter (with the
    # project importable) whatever `python3` kernels the machine or user has installed.
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (soda tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # leave no __pycache__ in notebooks/
    monkeypatch.setenv("MPLBACKEND", "Agg")
    before = sorted(p.name for p in NOTEBOOKS.iterdir())

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "1e+21 FLOPs, Approach 3: train N =" in text and "nearest SODA-rule shape" in text
    assert "line 67: loss is nan" in text  # the example's diverged run is reported
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before  # it wrote nothing next to itself
