"""Shared test fixtures: every test starts from an empty Pyro param store, with validation on and seeds set.

Layout: ``tests/unit/`` (one file per library module, on the tiny in-file network of ``tests/unit/tiny.py``;
no backbone weights, no data folder) and ``tests/integration/`` (MiniLM, the tiny random Llama, the data
folder, subprocesses, notebooks). Everything under ``tests/integration/`` is marked ``integration``, so
``pytest -m "not integration"`` runs the fast part alone.
"""

import os
import sys
from pathlib import Path

import pyro
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _pyro_hygiene():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def _find_data_dir():
    env = os.environ.get("BLOB_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    for c in candidates:
        if (c / "winogrande" / "train_s.jsonl").is_file():
            return c
    return None


@pytest.fixture(scope="session")
def data_dir():
    """The local benchmark folder; tests that need it skip (with the reason) on a fresh clone without it."""
    d = _find_data_dir()
    if d is None:
        pytest.skip("benchmark data not found: set BLOB_DATA_DIR to a folder laid out like ../shared/data")
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A randomly initialised 2-layer Llama saved with the MiniLM tokenizer."""
    from helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine run several times faster on one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
