"""What a grid is: its file, its entries (methods and variants), its cells, and each run's settings.

A grid file (JSON or YAML)::

    {"name": "bench_cpu", "output_dir": "bench_out/cpu",
     "base": {"model": "minilm", "max_steps": 300, "batch_size": 8, "num_samples": 10},   # RunConfig settings
     "methods": ["mle", "map", "mcdropout", "ensemble", "bbb", "blob"],
     "variants": [{"name": "blob_A", "method": "blob", "overrides": {"bayesian_factor": "A"}},
                  {"name": "blob_S", "method": "blob", "predict": {"blob_N1": 1, "blob_N5": 5, "blob_N20": 20}}],
     "datasets": ["winogrande_s", "arc_easy"], "seeds": [1, 2, 3], "ensemble_size": 3,
     "ood_datasets": ["arc_challenge", "mmlu_college_physics"]}     # optional: evaluate every run there too

Every entry of ``methods`` and ``variants`` is a method name or ``{"name", "method", "overrides", "predict",
"members", "member_method", "from"}``. ``base`` and ``overrides`` hold :class:`~blob_pyro.config.RunConfig` settings
by their flat names (``"lr"``, ``"guide"``); ``predict`` maps result-row names to the number of prediction
samples (``null``: the run's ``num_samples``), all evaluated from one trained run. ``"from": "map"`` makes a
post-hoc entry (``laplace``, ``tfb``) start from the finished run of the entry ``map`` of the same dataset and
seed instead of training its own (``from_run``, :func:`blob_pyro.training.from_run_config`): the source entry
runs first, and both must share what was trained.

How a run's settings are put together (:func:`run_config`), lowest precedence first:

1. ``base``, the grid's settings for every method, except the settings the run's method (or preset) has a
   default for (:data:`blob_pyro.methods.METHODS`): there the method's default wins, so ``"num_samples": 10``
   in ``base`` gives the stochastic methods 10 draws while ``mle`` and ``map`` keep their posterior-mean
   prediction (N = 0), and ``mcdropout`` keeps its LoRA dropout of 0.1 over a ``base`` dropout of 0;
2. the method's defaults;
3. the entry's ``overrides``, explicit settings;
4. ``method``, ``dataset`` and ``seed`` from the grid.

A setting in ``base`` or ``overrides`` that contradicts what the method requires (``guide=lowrank`` for
``mle``) is refused when the grid loads, naming the cell.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from blob_pyro.config import RunConfig, read_config_file
from blob_pyro.ensemble import ENSEMBLE_SEED_STRIDE, member_dirs, member_seed
from blob_pyro.errors import BlobPyroError, ConfigError
from blob_pyro.methods import FROM_RUN_SOURCES, METHODS, PRESETS

__all__ = ["BenchError", "Entry", "Grid", "Cell", "load_grid", "cells_of", "run_config", "BENCH_METHODS",
           "ENSEMBLE_SEED_STRIDE"]

BENCH_METHODS = tuple(METHODS)  # "ensemble" is a cell of member runs here, as in blob_pyro.ensemble
_GRID_KEYS = ("name", "output_dir", "base", "methods", "variants", "datasets", "seeds", "ensemble_size",
              "ood_datasets", "description")
_ENTRY_KEYS = ("name", "method", "overrides", "predict", "members", "member_method", "from")
_GRID_SET = ("method", "dataset", "seed")  # what the grid decides per cell, never base or overrides


class BenchError(BlobPyroError):
    """A grid cannot run (bad grid file, a failed cell, settings that differ from a finished cell)."""


@dataclass
class Entry:
    """One method or variant of the grid: a trained run (or ``members`` runs) and its result rows."""

    name: str
    method: str  # a blob_pyro method, or "ensemble"
    overrides: dict = field(default_factory=dict)
    predict: dict = field(default_factory=dict)  # row -> num_samples (None: the run's); ensemble: row -> "probs"|"logits"
    members: int = 1
    member_method: str = "mle"
    source: str | None = None  # "from": the entry whose finished run a post-hoc entry starts from

    @property
    def is_ensemble(self) -> bool:
        return self.method == "ensemble"


@dataclass
class Grid:
    name: str
    output_dir: Path
    base: dict
    entries: list
    datasets: list
    seeds: list
    ood_datasets: list = field(default_factory=list)
    source: str = ""

    @property
    def report_dir(self) -> Path:
        return self.output_dir / self.name


_RESOLVED: dict[str, RunConfig] = {}  # resolving takes ~0.1 s, and a grid asks for every cell's settings often


def run_config(base: dict, overrides: dict, *, method: str, dataset: str, seed: int, where: str = "") -> RunConfig:
    """The resolved settings of one run (see the module docstring for the order); BenchError naming ``where``."""
    key = json.dumps([base, overrides, method, dataset], sort_keys=True, default=repr)
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve(base, overrides, method=method, dataset=dataset, seed=seed, where=where)
    cfg = copy.deepcopy(_RESOLVED[key])  # callers may change their copy
    cfg.fit.seed = int(seed)  # no method or preset depends on the seed
    return cfg


def _resolve(base: dict, overrides: dict, *, method: str, dataset: str, seed: int, where: str) -> RunConfig:
    preset = overrides.get("preset", base.get("preset"))
    decided = set(METHODS[method].defaults) if method in METHODS else set()
    if preset in PRESETS:
        decided |= set(PRESETS[preset].defaults)
    data = {k: v for k, v in base.items() if k not in decided}
    data.update(overrides)
    data.update(method=method, dataset=dataset, seed=seed)
    try:
        return RunConfig.from_dict(data, source=f"setting of {where}:" if where else "setting").resolve()
    except (ConfigError, TypeError) as err:
        raise BenchError(f"{where}: {err}" if where else str(err)) from err


@dataclass
class Cell:
    """One (entry, dataset, seed) of a grid; ``dir`` is its run folder (ensembles: the members' parent)."""

    entry: Entry
    dataset: str
    seed: int
    dir: Path

    @property
    def label(self) -> str:
        return f"{self.entry.name} | {self.dataset} | seed {self.seed}"

    def member_dirs(self) -> list[Path]:
        if not self.entry.is_ensemble:
            return [self.dir]
        return member_dirs(self.dir, self.entry.members)

    def member_configs(self, base: dict) -> list[RunConfig]:
        """The resolved RunConfig of every run of this cell."""
        e = self.entry
        if not e.is_ensemble:
            cfg = run_config(base, e.overrides, method=e.method, dataset=self.dataset, seed=self.seed, where=self.label)
            if e.source is not None:
                cfg.from_run = str(self.source_dir)
            return [cfg]
        return [run_config(base, e.overrides, method=e.member_method, dataset=self.dataset,
                           seed=member_seed(self.seed, j), where=self.label)
                for j in range(e.members)]

    @property
    def source_dir(self) -> Path | None:
        """The run folder a post-hoc entry starts from: its source entry's, same dataset and seed."""
        return None if self.entry.source is None else self.dir.parent.parent / self.entry.source / self.dir.name

    def member_rows(self, cfg: RunConfig) -> dict[str, int]:
        """row name -> num_samples for one member run (the run's own num_samples first)."""
        own_samples = cfg.predict.num_samples
        if self.entry.is_ensemble:
            return {"member": own_samples}
        rows = {k: (own_samples if v is None else int(v)) for k, v in self.entry.predict.items()}
        own = [k for k, v in rows.items() if v == own_samples]
        return {k: rows[k] for k in own[:1] + [k for k in rows if k not in own[:1]]}


def _check_keys(data: dict, allowed: Iterable[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            raise BenchError(f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))


def _entry(item, where: str, ensemble_size: int) -> Entry:
    if isinstance(item, str):
        item = {"name": item, "method": item}
    if not isinstance(item, dict):
        raise BenchError(f"{where}: each entry is a method name or a mapping, got {item!r}")
    _check_keys(item, _ENTRY_KEYS, where)
    method = item.get("method", item.get("name"))
    name = item.get("name", method)
    if method not in BENCH_METHODS:
        raise BenchError(f"{where}: method must be one of {', '.join(BENCH_METHODS)}; got {method!r}")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise BenchError(f"{where}: name must be a plain folder name, got {name!r}")
    overrides = item.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise BenchError(f"{where} ({name}): overrides must be a mapping of settings, got {overrides!r}")
    overrides = dict(overrides)
    for key in _GRID_SET:
        if key in overrides:
            raise BenchError(f"{where} ({name}): {key!r} is set by the grid, not in overrides")
    if method == "ensemble":
        predict = item.get("predict") or {name: "probs", f"{name}_logitavg": "logits"}
        if any(v not in ("probs", "logits") for v in predict.values()):
            raise BenchError(f"{where} ({name}): ensemble predict values are 'probs' or 'logits'")
        members = int(item.get("members", ensemble_size))
        if members < 1:
            raise BenchError(f"{where} ({name}): members must be >= 1")
        member_method = item.get("member_method", "mle")
        if member_method not in METHODS:
            raise BenchError(f"{where} ({name}): member_method must be one of {', '.join(METHODS)}")
        return Entry(name, method, overrides, dict(predict), members, member_method)
    source = item.get("from")
    if source is not None and (method not in FROM_RUN_SOURCES or not isinstance(source, str)):
        raise BenchError(f"{where} ({name}): 'from' names the entry a post-hoc method ({', '.join(FROM_RUN_SOURCES)}) "
                         f"starts from; got method {method!r}, from {source!r}")
    default = {name: None, f"{name}_mean": 0} if method == "blob" else {name: None}
    predict = item.get("predict") or default
    for k, v in predict.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise BenchError(f"{where} ({name}): predict[{k!r}] must be a number of samples >= 0 or null, got {v!r}")
    return Entry(name, method, overrides, dict(predict), source=source)


def load_grid(path, *, overrides: dict | None = None, data_dir: str | None = None, output_dir=None,
              methods: list | None = None, datasets: list | None = None, seeds: list | None = None) -> Grid:
    """Read a grid file; ``overrides`` (RunConfig settings) go into ``base``; the other arguments narrow it.

    Every cell's settings are resolved here, so a conflict is reported before anything runs.
    """
    try:
        data = read_config_file(path)
    except ConfigError as err:
        raise BenchError(str(err)) from err
    _check_keys(data, _GRID_KEYS, str(path))
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise BenchError(f"{path}: base must be a mapping of settings, got {base!r}")
    base = dict(base)
    base.update(overrides or {})
    if data_dir is not None:
        base["data_dir"] = str(data_dir)
    for key in _GRID_SET:
        if key in base:
            raise BenchError(f"{path}: base sets {key!r}; use the grid's methods / datasets / seeds")
    size = int(data.get("ensemble_size", 3))
    entries = [_entry(m, f"{path}: methods[{i}]", size) for i, m in enumerate(data.get("methods") or [])]
    entries += [_entry(v, f"{path}: variants[{i}]", size) for i, v in enumerate(data.get("variants") or [])]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise BenchError(f"{path}: entry names must be unique, got {names}")
    for i, e in enumerate(entries):
        src = next((s for s in entries[:i] if s.name == e.source), None)
        if e.source is not None and (src is None or src.is_ensemble or src.method not in FROM_RUN_SOURCES[e.method]):
            raise BenchError(f"{path}: entry {e.name} starts from {e.source!r}, which must be an earlier entry of "
                             f"method {' or '.join(FROM_RUN_SOURCES[e.method])}")
    rows = [r for e in entries for r in e.predict]
    if len(set(rows)) != len(rows):
        raise BenchError(f"{path}: result row names must be unique across entries, got {rows}")
    if methods:
        unknown = [m for m in methods if m not in names]
        if unknown:
            raise BenchError(f"--methods {unknown} not in the grid's entries {names}")
        entries = [e for e in entries if e.name in methods]
    ds = list(datasets or data.get("datasets") or [])
    sd = [int(s) for s in (seeds or data.get("seeds") or [0])]
    if not entries or not ds:
        raise BenchError(f"{path}: a grid needs at least one method and one dataset")
    name = data.get("name") or Path(path).stem
    out = Path(output_dir or data.get("output_dir") or Path("bench_out") / name)
    grid = Grid(name, out, base, entries, ds, sd, list(data.get("ood_datasets") or []), str(path))
    for cell in cells_of(grid):  # every setting checked before anything runs
        cell.member_configs(grid.base)
    return grid


def cells_of(grid: Grid) -> list[Cell]:
    """The grid's cells in the order they run: datasets, then seeds, then entries."""
    return [Cell(e, d, s, grid.output_dir / "runs" / d / e.name / f"seed{s}")
            for d in grid.datasets for s in grid.seeds for e in grid.entries]
