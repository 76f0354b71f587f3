"""Every notebook in notebooks/ runs top to bottom (small settings) and is stored clean."""

import os
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
COLAB_URL = "https://colab.research.google.com/github/lambda-jax/lambda_jax/blob/main/notebooks/"


def _ids(paths):
    return [path.name for path in paths]


def test_the_notebooks_exist():
    assert {path.name for path in NOTEBOOKS} >= {
        "quickstart.ipynb", "lambda_vs_attention.ipynb", "train_on_accelerators.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} has stored outputs"
            assert cell.execution_count is None, f"{path.name} cell {index} has a count"
        assert "attachments" not in cell, f"{path.name} cell {index} has attachments"
    assert "widgets" not in notebook.metadata, f"{path.name} stores widget state"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_opens_with_a_colab_badge_and_installs_first(path):
    notebook = nbformat.read(path, as_version=4)
    first, *rest = notebook.cells
    assert first.cell_type == "markdown"
    assert f"({COLAB_URL}{path.name})" in first.source
    install = next(cell for cell in rest if cell.cell_type == "code")
    assert "https://github.com/lambda-jax/lambda_jax" in install.source
    # No network in the tests: installing is skipped when the package is importable.
    assert 'find_spec("lambda_jax") is None' in install.source


def test_cloud_commands_are_shown_not_run():
    notebook = nbformat.read(REPO / "notebooks" / "train_on_accelerators.ipynb", as_version=4)
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    text = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    assert "gcloud" not in code
    for command in ("gcloud compute tpus tpu-vm create", "--worker=all",
                    "--config.distributed=True"):
        assert command in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_runs_top_to_bottom(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: the package from this checkout, the small
    # settings, a private TFDS directory, and the XLA flags of conftest.py.
    python_path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(python_path))
    monkeypatch.setenv("LAMBDA_JAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tensorflow_datasets"))
    workdir = tmp_path / "run"
    workdir.mkdir()
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()
    executed = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in executed)
    # Every plot cell produced a figure.
    for cell in executed:
        if re.search(r"plt\.show\(\)", cell.source):
            assert any("image/png" in output.get("data", {}) for output in cell.outputs), \
                f"{path.name}: no figure from\n{cell.source[:200]}"
