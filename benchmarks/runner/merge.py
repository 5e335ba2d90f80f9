"""Merge: one table from results.csv files written in several output folders (e.g. on several machines).

::

    python -m benchmarks.runner merge configs/bench_cpu.json --from other/bench_cpu/results.csv

Reads any results.csv this runner wrote, committed ones under benchmarks/results/ included.
"""

from __future__ import annotations

import csv
from pathlib import Path

from blob_pyro.io import atomic_write_text

from .cells import METRIC_NAMES
from .grid import BenchError, Cell, Grid
from .report import results_markdown, seed_key, write_csv, write_metric_charts

__all__ = ["merge_results"]

_ROW_KEY = ("entry", "method", "dataset", "eval_dataset", "seed")


def _read_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise BenchError(f"cannot read {path}: {err}") from None
    missing = [c for c in _ROW_KEY + METRIC_NAMES if rows and c not in rows[0]]
    if missing:
        raise BenchError(f"{path} is not a results.csv of this runner (no column {missing[0]!r})")
    return rows


def merge_results(grid: Grid, sources: list) -> list[dict]:
    """Merge ``results.csv`` files into the grid's report folder: results.csv, results.md, metric bar charts.

    The report folder's own results.csv (if any) comes first, then each source; a row (entry, result row, train and
    eval dataset, seed) found in several files must have the same metrics in all of them (a column one file lacks,
    such as the uncertainty metrics in a results.csv written before them, is taken from the other), and a row's step
    budget and batch size must be the grid's, else nothing is written.
    Rows are kept in grid order (datasets as given, seeds, entries, rows). Reliability diagrams pool the saved
    predictions of every seed, which a results.csv does not hold, so they are left as they are.
    """
    own = grid.report_dir / "results.csv"
    files = ([own] if own.is_file() else []) + [Path(s) for s in sources]
    entries = {e.name: i for i, e in enumerate(grid.entries)}
    row_pos = {r: i for e in grid.entries for i, r in enumerate(e.predict)}
    datasets = {d: i for i, d in enumerate(grid.datasets)}
    merged: dict = {}
    for path in files:
        for r in _read_rows(path):
            if r["entry"] not in entries or r["method"] not in row_pos or r["dataset"] not in datasets:
                raise BenchError(f"{path}: row {r['method']!r} of entry {r['entry']!r} on {r['dataset']!r} is not "
                                 f"in the grid {grid.source} (its entries, rows and datasets)")
            cfg = Cell(grid.entries[entries[r["entry"]]], r["dataset"], 0, Path()).member_configs(grid.base)[0]
            other = [f"{k} {r[k]} (grid: {cfg.get(k)})" for k in ("max_steps", "batch_size")
                     if r.get(k) not in (None, "") and int(float(r[k])) != cfg.get(k)]
            if other:  # a cell trained with other settings must not join this grid's seed means
                raise BenchError(f"{path}: row {r['method']!r} of {r['dataset']!r} seed {r['seed']} was trained with "
                                 f"{', '.join(other)}; merge results of the same grid settings only")
            key = tuple(r[k] for k in _ROW_KEY)
            old = merged.get(key)
            if old is not None and any(old[k] != r[k] for k in METRIC_NAMES):
                raise BenchError(f"{path}: row {'/'.join(key)} differs from the one already merged "
                                 f"({', '.join(f'{k} {old[k]} vs {r[k]}' for k in METRIC_NAMES if old[k] != r[k])})")
            if old is not None:  # the same row: an older file may lack the columns added since (empty there)
                old.update({k: v for k, v in r.items() if old.get(k) in (None, "") and v not in (None, "")})
            merged.setdefault(key, r)
    ood = {d: i for i, d in enumerate(grid.ood_datasets)}

    def order(r):
        own_split = r["eval_dataset"] == r["dataset"]
        return (datasets[r["dataset"]], seed_key(str(r["seed"])), entries[r["entry"]], not own_split,
                ood.get(r["eval_dataset"], len(ood)), r["eval_dataset"], row_pos[r["method"]])

    rows = []
    for r in sorted(merged.values(), key=order):
        t = {k: (None if v == "" else v) for k, v in r.items()}
        t["seed"] = int(t["seed"]) if str(t["seed"]).lstrip("-").isdigit() else t["seed"]
        rows.append(t)
    write_csv(grid, rows)
    if rows:
        atomic_write_text(grid.report_dir / "results.md", results_markdown(grid, rows))
        write_metric_charts(grid, rows)
    return rows
