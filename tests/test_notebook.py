"""notebooks/quickstart.ipynb runs top to bottom in a fresh Jupyter kernel (nbclient).

Short run: `MOEJAX_NOTEBOOK_STEPS` (the notebook's parameter cell) trains a few dozen steps
into a temporary workdir. Marked `notebook`: out of the default run, in CI's second stage
(.ci/run); `python -m pytest -m notebook` runs it.
"""
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.notebook
NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _outputs_text(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    # The kernel inherits this environment: one CPU device is what a Colab CPU runtime has.
    monkeypatch.setenv("MOEJAX_NOTEBOOK_STEPS", "30")
    monkeypatch.setenv("MOEJAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on failure
    text = _outputs_text(notebook)
    print(text)  # what a user sees (pytest -s)
    assert "held-out bits per byte" in text
    assert (tmp_path / "run" / "loss.png").read_bytes().startswith(b"\x89PNG")
    images = [out for cell in notebook.cells for out in cell.get("outputs", [])
              if "image/png" in out.get("data", {})]
    assert len(images) >= 2, "the loss curves and the expert-load heatmap are shown"
    assert "days" in text and "chip-hours" in text
    transformers_there = "skipping the import" not in text
    if transformers_there:
        difference = float(text.split("moejax vs transformers:")[1].split()[0])
        assert difference < 1e-3
