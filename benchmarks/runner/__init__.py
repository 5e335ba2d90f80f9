"""Benchmark grid runner: methods × datasets × seeds (+ ablation variants) from one grid file.

::

    python -m benchmarks.runner run configs/bench_cpu.json --data-dir ../shared/data       # the CPU protocol
    python -m benchmarks.runner run configs/bench_cpu.json --methods mle blob --datasets winogrande_s --seeds 1
        # runs only those cells; results.csv / .md still cover every finished cell of the grid, so
        # several such picks (e.g. one process per core) share one output folder and one table
    python -m benchmarks.runner run configs/ood_cpu.json --data-dir ../shared/data         # train on OBQA, test OOD
    python -m benchmarks.runner run configs/bench_cpu.json --dry-run                       # list cells: done / to do
    python -m benchmarks.runner report configs/bench_cpu.json                              # tables + plots only
    python -m benchmarks.runner merge configs/bench_cpu.json --from other/bench_cpu/results.csv
        # adds the rows of cells run elsewhere (another machine, another --out) to the grid's table
    python -m benchmarks.runner pilot configs/bench_cpu.json --data-dir ../shared/data     # time it, pick the budget

    from benchmarks.runner import load_grid, run_grid
    grid = load_grid("configs/bench_cpu.json", overrides={"max_steps": 5}, data_dir="../shared/data")
    rows = run_grid(grid)            # list of dicts, one per results.csv row

The runner uses blob_pyro's public API only. One module per question:

- :mod:`~benchmarks.runner.grid`: the grid file, its entries and cells, and how a run's settings are put together
  from ``base``, the method's defaults and an entry's ``overrides``;
- :mod:`~benchmarks.runner.cells`: training a cell's run(s) through :func:`blob_pyro.infer.fit`, predicting its
  result rows, ensembles, out-of-distribution evaluation;
- :mod:`~benchmarks.runner.files`: what a cell's folder holds and whether it is finished;
- :mod:`~benchmarks.runner.run`: the grid in order, skipping finished cells;
- :mod:`~benchmarks.runner.report`: results.csv, results.md (seed means, the targets table, times) and plots;
- :mod:`~benchmarks.runner.merge`: one table from results.csv files of several output folders;
- :mod:`~benchmarks.runner.pilot`: timing a few steps to pick the step budget;
- :mod:`~benchmarks.runner.cli`: the command line.

The output folder::

    runs/<dataset>/<entry>/seed<k>/          one run folder per cell (ensembles: member<j>/ inside), ood/
    <name>/results.csv                       one row per (result row, train dataset, eval dataset, seed)
    <name>/results.md                        mean ± std over seeds: ACC and ECE ×100, NLL, Brier, times
    <name>/plots/                            reliability diagrams (seeds pooled), metric bar charts
    <name>/grid.json                         the resolved grid, versions, threads

Importing this package loads nothing heavy: names load on first use, so ``python -m benchmarks.runner`` can set
``OMP_WAIT_POLICY`` before torch is imported.
"""

from importlib import import_module

_API = {
    "BenchError": "grid", "Entry": "grid", "Grid": "grid", "Cell": "grid", "load_grid": "grid", "cells_of": "grid",
    "run_config": "grid", "BENCH_METHODS": "grid",
    "train_member": "cells", "run_cell": "cells", "run_ood": "cells", "available_ood": "cells",
    "ensemble_average": "cells", "METRIC_NAMES": "cells", "UNCERTAINTY_NAMES": "cells",
    "PREDICTIONS": "files", "METRICS": "files", "is_finished": "files", "is_complete": "files",
    "run_grid": "run",
    "CSV_COLUMNS": "report", "collect_rows": "report", "markdown_table": "report", "targets_markdown": "report",
    "results_markdown": "report",
    "merge_results": "merge",
    "main": "cli",
}
# report() and pilot() share their modules' names (benchmarks.runner.report.report, .pilot.pilot): a package
# attribute would be the module once it is imported, so they are imported from their modules

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'benchmarks.runner' has no attribute {name!r}")


def __dir__():
    return __all__
