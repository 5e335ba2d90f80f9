"""Set-up shared by the four tutorial notebooks: mode, folders, threads, the recipe, cached runs.

::

    from _tutorial import FAST, DATA_DIR, RUNS, start, recipe, trained, compared, finish

    start()                                   # prints "mode: FAST | data: ... | runs: ... | torch threads: 1"
    cfg = recipe()                            # configs/recipes/quickstart.json + data_dir + the mode's budget
    run_dir = trained(cfg, "quickstart-blob")  # RUNS/quickstart-blob-<hash of cfg>, trained once
    pair = compared(cfg, ["mle", "blob"], "quickstart")   # blob_pyro.compare into RUNS/quickstart-<hash>
    finish()                                  # prints "notebook ran in 93 s, 150 s of CPU time (full mode)"

Environment (read once, at import):

- ``BLOB_NOTEBOOK_FAST=1``: a smoke run (a few steps on a few examples); what
  ``tests/integration/test_notebooks.py`` executes. Unset: the recipe's full budget.
- ``BLOB_DATA_DIR``: the benchmark folder (default ``../../shared/data``, seen from ``notebooks/``).
- ``BLOB_RUNS_DIR``: where runs are kept (default ``notebooks/runs/``, git-ignored). The notebooks share runs:
  a run is found again by the hash of its settings, so notebooks 3 and 4 reuse notebook 1's.
- ``BLOB_NUM_THREADS``: torch's CPU threads (default: torch's own choice).

The task and budget are those of ``configs/recipes/quickstart.json`` (ARC-Easy, the first 400 training
examples); every other setting is the library's default (``RunConfig``), so a change in either reaches the
notebooks without editing them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

# tqdm.auto, imported by the libraries below, warns in a kernel without ipywidgets; blob_pyro's progress bars are
# off in the notebooks anyway
warnings.filterwarnings("ignore", message="IProgress not found")

import pyro  # noqa: E402
import torch  # noqa: E402

from blob_pyro import RunConfig, quiet_library_logs  # noqa: E402

__all__ = ["FAST", "DATA_DIR", "RUNS", "RECIPE", "FAST_BUDGET", "FULL_BUDGET", "start", "recipe", "config_hash", "trained",
           "compared", "predictions", "finish"]

FAST = os.environ.get("BLOB_NOTEBOOK_FAST", "0") == "1"
NOTEBOOKS = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get("BLOB_DATA_DIR", NOTEBOOKS / "../../shared/data")).resolve()
RUNS = Path(os.environ.get("BLOB_RUNS_DIR", NOTEBOOKS / "runs")).resolve()
RECIPE = NOTEBOOKS.parent / "configs" / "recipes" / "quickstart.json"
# FAST mode keeps the task and every method setting and shrinks only the budget (steps, examples, tokens),
# so all four notebooks execute in minutes in the test suite.
FAST_BUDGET = dict(train_limit=16, eval_limit=8, max_steps=4, batch_size=4, max_length=64)
# Full mode evaluates on the first 300 of the 570 dev questions, to keep a notebook near 10 minutes on 2 CPU cores:
# each of BLoB's posterior draws at prediction is a pass over the split.
FULL_BUDGET = dict(eval_limit=300)

_T0, _CPU0 = time.perf_counter(), time.process_time()


def start(seed: int = 0) -> None:
    """Quiet the libraries' logs, set torch's threads, check the data folder, seed Pyro; print the mode."""
    global _T0, _CPU0
    quiet_library_logs()
    if os.environ.get("BLOB_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["BLOB_NUM_THREADS"]))
    if not DATA_DIR.is_dir():
        raise FileNotFoundError(f"benchmark data not found in {DATA_DIR}: set BLOB_DATA_DIR")
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    _T0, _CPU0 = time.perf_counter(), time.process_time()
    print(f"mode: {'FAST' if FAST else 'full'} | data: {DATA_DIR} | runs: {RUNS} | "
          f"torch threads: {torch.get_num_threads()}")


def recipe(**overrides) -> RunConfig:
    """The quick-start recipe file as a RunConfig with this machine's data folder, the mode's budget on top
    (:data:`FAST_BUDGET` or :data:`FULL_BUDGET`), then ``overrides`` (a notebook's swaps)."""
    budget = FAST_BUDGET if FAST else FULL_BUDGET
    return RunConfig.from_file(RECIPE, {"data_dir": str(DATA_DIR), **budget, **overrides})


def config_hash(cfg: RunConfig) -> str:
    """10 hex digits of the resolved settings, without the data folder (the same run on another machine)."""
    settings = cfg.resolve().flat_dict()
    settings.pop("data_dir", None)
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def trained(cfg: RunConfig, name: str) -> Path:
    """Train ``cfg`` into RUNS/<name>-<config hash> unless a finished run is there; returns the folder."""
    from blob_pyro import train_run

    run_dir = RUNS / f"{name}-{config_hash(cfg)}"
    if (run_dir / "metrics.json").is_file():
        print(f"reusing {run_dir.name}")
        return run_dir
    t = time.perf_counter()
    train_run(cfg, run_dir, progress=False, overwrite=True)  # overwrite: only a run stopped before its metrics
    print(f"trained {run_dir.name} in {time.perf_counter() - t:.0f} s")
    return run_dir


def compared(cfg: RunConfig, methods: list[str], name: str):
    """:func:`blob_pyro.compare.compare` of ``methods`` on ``cfg`` into RUNS/<name>-<config hash>; finished
    entries are reused. Returns the :class:`~blob_pyro.compare.Comparison` (``.rows``, ``.dirs``, ``.table()``)."""
    from blob_pyro.compare import compare

    out = RUNS / f"{name}-{config_hash(cfg)}"
    todo = [m for m in methods if not (out / m / "metrics.json").is_file()]
    t = time.perf_counter()
    # figure=False: the notebooks draw the reliability diagrams inline themselves, with their own titles
    result = compare(cfg, methods, out, progress=False, figure=False)
    print(f"trained {', '.join(todo)} in {time.perf_counter() - t:.0f} s" if todo else f"reusing {out.name}")
    return result


def predictions(run_dir) -> dict:
    """A run's eval predictions (predictions.safetensors): ``labels`` (N,), ``probs`` (N, K), ``logits`` (S, N, K)."""
    from safetensors.torch import load_file

    from blob_pyro.training import PREDICTIONS

    return load_file(str(Path(run_dir) / PREDICTIONS))


def finish() -> None:
    """Print the notebook's wall time since :func:`start`, and this process's CPU time (all threads; on a shared
    machine the wall time depends on the other jobs, the CPU time much less)."""
    print(f"notebook ran in {time.perf_counter() - _T0:.0f} s, {time.process_time() - _CPU0:.0f} s of CPU time "
          f"({'FAST' if FAST else 'full'} mode)")
