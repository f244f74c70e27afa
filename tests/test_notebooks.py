"""The notebooks in experiments/notebooks run top to bottom (SMOKE=1: short and offline), and the
committed files are what experiments/notebooks/make_notebooks.py writes."""

import importlib.util
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

HERE = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "notebooks"
NOTEBOOKS = sorted(p.name for p in HERE.glob("*.ipynb"))


def _maker():
    spec = importlib.util.spec_from_file_location("make_notebooks", HERE / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebooks_are_the_generated_ones():
    maker = _maker()
    assert sorted(maker.NOTEBOOKS) == NOTEBOOKS
    for name in NOTEBOOKS:
        assert (HERE / name).read_text(encoding="utf-8") == maker.build(name), \
            f"{name} differs from make_notebooks.py's cells: run python experiments/notebooks/make_notebooks.py"
        nb = nbformat.read(HERE / name, as_version=4)
        assert "colab-badge.svg" in nb.cells[0].source and "%pip install" in nb.cells[1].source
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SMOKE", "1")
    monkeypatch.setenv("DLMJAX_REPO_DIR", str(HERE.parents[1]))  # the checkout under test (distill reads its task suite)
    nb = nbformat.read(HERE / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the cell and its traceback on any failure
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    if name == "quickstart.ipynb":
        assert [o for o in outputs if "image/png" in o.get("data", {})], "the trajectory picture was not drawn"
    text = "".join(o.get("text", "") for o in outputs)
    assert "Traceback" not in text
    assert os.environ["SMOKE"] == "1"
