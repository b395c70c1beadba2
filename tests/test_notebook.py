"""The analysis notebook executes on a grid's results (made here by a tiny run)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from harness.grid import expand_grid
from harness.report import write_report
from harness.runner import run_grid

from .pipeline_helpers import tiny_grid

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "analysis.ipynb"


def execute_notebook(results_dir: Path, figures_dir: Path, grid: str, monkeypatch) -> str:
    """Run the notebook on results/<grid>; returns the text of every output."""
    monkeypatch.setenv("REGLA_GRID", grid)
    monkeypatch.setenv("REGLA_RESULTS_DIR", str(results_dir))
    monkeypatch.setenv("REGLA_FIGURES_DIR", str(figures_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    return "".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )


def test_analysis_notebook_executes_on_a_grid_whose_runs_all_failed(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("REGLA_CACHE_DIR", str(tmp_path / "cache"))
    data = tiny_grid(corpus, steps=4, eval_every=2)
    data["base"]["train"].update(lr=1e12, warmup_steps=0)  # steps of 1e12: both runs diverge
    grid = expand_grid(data)
    outcome = run_grid(grid, grid.runs, runs_dir=tmp_path / "runs", progress=False)
    assert {r.status for r in outcome} == {"failed"}
    write_report("tiny", tmp_path / "runs", tmp_path / "results")
    outputs = execute_notebook(tmp_path / "results", tmp_path / "figures", "tiny", monkeypatch)
    assert "no successful runs in this grid" in outputs
    assert "2 failure(s)" in outputs and "Diverged" in outputs, outputs


def test_analysis_notebook_executes_on_grid_results(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("REGLA_CACHE_DIR", str(tmp_path / "cache"))
    grid = expand_grid(tiny_grid(corpus, steps=10, eval_every=5))
    run_grid(grid, grid.runs, runs_dir=tmp_path / "runs", progress=False)
    write_report("tiny", tmp_path / "runs", tmp_path / "results")
    outputs = execute_notebook(tmp_path / "results", tmp_path / "figures", "tiny", monkeypatch)
    assert "2 runs" in outputs and "| softmax |" in outputs
    assert "| A1 / fused (time) |" in outputs and "| 4x4096x64x128 |" in outputs  # the committed kernel benchmark
    assert (tmp_path / "figures" / "loss_curves.png").stat().st_size > 0
