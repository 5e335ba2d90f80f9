"""Running a grid: every unfinished cell in order (datasets, seeds, entries), its OOD evaluations, then the report.

Cells already finished are skipped (one whose settings differ from the grid's where its run reads them is refused,
never silently reused); a cell interrupted mid-way is started again from scratch; a cell another live runner holds
(its lock, :func:`~benchmarks.runner.files.cell_lock`) is skipped, so several runners can share one grid. One
failing cell stops the grid with its name (``keep_going``: run the rest, then fail naming every failed cell).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from blob_pyro.errors import BlobPyroError

from .cells import available_ood, run_cell, run_ood, say
from .files import CellBusy, cell_lock, check_finished, is_complete, is_finished, write_json
from .grid import BenchError, Cell, Grid, cells_of
from .report import collect_rows, report, write_csv

__all__ = ["run_grid"]


def run_grid(grid: Grid, *, progress: bool = True, keep_going: bool = False, whole: Grid | None = None) -> list[dict]:
    """Run every unfinished cell (then its OOD evaluations), write results.csv / results.md / plots.

    ``whole``: the grid ``grid`` was narrowed from (``--methods/--datasets/--seeds``); the results then cover
    every finished cell of it, so a grid run in pieces (one process per pick) keeps one complete table.
    """
    import torch

    from blob_pyro.training import run_versions

    whole = whole or grid
    cells = cells_of(grid)
    ood, skipped = available_ood(grid) if grid.ood_datasets else ([], [])
    for msg in skipped:
        say(msg)
    _preflight(grid)
    grid.report_dir.mkdir(parents=True, exist_ok=True)
    write_json(grid.report_dir / "grid.json", {
        "source": whole.source, "name": whole.name, "base": whole.base, "datasets": whole.datasets,
        "seeds": whole.seeds, "entries": [dataclasses.asdict(e) for e in whole.entries], "ood_datasets": ood,
        "skipped_ood": skipped, "last_run": {"methods": [e.name for e in grid.entries], "datasets": grid.datasets,
                                             "seeds": grid.seeds},
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "argv": sys.argv,
        "versions": run_versions()})
    failures = []
    t_grid = time.perf_counter()
    for i, cell in enumerate(cells, 1):
        tag = f"[{i}/{len(cells)}] {cell.label}"
        if is_complete(cell, ood):
            _check_cell(cell, grid)
            say(f"{tag}: finished earlier, skipped")
            continue
        t0 = time.perf_counter()
        try:
            with cell_lock(cell):
                if is_complete(cell, ood):  # another runner finished it since the check above
                    _check_cell(cell, grid)
                    say(f"{tag}: finished by another runner, skipped")
                    continue
                say(f"{tag}: {'OOD evaluation' if is_finished(cell) else 'training'} -> {cell.dir}")
                metrics = run_cell(cell, grid, progress=progress)
                if ood:
                    run_ood(cell, grid, ood, progress=progress)
        except CellBusy as busy:
            say(f"{tag}: {busy}, skipped")
            continue
        except KeyboardInterrupt:
            say(f"{tag}: interrupted; run the same command again to continue (this cell starts afresh)")
            raise
        except Exception as err:  # noqa: BLE001 - name the cell, then stop (or go on with --keep-going)
            failures.append((cell.label, err))
            say(f"{tag}: FAILED: {type(err).__name__}: {' '.join(str(err).split())}")
            if not keep_going:
                raise BenchError(f"cell {cell.label} failed: {type(err).__name__}: {' '.join(str(err).split())}") from err
            continue
        rows = metrics["bench"]["rows"]
        summary = ", ".join(f"{r} acc {100 * m['accuracy']:.1f} ece {100 * m['ece']:.1f} ({m.get('ece_bins', 15)} bins) "
                            f"nll {m['nll']:.3f}" + (f" mi {m['mutual_information']:.3f} aurc {100 * m['aurc']:.1f}"
                                                     if m.get("aurc") is not None else "")
                            for r, m in rows.items())
        say(f"{tag}: done in {time.perf_counter() - t0:.0f}s ({summary})")
        write_csv(whole, collect_rows(whole, ood))
    rows = report(whole, ood=ood, skipped=skipped)
    say(f"grid {grid.name}: {len(cells)} cells, {time.perf_counter() - t_grid:.0f}s this invocation; "
         f"results in {grid.report_dir}")
    if failures:
        names = "; ".join(f"{label} ({type(err).__name__}: {' '.join(str(err).split())[:200]})" for label, err in failures)
        # the cause tells the command line whether a user's mistake (exit 2) or a bug (exit 1, traceback) failed
        bugs = [err for _, err in failures if not isinstance(err, BlobPyroError)]
        raise BenchError(f"{len(failures)} cell(s) failed: {names}") from (bugs or [failures[0][1]])[0]
    return rows


def _check_cell(cell: Cell, grid: Grid) -> None:
    for cfg, d in zip(cell.member_configs(grid.base), cell.member_dirs()):
        check_finished(cell.label, d, cfg)


def _preflight(grid: Grid) -> None:
    """Fail before training anything when a dataset cannot be read."""
    from blob_pyro.data import load_split
    from blob_pyro.errors import DataError

    for d in grid.datasets:
        for split in ("train", "eval"):
            try:
                load_split(d, split, grid.base.get("data_dir"), limit=1)
            except DataError as err:
                raise BenchError(f"dataset {d}: {err}") from err
