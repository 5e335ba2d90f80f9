"""Execute the four notebooks top to bottom in FAST mode (BLOB_NOTEBOOK_FAST=1) with nbclient; their shared set-up
(notebooks/_tutorial.py) trains the quick-start recipe."""

import importlib
import json
import os
import sys
import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
ORDER = ["01_quickstart.ipynb", "02_priors_and_guides.ipynb", "03_posterior_diagnostics.ipynb",
         "04_posterior_predictive_checks.ipynb"]


@pytest.fixture(scope="module")
def notebook_env(data_dir, tmp_path_factory):
    """FAST mode, the benchmark folder, one runs folder shared by the four notebooks (3 and 4 reuse 1's run)."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    env = {"BLOB_NOTEBOOK_FAST": "1", "BLOB_DATA_DIR": str(data_dir), "BLOB_NUM_THREADS": "1",
           "BLOB_RUNS_DIR": str(tmp_path_factory.mktemp("notebook_runs")), "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_all_four_notebooks_are_here():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(ORDER)


@pytest.mark.parametrize("fast", ["0", "1"])
def test_the_notebooks_train_the_recipe_file_with_only_the_budget_changed(fast, monkeypatch, tmp_path):
    from blob_pyro import RunConfig

    monkeypatch.setenv("BLOB_NOTEBOOK_FAST", fast)
    monkeypatch.setenv("BLOB_DATA_DIR", str(tmp_path))
    monkeypatch.syspath_prepend(str(NOTEBOOKS))
    monkeypatch.delitem(sys.modules, "_tutorial", raising=False)
    tutorial = importlib.import_module("_tutorial")
    monkeypatch.delitem(sys.modules, "_tutorial")
    recipe = json.loads(tutorial.RECIPE.read_text())
    budget = tutorial.FAST_BUDGET if fast == "1" else tutorial.FULL_BUDGET
    cfg = tutorial.recipe()
    assert {k: cfg.get(k) for k in recipe} == {**recipe, **{k: v for k, v in budget.items() if k in recipe}}
    assert {k: cfg.get(k) for k in budget} == budget and cfg.data_dir == str(tmp_path)
    default = RunConfig()
    changed = {k for k in RunConfig.field_names() if cfg.get(k) != default.get(k)}
    assert changed <= set(recipe) | set(budget) | {"data_dir"}  # every other setting is the library's default
    # runs are found again by their settings: the same settings elsewhere give the same folder, a swap another
    assert tutorial.config_hash(cfg) == tutorial.config_hash(cfg.replace(data_dir="/elsewhere"))
    assert tutorial.config_hash(cfg) != tutorial.config_hash(cfg.replace(prior_scale=0.02))


@pytest.mark.data
@pytest.mark.parametrize("name", ORDER)
def test_notebook_runs_in_fast_mode(name, notebook_env):
    import nbformat
    from nbclient import NotebookClient

    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    first = book.cells[0].source
    assert first.startswith("# ") and "BLOB_NOTEBOOK_FAST=1" in first  # the title says how to run it
    t0 = time.perf_counter()
    NotebookClient(book, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    seconds = time.perf_counter() - t0
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "mode: FAST" in text and "(FAST mode)" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plots were drawn
    assert seconds < 90, f"{name} took {seconds:.0f} s in FAST mode"
