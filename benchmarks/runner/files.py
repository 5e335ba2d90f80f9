"""What a cell's folder holds, and whether the cell is done.

::

    runs/<dataset>/<entry>/seed<k>/          one run folder per cell: config.json, train_log.jsonl, adapter/,
                                             posterior.safetensors, predictions.safetensors, metrics.json
                                             (written last: a cell with metrics.json is finished and skipped)
    runs/<dataset>/<entry>/seed<k>/member<j>/     ensemble members (each a run folder)
    runs/.../ood/<eval dataset>.json|.safetensors  OOD evaluations of that run
    runs/<dataset>/<entry>/.seed<k>.lock     while a runner works on the cell: its pid and host

Every file is written atomically (:mod:`blob_pyro.io`), so runner processes sharing an output folder never
read half of one. A cell is worked on by one process at a time (:func:`cell_lock`): a second runner started on
the same grid, say for other seeds, skips a cell the first holds instead of deleting its half-written folder
as an interrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from blob_pyro.config import RunConfig
from blob_pyro.errors import RunError
from blob_pyro.io import atomic_save_safetensors, atomic_write_text

from .grid import BenchError, Cell

__all__ = ["PREDICTIONS", "METRICS", "RUNTIME_KEYS", "write_json", "save_predictions", "load_predictions",
           "predictions_path", "differences", "check_finished", "clear_unfinished", "is_finished", "is_complete",
           "CellBusy", "cell_lock"]

PREDICTIONS = "predictions.safetensors"
METRICS = "metrics.json"
# settings that do not change what a cell computes (where the data/device are), ignored when resuming
RUNTIME_KEYS = ("data_dir", "device", "trust_remote_code", "checkpoint_every", "from_run")


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def save_predictions(path: Path, labels, rows: dict) -> None:
    """labels + ``<row>.probs`` (N, K) + ``<row>.logits`` (S, N, K) as safetensors (written atomically)."""
    tensors = {"labels": labels}
    for row, (probs, logits) in rows.items():
        tensors[f"{row}.probs"] = probs.float()
        if logits is not None:
            tensors[f"{row}.logits"] = logits.float()
    atomic_save_safetensors(path, tensors)


def load_predictions(path: Path) -> tuple:
    """(labels, {row: (probs, logits or None)}) from a file :func:`save_predictions` wrote."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    rows = {}
    for key in t:
        if key.endswith(".probs"):
            row = key[: -len(".probs")]
            rows[row] = (t[key], t.get(f"{row}.logits"))
    return t["labels"], rows


def predictions_path(run_dir: Path, dataset: str, eval_dataset: str) -> Path:
    """Where a cell's saved predictions on ``eval_dataset`` live (its own dev split, or an OOD one)."""
    return run_dir / PREDICTIONS if eval_dataset == dataset else run_dir / "ood" / f"{eval_dataset}.safetensors"


# ---- resuming -----------------------------------------------------------------------------------
def differences(stored: RunConfig, cfg: RunConfig) -> list[str]:
    """``setting: stored -> wanted`` for each setting two resolved configs differ in, but where data and device are
    and the settings neither run reads (:meth:`~blob_pyro.config.RunConfig.unread_settings`: ``eps`` of a point
    estimate), which change nothing the cell computed."""
    have, want = stored.flat_dict(), cfg.flat_dict()
    unread = stored.unread_settings() & cfg.unread_settings()
    keys = [k for k in want if k not in RUNTIME_KEYS and k not in unread and have.get(k) != want[k]]
    return [f"{k}: {have.get(k)!r} -> {want[k]!r}" for k in keys]


def check_finished(label: str, run_dir: Path, cfg: RunConfig) -> None:
    """Refuse a finished run folder whose config.json (flat or nested, of any version) differs from ``cfg`` in a
    setting the run reads (:func:`differences`)."""
    from blob_pyro.training import read_run_config

    try:
        stored = read_run_config(run_dir)
    except RunError as err:
        raise BenchError(f"{label}: {run_dir} has {METRICS} but no usable config.json ({err}); delete the folder to "
                         f"rerun it") from err
    diff = differences(stored, cfg)
    if diff:
        raise BenchError(f"{label}: {run_dir} finished with other settings ({'; '.join(diff[:3])}); delete it "
                         f"or use another output_dir")


class CellBusy(BenchError):
    """Another live runner process holds the cell's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def cell_lock(cell: Cell):
    """Hold ``cell``'s lock file (beside its folder, which an interrupted cell's restart deletes) while the body runs.

    Raises :class:`CellBusy` when a live process on this host holds it. A lock left by a process that no longer
    runs (killed, machine restarted) is taken over; one from another host is trusted, since its process cannot
    be checked from here. The lock is removed on the way out, whatever happened in the body.
    """
    path = cell.dir.parent / f".{cell.dir.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):  # vanished or half-written between the two calls: try again
                holder = None
            if holder is not None and (holder.get("host") != me["host"] or _alive(int(holder.get("pid", -1)))):
                raise CellBusy(f"being run by another runner (pid {holder.get('pid')} on {holder.get('host')}; "
                               f"lock {path})") from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    else:
        raise CellBusy(f"could not take the lock {path}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clear_unfinished(label: str, run_dir: Path) -> None:
    """Remove a half-written run folder (a crash or Ctrl-C mid-cell) so the cell starts afresh."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir() or (any(run_dir.iterdir()) and not (run_dir / "config.json").is_file()
                                and not any(run_dir.glob("member*"))):
        raise BenchError(f"{label}: {run_dir} exists but is not a run folder; refusing to delete it")
    shutil.rmtree(run_dir)


def is_finished(cell: Cell) -> bool:
    """Trained and evaluated (metrics.json is written last)."""
    return (cell.dir / METRICS).is_file()


def _rows_in(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data.get("bench", data).get("rows", {})


def is_complete(cell: Cell, ood: Iterable[str] = ()) -> bool:
    """Finished, with every prediction row the entry asks for, in-distribution and on each OOD dataset."""
    wanted = list(cell.entry.predict)
    paths = [cell.dir / METRICS] + [cell.dir / "ood" / f"{d}.json" for d in ood]
    return all(all(r in _rows_in(path) for r in wanted) for path in paths)
