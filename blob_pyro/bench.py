"""Benchmark runner: methods × datasets × seeds (+ ablation variants) from one config file.

::

    python -m blob_pyro.bench run configs/bench_cpu.json --data-dir ../shared/data       # the CPU protocol
    python -m blob_pyro.bench run configs/bench_cpu.json --methods mle blob --datasets winogrande_s --seeds 1
        # runs only those cells; results.csv / .md still cover every finished cell of the grid, so
        # several such picks (e.g. one process per core) share one output folder and one table
    python -m blob_pyro.bench run configs/ood_cpu.json --data-dir ../shared/data         # train on OBQA, test OOD
    python -m blob_pyro.bench run configs/bench_cpu.json --dry-run                       # list cells: done / to do
    python -m blob_pyro.bench report configs/bench_cpu.json                              # tables + plots only
    python -m blob_pyro.bench merge configs/bench_cpu.json --from other/bench_cpu/results.csv
        # adds the rows of cells run elsewhere (another machine, another --out) to the grid's table
    python -m blob_pyro.bench pilot configs/bench_cpu.json --data-dir ../shared/data     # time it, pick the budget
    python scripts/reproduce.py configs/bench_cpu.json --data-dir ../shared/data         # = bench run

    from blob_pyro.bench import load_grid, run_grid
    grid = load_grid("configs/bench_cpu.json", overrides={"max_steps": 5}, data_dir="../shared/data")
    rows = run_grid(grid)            # list of dicts, one per results.csv row

A grid file (JSON or YAML)::

    {"name": "bench_cpu", "output_dir": "bench_out/cpu",
     "base": {"model": "minilm", "max_steps": 300, "batch_size": 8, "num_samples": 10},   # TrainConfig fields
     "methods": ["mle", "map", "mcdropout", "ensemble", "bbb", "blob"],
     "variants": [{"name": "blob_A", "method": "blob", "overrides": {"bayesian_factor": "A"}},
                  {"name": "blob_S", "method": "blob", "predict": {"blob_N1": 1, "blob_N5": 5, "blob_N20": 20}}],
     "datasets": ["winogrande_s", "arc_easy"], "seeds": [1, 2, 3], "ensemble_size": 3,
     "ood_datasets": ["arc_challenge", "mmlu_college_physics"]}     # optional: evaluate every run there too

Every entry of ``methods`` and ``variants`` is a method name or ``{"name", "method", "overrides",
"predict", "members", "member_method"}``; ``overrides`` are any :class:`~blob_pyro.config.TrainConfig`
fields (so every ablation — factor, ELBO, Flipout, KL schedule, prior, guide, std parameterisation —
is one line); ``predict`` maps result-row names to the number of prediction samples (``null``: the
run's ``num_samples``), all evaluated from one trained run.

The methods (semantics in :meth:`TrainConfig.effective`):

- ``mle``: plain LoRA (AutoDelta, no prior), posterior-mean prediction.
- ``map``: AutoDelta with the Gaussian prior on both LoRA factors at the minibatch-ELBO weight 1/N, i.e.
  L2 toward 0 of strength 1/(2·prior_scale²·N). The official code's MAP is AdamW ``weight_decay=1e-5``
  (``{"name": "map_wd", "method": "mle", "overrides": {"weight_decay": 1e-5}}``); with lr ≤ 1e-3 that
  decays each weight by ≤ 1e-8 per step, i.e. it is MLE, so the prior version is the one that tests
  whether a point estimate with BLoB's prior closes the gap.
- ``mcdropout``: LoRA dropout 0.1, kept on at prediction (``predict`` puts ``lora_dropout`` modules in
  train mode), ``num_samples`` (10) passes, probabilities averaged.
- ``ensemble``: ``ensemble_size`` (3) independent ``mle`` runs with seeds ``seed + 1000·j``; row
  ``ensemble`` averages the members' probabilities, row ``ensemble_logitavg`` averages their logits and
  then applies the softmax (what the official ``deepensemble`` wrapper does).
- ``bbb``: Bayes-by-backprop on both factors, AutoNormal with means at PEFT's init and every scale at 0.1
  (Pyro's default; not BLoB's eps²), standard ELBO; ``num_samples`` draws.
- ``blob``: BLoB; rows ``blob`` (``num_samples`` = 10 draws) and ``blob_mean`` (N = 0, posterior mean),
  both from the same trained run.

The output folder::

    runs/<dataset>/<entry>/seed<k>/          one run folder per cell: config.json, train_log.jsonl, adapter/,
                                             posterior.safetensors, predictions.safetensors, metrics.json
                                             (written last: a cell with metrics.json is finished and skipped)
    runs/<dataset>/<entry>/seed<k>/member<j>/     ensemble members (each a run folder)
    runs/.../ood/<eval dataset>.json|.safetensors  OOD evaluations of that run
    <name>/results.csv                       one row per (result row, train dataset, eval dataset, seed)
    <name>/results.md                        mean ± std over seeds: ACC and ECE ×100, NLL, Brier, times
    <name>/plots/reliability_<dataset>__<row>.png   reliability diagram, seeds pooled
    <name>/plots/metrics_<dataset>.png       ACC / ECE / NLL bar chart per dataset
    <name>/grid.json                         the resolved grid, versions, threads

Cells run in the order datasets → seeds → entries and a second invocation skips finished cells (a
finished cell whose settings differ from the grid's is refused, never silently reused); a cell
interrupted mid-way is started again from scratch. One failing cell stops the grid with its name
(``--keep-going``: run the rest, then fail naming every failed cell).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .config import METHODS, ConfigError, TrainConfig, read_config_file

__all__ = ["BenchError", "Entry", "Grid", "Cell", "load_grid", "run_grid", "report", "cells_of", "pilot",
           "ensemble_average", "main", "BENCH_METHODS"]

BENCH_METHODS = METHODS + ("ensemble",)
PREDICTIONS = "predictions.safetensors"
METRICS = "metrics.json"
ENSEMBLE_SEED_STRIDE = 1000
# settings that do not change what a cell computes (where the data/device are), ignored when resuming
RUNTIME_KEYS = ("data_dir", "device", "trust_remote_code", "checkpoint_every")
METRIC_NAMES = ("accuracy", "ece", "nll", "brier")
CSV_COLUMNS = ("method", "entry", "trained_as", "dataset", "eval_dataset", "seed", "num_samples", "accuracy", "ece",
               "nll", "brier", "confidence", "num_examples", "train_seconds", "eval_seconds", "setup_seconds", "max_steps",
               "batch_size", "run_dir")
_GRID_KEYS = ("name", "output_dir", "base", "methods", "variants", "datasets", "seeds", "ensemble_size",
              "ood_datasets", "description")
_ENTRY_KEYS = ("name", "method", "overrides", "predict", "members", "member_method")


class BenchError(RuntimeError):
    """A grid cannot run (bad grid file, a failed cell, settings that differ from a finished cell)."""


# ---- the grid ----------------------------------------------------------------------------------
@dataclass
class Entry:
    """One method or variant of the grid: a trained run (or ``members`` runs) and its result rows."""

    name: str
    method: str  # a TrainConfig method, or "ensemble"
    overrides: dict = field(default_factory=dict)
    predict: dict = field(default_factory=dict)  # row -> num_samples (None: the run's num_samples); ensemble: row -> "probs"|"logits"
    members: int = 1
    member_method: str = "mle"

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
        return [self.dir / f"member{j}" for j in range(self.entry.members)]

    def member_configs(self, base: dict) -> list[TrainConfig]:
        """The effective, validated TrainConfig of every run of this cell."""
        out = []
        for j in range(len(self.member_dirs())):
            data = {**base, **self.entry.overrides, "dataset": self.dataset}
            if self.entry.is_ensemble:
                data.update(method=self.entry.member_method, seed=self.seed + ENSEMBLE_SEED_STRIDE * j)
            else:
                data.update(method=self.entry.method, seed=self.seed)
            try:
                cfg = TrainConfig.from_dict(data, source=f"setting of {self.label}:").effective().validate()
            except (ConfigError, TypeError) as err:
                raise BenchError(f"{self.label}: {err}") from err
            out.append(cfg)
        return out

    def member_rows(self, cfg: TrainConfig) -> dict[str, int]:
        """row name -> num_samples for one member run (the run's own num_samples first)."""
        if self.entry.is_ensemble:
            return {"member": cfg.num_samples}
        rows = {k: (cfg.num_samples if v is None else int(v)) for k, v in self.entry.predict.items()}
        own = [k for k, v in rows.items() if v == cfg.num_samples]
        return {k: rows[k] for k in own[:1] + [k for k in rows if k not in own[:1]]}


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
    overrides = dict(item.get("overrides") or {})
    for key in ("method", "dataset", "seed"):
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
    default = {name: None, f"{name}_mean": 0} if method == "blob" else {name: None}
    predict = item.get("predict") or default
    for k, v in predict.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise BenchError(f"{where} ({name}): predict[{k!r}] must be a number of samples >= 0 or null, got {v!r}")
    return Entry(name, method, overrides, dict(predict))


def _check_keys(data: dict, allowed: Iterable[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            raise BenchError(f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))


def load_grid(path, *, overrides: dict | None = None, data_dir: str | None = None, output_dir=None,
              methods: list | None = None, datasets: list | None = None, seeds: list | None = None) -> Grid:
    """Read a grid file; ``overrides`` (TrainConfig fields) go into ``base``; the other arguments narrow it."""
    try:
        data = read_config_file(path)
    except ConfigError as err:
        raise BenchError(str(err)) from err
    _check_keys(data, _GRID_KEYS, str(path))
    base = dict(data.get("base") or {})
    base.update(overrides or {})
    if data_dir is not None:
        base["data_dir"] = str(data_dir)
    for key in ("method", "dataset", "seed"):
        if key in base:
            raise BenchError(f"{path}: base sets {key!r}; use the grid's methods / datasets / seeds")
    size = int(data.get("ensemble_size", 3))
    entries = [_entry(m, f"{path}: methods[{i}]", size) for i, m in enumerate(data.get("methods") or [])]
    entries += [_entry(v, f"{path}: variants[{i}]", size) for i, v in enumerate(data.get("variants") or [])]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise BenchError(f"{path}: entry names must be unique, got {names}")
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
    return [Cell(e, d, s, grid.output_dir / "runs" / d / e.name / f"seed{s}")
            for d in grid.datasets for s in grid.seeds for e in grid.entries]


# ---- one run: train, predict, save ------------------------------------------------------------
def _fit_kwargs(cfg: TrainConfig) -> dict:
    import torch

    return dict(max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr, scale_lr=cfg.scale_lr,
                warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, elbo=cfg.elbo,
                kl_schedule=cfg.kl_schedule, kl_multiplier=cfg.kl_multiplier, gamma=cfg.gamma,
                use_flipout=cfg.flipout, flipout_per=cfg.flipout_per, preset=cfg.preset, kl_lr=cfg.kl_lr,
                seed=cfg.seed, autocast_dtype=torch.bfloat16 if cfg.bf16 else None)


def _predict_rows(run, data, rows: dict[str, int], progress: bool) -> dict:
    """{row: (Prediction with draws, seconds)} for each number of samples, on one loaded run."""
    import torch

    from .predictive import predict

    cfg = run.config
    out = {}
    for row, samples in rows.items():
        t0 = time.perf_counter()
        pred = predict(run.model, run.guide, data, num_samples=samples, batch_size=cfg.eval_batch_size,
                       use_flipout=cfg.flipout, flipout_per=cfg.flipout_per, sample_batched=cfg.sample_batched,
                       keep_draws=True, progress=progress,
                       autocast_dtype=torch.bfloat16 if cfg.bf16 else None)
        out[row] = (pred, time.perf_counter() - t0)
    return out


def _save_predictions(path: Path, labels, rows: dict) -> None:
    """labels + ``<row>.probs`` (N, K) + ``<row>.logits`` (S, N, K) as safetensors (written atomically)."""
    from safetensors.torch import save_file

    tensors = {"labels": labels.contiguous()}
    for row, (probs, logits) in rows.items():
        tensors[f"{row}.probs"] = probs.float().contiguous()
        if logits is not None:
            tensors[f"{row}.logits"] = logits.float().contiguous()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _load_predictions(path: Path) -> tuple:
    from safetensors.torch import load_file

    t = load_file(str(path))
    rows = {}
    for key in t:
        if key.endswith(".probs"):
            row = key[: -len(".probs")]
            rows[row] = (t[key], t.get(f"{row}.logits"))
    return t["labels"], rows


def _row_metrics(probs, labels, samples, seconds, data) -> dict:
    from .metrics import compute_metrics

    m = compute_metrics(probs, labels)
    m.update(num_samples=samples, num_examples=int(labels.shape[0]), eval_seconds=seconds,
             dataset=getattr(data, "dataset", None), split=getattr(data, "split", None))
    return m


def _write_json(path: Path, data: dict) -> None:
    from .runs import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def train_member(cfg: TrainConfig, out, rows: dict[str, int], *, progress: bool = True) -> dict:
    """Train ``cfg`` into the run folder ``out`` and evaluate it once per entry of ``rows`` (row -> samples).

    The folder is a regular run folder (:func:`blob_pyro.runs.load_run` reads it); the first row with the
    run's own ``num_samples`` gives the same numbers :func:`blob_pyro.runs.train_run` would. Besides
    train_run's files it holds predictions.safetensors, and metrics.json gains a ``bench`` section.
    metrics.json is written last.
    """
    from .infer import fit
    from .runs import _versions, build, save_run

    out = Path(out)
    t0 = time.perf_counter()
    run = build(cfg)
    cfg = run.config
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", {"config": cfg.to_dict(), "versions": _versions()})
    setup = time.perf_counter() - t0
    with open(out / "train_log.jsonl", "w") as log:
        t1 = time.perf_counter()
        fit(run.model, run.guide, run.train, **_fit_kwargs(cfg), progress=progress,
            callback=lambda record, _state: log.write(json.dumps(record) + "\n"))
        train_seconds = time.perf_counter() - t1
    preds = _predict_rows(run, run.eval, rows, progress)
    save_run(out, run)
    labels = next(iter(preds.values()))[0].labels
    _save_predictions(out / PREDICTIONS, labels, {r: (p.probs, p.logits) for r, (p, _) in preds.items()})
    row_metrics = {r: _row_metrics(p.probs, p.labels, rows[r], s, run.eval) for r, (p, s) in preds.items()}
    first = row_metrics[next(iter(rows))]
    metrics = {k: first[k] for k in METRIC_NAMES}
    metrics.update(dataset=run.eval.dataset, split=run.eval.split, num_samples=first["num_samples"],
                   num_examples=first["num_examples"],
                   bench={"rows": row_metrics, "train_seconds": train_seconds, "setup_seconds": setup})
    _write_json(out / METRICS, metrics)
    return metrics


def _add_rows(run_dir: Path, cfg: TrainConfig, rows: dict[str, int], progress: bool) -> dict:
    """Predict the rows a finished run lacks (loading it; no training); returns its updated metrics.json."""
    from .data import load_split
    from .runs import load_run

    metrics = json.loads((run_dir / METRICS).read_text())
    have = metrics.setdefault("bench", {}).setdefault("rows", {})
    missing = {r: n for r, n in rows.items() if r not in have}
    if not missing:
        return metrics
    run = load_run(run_dir)
    split = load_split(cfg.dataset, "eval", cfg.data_dir, limit=cfg.eval_limit)
    preds = _predict_rows(run, split, missing, progress)
    labels, old = _load_predictions(run_dir / PREDICTIONS)
    old.update({r: (p.probs, p.logits) for r, (p, _) in preds.items()})
    _save_predictions(run_dir / PREDICTIONS, labels, old)
    have.update({r: _row_metrics(p.probs, p.labels, missing[r], s, split) for r, (p, s) in preds.items()})
    _write_json(run_dir / METRICS, metrics)
    return metrics


def ensemble_average(probs: list, logits: list | None = None) -> tuple:
    """(probability average, softmax of the logit average) of K members' (N, K) probs / (S, N, K) logits."""
    import torch

    p = torch.stack([x.float() for x in probs]).mean(0)
    if logits is None:
        return p, None
    mean_logits = torch.stack([x.float().mean(0) for x in logits]).mean(0)
    return p, torch.softmax(mean_logits, dim=-1)


def _combine_members(entry: Entry, member_preds: list, member_seconds: list, data_info: dict) -> tuple[dict, dict]:
    """Ensemble rows from the members' ("member") predictions: ({row: metrics}, {row: (probs, None)})."""
    import torch

    labels = member_preds[0][0]
    for lab, _ in member_preds[1:]:
        if not torch.equal(lab, labels):
            raise BenchError("ensemble members were evaluated on different examples")
    probs = [rows["member"][0] for _, rows in member_preds]
    logits = [rows["member"][1] for _, rows in member_preds]
    p_avg, p_logit = ensemble_average(probs, logits if all(x is not None for x in logits) else None)
    metrics, kept = {}, {}
    for row, rule in entry.predict.items():
        p = p_avg if rule == "probs" else p_logit
        if p is None:
            raise BenchError(f"{entry.name}: members saved no logits, cannot average them")
        kept[row] = (p, None)
        m = _row_metrics(p, labels, None, sum(member_seconds), None)
        m.update(data_info, members=len(member_preds), rule=rule)
        metrics[row] = m
    return metrics, kept


# ---- resuming -----------------------------------------------------------------------------------
def _stored_config(run_dir: Path) -> dict | None:
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data.get("config", data) if isinstance(data, dict) else None


def _differences(stored: dict, cfg: TrainConfig) -> list[str]:
    want = cfg.to_dict()
    keys = [k for k in want if k not in RUNTIME_KEYS and stored.get(k, want[k]) != want[k]]
    return [f"{k}: {stored.get(k)!r} -> {want[k]!r}" for k in keys]


def _check_finished(label: str, run_dir: Path, cfg: TrainConfig) -> None:
    stored = _stored_config(run_dir)
    if stored is None:
        raise BenchError(f"{label}: {run_dir} has {METRICS} but no readable config.json; delete the folder to rerun it")
    diff = _differences(stored, cfg)
    if diff:
        raise BenchError(f"{label}: {run_dir} finished with other settings ({'; '.join(diff[:3])}); delete it "
                         f"or use another output_dir")


def _clear_unfinished(label: str, run_dir: Path) -> None:
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


# ---- running a cell ---------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_cell(cell: Cell, grid: Grid, *, progress: bool = True) -> dict:
    """Train and evaluate one cell (skipping finished member runs); returns its metrics.json content."""
    configs = cell.member_configs(grid.base)
    if is_finished(cell):
        for cfg, d in zip(configs, cell.member_dirs()):
            _check_finished(cell.label, d, cfg)
        if not cell.entry.is_ensemble:  # another grid may ask for more prediction rows: add them, no retraining
            return _add_rows(cell.dir, configs[0], cell.member_rows(configs[0]), progress)
        metrics = json.loads((cell.dir / METRICS).read_text())
        if all(r in metrics.get("bench", {}).get("rows", {}) for r in cell.entry.predict):
            return metrics
    elif not cell.entry.is_ensemble:
        _clear_unfinished(cell.label, cell.dir)
        return train_member(configs[0], cell.dir, cell.member_rows(configs[0]), progress=progress)
    cell.dir.mkdir(parents=True, exist_ok=True)
    member_metrics, member_preds = [], []
    for j, (cfg, d) in enumerate(zip(configs, cell.member_dirs())):
        if (d / METRICS).is_file():
            _check_finished(f"{cell.label} member {j}", d, cfg)
            m = json.loads((d / METRICS).read_text())
        else:
            _clear_unfinished(f"{cell.label} member {j}", d)
            _say(f"    member {j + 1}/{len(configs)} (seed {cfg.seed})")
            m = train_member(cfg, d, cell.member_rows(cfg), progress=progress)
        member_metrics.append(m)
        member_preds.append(_load_predictions(d / PREDICTIONS))
    info = {"dataset": member_metrics[0]["dataset"], "split": member_metrics[0]["split"]}
    seconds = [m["bench"]["rows"]["member"]["eval_seconds"] for m in member_metrics]
    rows, kept = _combine_members(cell.entry, member_preds, seconds, info)
    _save_predictions(cell.dir / PREDICTIONS, member_preds[0][0], kept)
    first = rows[next(iter(rows))]
    metrics = {k: first[k] for k in METRIC_NAMES}
    metrics.update(info, num_examples=first["num_examples"], members=[d.name for d in cell.member_dirs()],
                   bench={"rows": rows, "train_seconds": sum(m["bench"]["train_seconds"] for m in member_metrics),
                          "setup_seconds": sum(m["bench"]["setup_seconds"] for m in member_metrics)})
    _write_json(cell.dir / METRICS, metrics)
    return metrics


# ---- out-of-distribution evaluation ------------------------------------------------------------
def _retarget(run, split) -> None:
    """Point the run's head at another dataset's options (same backbone, same LoRA)."""
    from .heads import CausalLMHead, MultipleChoiceHead

    head = run.model.head
    if head.kind == "causal_lm":
        run.model.head = CausalLMHead(head.tokenizer, split.option_words, head.max_length)
    elif head.kind == "multiple_choice":
        run.model.head = MultipleChoiceHead(head.tokenizer, split.num_classes, head.max_length)
    elif head.num_classes != split.num_classes:
        raise BenchError(f"a {head.num_classes}-way classifier head cannot score {split.dataset} "
                         f"({split.num_classes} options)")


def available_ood(grid: Grid) -> tuple[list[str], list[str]]:
    """(datasets to evaluate, messages for skipped ones): MMLU subjects without local data are skipped."""
    from .data import DataError, load_split, resolve_data_dir

    keep, skipped = [], []
    root = resolve_data_dir(grid.base.get("data_dir"))
    for d in grid.ood_datasets:
        if d.startswith("mmlu_") and root is not None and not (root / "mmlu").is_dir():
            skipped.append(f"skipping {d}: the data folder {root} has no mmlu/ (add cais/mmlu CSVs as "
                           f"mmlu/{d[5:]}_test.csv to evaluate it)")
            continue
        try:
            load_split(d, "eval", grid.base.get("data_dir"), limit=1)
        except DataError as err:
            if not d.startswith("mmlu_"):
                raise BenchError(f"OOD dataset {d}: {err}") from err
            skipped.append(f"skipping {d}: {err}")
            continue
        keep.append(d)
    return keep, skipped


def _ood_member(run_dir: Path, cfg: TrainConfig, datasets: list[str], rows: dict, progress: bool) -> None:
    """Evaluate one finished run on each OOD dataset (writing run_dir/ood/<dataset>.json + .safetensors)."""
    from .data import load_split
    from .runs import load_run

    run = None
    for d in datasets:
        json_path, pred_path = run_dir / "ood" / f"{d}.json", run_dir / "ood" / f"{d}.safetensors"
        have = json.loads(json_path.read_text())["rows"] if json_path.is_file() else {}
        missing = {r: n for r, n in rows.items() if r not in have}
        if not missing:
            continue
        if run is None:
            run = load_run(run_dir)
            (run_dir / "ood").mkdir(exist_ok=True)
        split = load_split(d, "eval", cfg.data_dir, limit=cfg.eval_limit)
        _retarget(run, split)
        preds = _predict_rows(run, split, missing, progress)
        labels, old = _load_predictions(pred_path) if have else (next(iter(preds.values()))[0].labels, {})
        old.update({r: (p.probs, p.logits) for r, (p, _) in preds.items()})
        _save_predictions(pred_path, labels, old)
        have.update({r: _row_metrics(p.probs, p.labels, missing[r], s, split) for r, (p, s) in preds.items()})
        _write_json(json_path, {"rows": have})


def run_ood(cell: Cell, grid: Grid, datasets: list[str], *, progress: bool = True) -> None:
    configs = cell.member_configs(grid.base)
    for cfg, d in zip(configs, cell.member_dirs()):
        _ood_member(d, cfg, datasets, cell.member_rows(cfg), progress)
    if not cell.entry.is_ensemble:
        return
    for d in datasets:
        target = cell.dir / "ood" / f"{d}.json"
        if target.is_file() and all(r in json.loads(target.read_text())["rows"] for r in cell.entry.predict):
            continue
        member_preds = [_load_predictions(m / "ood" / f"{d}.safetensors") for m in cell.member_dirs()]
        seconds = [json.loads((m / "ood" / f"{d}.json").read_text())["rows"]["member"]["eval_seconds"]
                   for m in cell.member_dirs()]
        rows, kept = _combine_members(cell.entry, member_preds, seconds, {"dataset": d})
        target.parent.mkdir(exist_ok=True)
        _save_predictions(cell.dir / "ood" / f"{d}.safetensors", member_preds[0][0], kept)
        _write_json(target, {"rows": rows})


# ---- the grid -------------------------------------------------------------------------------------
def run_grid(grid: Grid, *, progress: bool = True, keep_going: bool = False, whole: Grid | None = None) -> list[dict]:
    """Run every unfinished cell (then its OOD evaluations), write results.csv / results.md / plots.

    ``whole``: the grid ``grid`` was narrowed from (``--methods/--datasets/--seeds``); the results then cover
    every finished cell of it, so a grid run in pieces (one process per pick) keeps one complete table.
    """
    import torch

    from .runs import _versions

    whole = whole or grid
    cells = cells_of(grid)
    ood, skipped = available_ood(grid) if grid.ood_datasets else ([], [])
    for msg in skipped:
        _say(msg)
    _preflight(grid)
    grid.report_dir.mkdir(parents=True, exist_ok=True)
    _write_json(grid.report_dir / "grid.json", {
        "source": whole.source, "name": whole.name, "base": whole.base, "datasets": whole.datasets,
        "seeds": whole.seeds, "entries": [dataclasses.asdict(e) for e in whole.entries], "ood_datasets": ood,
        "skipped_ood": skipped, "last_run": {"methods": [e.name for e in grid.entries], "datasets": grid.datasets,
                                             "seeds": grid.seeds},
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "argv": sys.argv,
        "versions": _versions()})
    failures = []
    t_grid = time.perf_counter()
    for i, cell in enumerate(cells, 1):
        tag = f"[{i}/{len(cells)}] {cell.label}"
        done = is_finished(cell)
        if is_complete(cell, ood):
            _check_cell(cell, grid)
            _say(f"{tag}: finished earlier, skipped")
            continue
        _say(f"{tag}: {'OOD evaluation' if done else 'training'} -> {cell.dir}")
        t0 = time.perf_counter()
        try:
            metrics = run_cell(cell, grid, progress=progress)
            if ood:
                run_ood(cell, grid, ood, progress=progress)
        except KeyboardInterrupt:
            _say(f"{tag}: interrupted; run the same command again to continue (this cell starts afresh)")
            raise
        except Exception as err:  # noqa: BLE001 - name the cell, then stop (or go on with --keep-going)
            failures.append((cell.label, err))
            _say(f"{tag}: FAILED: {type(err).__name__}: {' '.join(str(err).split())}")
            if not keep_going:
                raise BenchError(f"cell {cell.label} failed: {type(err).__name__}: {' '.join(str(err).split())}") from err
            continue
        rows = metrics["bench"]["rows"]
        summary = ", ".join(f"{r} acc {100 * m['accuracy']:.1f} ece {100 * m['ece']:.1f} nll {m['nll']:.3f}"
                            for r, m in rows.items())
        _say(f"{tag}: done in {time.perf_counter() - t0:.0f}s ({summary})")
        write_csv(whole, collect_rows(whole, ood))
    rows = report(whole, ood=ood, skipped=skipped)
    _say(f"grid {grid.name}: {len(cells)} cells, {time.perf_counter() - t_grid:.0f}s this invocation; "
         f"results in {grid.report_dir}")
    if failures:
        names = "; ".join(f"{label} ({type(err).__name__}: {' '.join(str(err).split())[:200]})" for label, err in failures)
        raise BenchError(f"{len(failures)} cell(s) failed: {names}")
    return rows


def _check_cell(cell: Cell, grid: Grid) -> None:
    for cfg, d in zip(cell.member_configs(grid.base), cell.member_dirs()):
        _check_finished(cell.label, d, cfg)


def _preflight(grid: Grid) -> None:
    """Fail before training anything when a dataset cannot be read."""
    from .data import DataError, load_split

    for d in grid.datasets:
        for split in ("train", "eval"):
            try:
                load_split(d, split, grid.base.get("data_dir"), limit=1)
            except DataError as err:
                raise BenchError(f"dataset {d}: {err}") from err


# ---- results ----------------------------------------------------------------------------------------
def collect_rows(grid: Grid, ood: list[str] | None = None) -> list[dict]:
    """One dict per result row of every finished cell (in-distribution and OOD), in grid order."""
    ood = list(ood or [])
    out = []
    cache: dict = {}
    for cell in cells_of(grid):
        if not is_finished(cell):
            continue
        metrics = json.loads((cell.dir / METRICS).read_text())
        bench = metrics.get("bench", {})
        cfg = cell.member_configs(grid.base)[0]
        common = {"entry": cell.entry.name, "trained_as": cell.entry.method, "dataset": cell.dataset,
                  "seed": cell.seed, "train_seconds": bench.get("train_seconds"),
                  "setup_seconds": bench.get("setup_seconds"), "max_steps": cfg.max_steps,
                  "batch_size": cfg.batch_size, "run_dir": str(cell.dir)}
        sources = [(cell.dataset, bench.get("rows", {}))]
        for d in ood:
            path = cell.dir / "ood" / f"{d}.json"
            if path.is_file():
                sources.append((d, json.loads(path.read_text())["rows"]))
        for eval_dataset, rows in sources:
            for row in cell.entry.predict:  # only the rows this grid asks for, in its order
                if row not in rows:
                    continue
                m = rows[row]
                out.append({**common, "method": row, "eval_dataset": eval_dataset,
                            "num_samples": m.get("num_samples"), "num_examples": m.get("num_examples"),
                            "eval_seconds": m.get("eval_seconds"), **{k: m[k] for k in METRIC_NAMES},
                            "confidence": _mean_confidence(cell.dir, eval_dataset, cell.dataset, row, cache)})
    return out


def predictions_path(run_dir: Path, dataset: str, eval_dataset: str) -> Path:
    """Where a cell's saved predictions on ``eval_dataset`` live (its own dev split, or an OOD one)."""
    return run_dir / PREDICTIONS if eval_dataset == dataset else run_dir / "ood" / f"{eval_dataset}.safetensors"


def _mean_confidence(run_dir: Path, eval_dataset: str, dataset: str, row: str, cache: dict) -> float | None:
    """Mean top-label probability of a result row, from its saved predictions (None if they are gone).

    Read next to ACC it says which way a miscalibration goes: above ACC over-confident, below under-confident.
    """
    path = predictions_path(run_dir, dataset, eval_dataset)
    if path not in cache:
        cache[path] = _load_predictions(path)[1] if path.is_file() else {}
    if row not in cache[path]:
        return None
    return float(cache[path][row][0].float().max(-1).values.mean())


def write_csv(grid: Grid, rows: list[dict]) -> Path:
    """results.csv, replaced atomically through a private temporary file: runner processes that share an output
    folder (one per --methods pick) may rewrite it at the same moment."""
    import io

    from .runs import atomic_write_text

    grid.report_dir.mkdir(parents=True, exist_ok=True)
    path = grid.report_dir / "results.csv"
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    atomic_write_text(path, buf.getvalue())
    return path


def _column(row: dict, multi_train: bool) -> str:
    if row["eval_dataset"] == row["dataset"] or not multi_train:
        return row["eval_dataset"]
    return f"{row['dataset']}->{row['eval_dataset']}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict]) -> tuple[list[str], list[str], dict]:
    """(row names, columns, {(row, column): {metric: [values over seeds]}})."""
    multi = len({r["dataset"] for r in rows}) > 1
    names, cols, cells = [], [], {}
    for r in rows:
        col = _column(r, multi)
        if r["method"] not in names:
            names.append(r["method"])
        if col not in cols:
            cols.append(col)
        slot = cells.setdefault((r["method"], col),
                                {k: [] for k in METRIC_NAMES + ("confidence", "train_seconds", "eval_seconds")})
        for k in slot:
            if r.get(k) is not None:
                slot[k].append(float(r[k]))
    return names, cols, cells


def markdown_table(rows: list[dict], metric: str, *, scale: float = 1.0, digits: int = 2) -> str:
    """Mean ± sample std over seeds per (row, column).

    A cell with fewer seeds than the table's fullest cell says how many it has, so that a half-done grid's
    2-seed mean is not read as a 3-seed one; a single seed has no std and shows none.
    """
    names, cols, cells = summarize(rows)
    full = max((len(c.get(metric) or []) for c in cells.values()), default=0)
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name in names:
        out = []
        for col in cols:
            values = cells.get((name, col), {}).get(metric) or []
            if not values:
                out.append("–")
                continue
            mean, std = _mean_std([v * scale for v in values])
            if len(values) == 1:
                out.append(f"{mean:.{digits}f} (1 seed)")
            else:
                out.append(f"{mean:.{digits}f} ± {std:.{digits}f}"
                           + (f" ({len(values)} seeds)" if len(values) < full else ""))
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def results_markdown(grid: Grid, rows: list[dict], skipped_ood: list[str] = ()) -> str:
    seeds = sorted({r["seed"] for r in rows})
    cfg0 = TrainConfig.from_dict(dict(grid.base))
    lines = [f"# {grid.name}", "",
             f"Grid `{grid.source}`: backbone `{cfg0.model}`, {cfg0.max_steps} steps × batch {cfg0.batch_size}, "
             f"seeds {seeds}, {cfg0.num_samples} samples for the stochastic methods; mean ± sample std "
             f"over seeds (a cell with fewer seeds than the others says how many). ACC and ECE in % (×100, as "
             f"the paper), NLL and Brier as is.", ""]
    for title, metric, scale, digits in (("ACC (%) ↑", "accuracy", 100, 2), ("ECE (%) ↓", "ece", 100, 2),
                                         ("NLL ↓", "nll", 1, 3), ("Brier ↓", "brier", 1, 3)):
        lines += [f"## {title}", "", markdown_table(rows, metric, scale=scale, digits=digits), ""]
    lines += ["## Mean confidence (%)", "", "Mean top-label probability: above ACC means over-confident, below "
              "under-confident.", "", markdown_table(rows, "confidence", scale=100, digits=2), ""]
    first_rows = {e.name: next(iter(e.predict)) for e in grid.entries}
    trained = [r for r in rows if r["method"] == first_rows.get(r["entry"]) and r["eval_dataset"] == r["dataset"]]
    lines += ["## Time (seconds per cell, mean ± std over seeds)", "",
              "Train: the fit loop of the run (ensembles: all members; one row per trained entry); eval: that "
              "row's predictions on the evaluated split.", "", "### train", "",
              markdown_table(trained, "train_seconds", digits=0), "",
              "### eval", "", markdown_table(rows, "eval_seconds", digits=0), ""]
    lines += targets_markdown(rows)
    total = _total_seconds(rows)
    lines += [f"Total compute of the finished cells (setup + train + eval, summed): {total:.0f} s "
              f"({total / 3600:.2f} h).", ""]
    for msg in skipped_ood:
        lines.append(f"- {msg}")
    return "\n".join(lines).rstrip() + "\n"


def targets_markdown(rows: list[dict]) -> list[str]:
    """The issue's targets per in-distribution dataset, from the seed means of ``mle``, ``blob``, ``blob_mean``.

    BLoB (N=10) ECE at most half of MLE's; BLoB accuracy at most 1 point below MLE's; BLoB NLL below MLE's;
    ECE ordering MLE > BLoB N=0 > BLoB N=10. The means are over the seeds that all three rows have (a paired
    comparison), and a note names the seeds left out when a half-done grid has more for some row. Empty when
    the three rows share no seed.
    """
    need = ("mle", "blob", "blob_mean")
    multi = len({r["dataset"] for r in rows}) > 1
    by: dict = {}  # column -> method -> seed -> row
    for r in rows:
        if r["eval_dataset"] == r["dataset"] and r["method"] in need:
            by.setdefault(_column(r, multi), {}).setdefault(r["method"], {})[str(r["seed"])] = r
    table, notes = [], []
    for col, methods in by.items():
        seeds = set.intersection(*(set(methods.get(m, {})) for m in need))
        if not seeds:
            continue
        table.append((col, methods, sorted(seeds, key=_seed_key)))
        extra = set().union(*(set(methods.get(m, {})) for m in need)) - seeds
        if extra:
            notes.append(f"- {col}: seeds {', '.join(sorted(seeds, key=_seed_key))} (those all three rows have); "
                         f"left out: {', '.join(sorted(extra, key=_seed_key))}.")
    if not table:
        return []

    def mark(ok):
        return "yes" if ok else "**no**"

    lines = ["## Targets (seed means)", "",
             "| dataset | ECE blob / mle | ≤ ½? | ACC blob − mle (pt) | ≥ −1? | NLL blob − mle | < 0? | "
             "ECE mle > blob_mean > blob? |", "|---|---|---|---|---|---|---|---|"]
    for col, methods, seeds in table:
        def mean(method, metric):
            return statistics.fmean(float(methods[method][s][metric]) for s in seeds)

        e_mle, e_n0, e_b = (mean(m, "ece") for m in ("mle", "blob_mean", "blob"))
        ratio = e_b / e_mle if e_mle > 0 else float("inf")
        dacc = 100 * (mean("blob", "accuracy") - mean("mle", "accuracy"))
        dnll = mean("blob", "nll") - mean("mle", "nll")
        lines.append(f"| {col} | {100 * e_b:.2f} / {100 * e_mle:.2f} = {ratio:.2f} | {mark(ratio <= 0.5)} | "
                     f"{dacc:+.2f} | {mark(dacc >= -1 - 1e-9)} | {dnll:+.4f} | {mark(dnll < 0)} | "
                     f"{100 * e_mle:.2f} > {100 * e_n0:.2f} > {100 * e_b:.2f}: {mark(e_mle > e_n0 > e_b)} |")
    return lines + ([""] + notes if notes else []) + [""]


def _seed_key(seed: str):
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def _total_seconds(rows: list[dict]) -> float:
    seen, total = set(), 0.0
    for r in rows:
        key = r["run_dir"]
        if key not in seen:
            seen.add(key)
            total += float(r.get("train_seconds") or 0) + float(r.get("setup_seconds") or 0)
        if r["entry"] == r["method"] or r["trained_as"] != "ensemble":
            total += float(r.get("eval_seconds") or 0)
    return total


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace("->", "_to_"))


def write_plots(grid: Grid, rows: list[dict]) -> list[Path]:
    """A reliability diagram per (dataset, result row), seeds pooled, and a metric bar chart per dataset."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import torch

    from .plots import reliability_diagram, save_figure

    multi = len({r["dataset"] for r in rows}) > 1
    pooled: dict = {}
    cache: dict = {}
    for r in rows:
        run_dir = Path(r["run_dir"])
        path = predictions_path(run_dir, r["dataset"], r["eval_dataset"])
        if path not in cache:
            cache[path] = _load_predictions(path) if path.is_file() else None
        if cache[path] is None or r["method"] not in cache[path][1]:
            continue
        labels, preds = cache[path]
        col = _column(r, multi)
        where = col if r["eval_dataset"] == r["dataset"] else f"{r['eval_dataset']}, trained on {r['dataset']}"
        slot = pooled.setdefault((col, r["method"]), ([], [], where))
        slot[0].append(preds[r["method"]][0])
        slot[1].append(labels)
    out = []
    plots = grid.report_dir / "plots"
    for (col, method), (probs, labels, where) in pooled.items():
        seeds = len(probs)
        ax = reliability_diagram(torch.cat(probs), torch.cat(labels), label=method)
        ax.set_title(f"{method} on {where} ({seeds} seed{'s' if seeds > 1 else ''} pooled)", fontsize="medium")
        out.append(save_figure(ax, plots / f"reliability_{_safe(col)}__{_safe(method)}.png"))
    return out + _write_metric_charts(grid, rows)


def _write_metric_charts(grid: Grid, rows: list[dict]) -> list[Path]:
    """An ACC / ECE / NLL bar chart per dataset column, from the rows' values (no predictions needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from .plots import plot_metric_comparison, save_figure

    names, cols, cells = summarize(rows)
    out = []
    for col in cols:
        results = {n: {k: cells[(n, col)][k] for k in ("accuracy", "ece", "nll")} for n in names if (n, col) in cells}
        fig = plot_metric_comparison(results, percent=True)
        fig.suptitle(col)
        out.append(save_figure(fig, grid.report_dir / "plots" / f"metrics_{_safe(col)}.png"))
    return out


def report(grid: Grid, *, ood: list[str] | None = None, skipped: list[str] = (), plots: bool = True) -> list[dict]:
    """Write results.csv, results.md and the plots from the finished cells; returns the rows."""
    if ood is None:
        ood, skipped = available_ood(grid) if grid.ood_datasets else ([], [])
    rows = collect_rows(grid, ood)
    write_csv(grid, rows)
    if not rows:
        return rows
    from .runs import atomic_write_text

    atomic_write_text(grid.report_dir / "results.md", results_markdown(grid, rows, skipped))
    if plots:
        write_plots(grid, rows)
    return rows


# ---- merge: one table from cells run in several output folders (e.g. on several machines) ----------
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
    eval dataset, seed) found in several files must have the same metrics in all of them, and a row's step budget and
    batch size must be the grid's, else nothing is written.
    Rows are kept in grid order (datasets as given, seeds, entries, rows). Reliability diagrams pool the saved
    predictions of every seed, which a results.csv does not hold, so they are left as they are.
    """
    from .runs import atomic_write_text

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
            other = [f"{k} {r[k]} (grid: {getattr(cfg, k)})" for k in ("max_steps", "batch_size")
                     if r.get(k) not in (None, "") and int(float(r[k])) != getattr(cfg, k)]
            if other:  # a cell trained with other settings must not join this grid's seed means
                raise BenchError(f"{path}: row {r['method']!r} of {r['dataset']!r} seed {r['seed']} was trained with "
                                 f"{', '.join(other)}; merge results of the same grid settings only")
            key = tuple(r[k] for k in _ROW_KEY)
            old = merged.get(key)
            if old is not None and any(old[k] != r[k] for k in METRIC_NAMES):
                raise BenchError(f"{path}: row {'/'.join(key)} differs from the one already merged "
                                 f"({', '.join(f'{k} {old[k]} vs {r[k]}' for k in METRIC_NAMES if old[k] != r[k])})")
            merged.setdefault(key, r)
    ood = {d: i for i, d in enumerate(grid.ood_datasets)}

    def order(r):
        own_split = r["eval_dataset"] == r["dataset"]
        return (datasets[r["dataset"]], _seed_key(str(r["seed"])), entries[r["entry"]], not own_split,
                ood.get(r["eval_dataset"], len(ood)), r["eval_dataset"], row_pos[r["method"]])

    rows = []
    for r in sorted(merged.values(), key=order):
        t = {k: (None if v == "" else v) for k, v in r.items()}
        t["seed"] = int(t["seed"]) if str(t["seed"]).lstrip("-").isdigit() else t["seed"]
        rows.append(t)
    write_csv(grid, rows)
    if rows:
        atomic_write_text(grid.report_dir / "results.md", results_markdown(grid, rows))
        _write_metric_charts(grid, rows)
    return rows


# ---- pilot: time a few steps and one pass over each dev split, derive the step budget --------------
def _stochastic_pass(cfg: TrainConfig, samples: int) -> bool:
    """Does a prediction pass run Flipout draws (costlier than a plain forward)?"""
    return samples > 0 and cfg.guide != "auto_delta" and cfg.flipout


def pilot(grid: Grid, *, steps: int = 4, examples: int | None = None, budget_hours: float = 3.0,
          efficiency: float | None = None, progress: bool = False) -> str:
    """Measure what the grid costs and the largest step budget S that fits ``budget_hours``.

    Per dataset, with the grid's base settings: ``steps`` training steps (after one warm-up step) of a
    deterministic (mle) and a stochastic (blob) run, and one prediction pass over the dev split (all of it,
    or ``examples`` evenly spaced examples scaled up) at N=0 (mle) and N=1 (blob, Flipout). Both wall and
    process CPU seconds are measured; the budget uses CPU seconds divided by (threads × efficiency), which
    does not depend on what else runs on a shared machine. ``efficiency`` (parallel efficiency of the torch
    threads) defaults to the highest CPU/wall ratio seen in the pilot divided by the thread count, i.e. it
    is only as optimistic as the pilot observed. Returns the tables and the arithmetic as markdown.
    """
    import torch

    from .data import load_split
    from .infer import fit
    from .predictive import predict
    from .runs import build

    threads = torch.get_num_threads()
    seeds = len(grid.seeds)
    meas, ratios = {}, []

    def timed(fn):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        ratios.append(cpu / wall if wall > 0 else 0.0)
        return cpu, wall

    for d in grid.datasets:
        t = meas[d] = {}
        for kind, method, samples in (("det", "mle", 0), ("sto", "blob", 1)):
            cfg = TrainConfig.from_dict({**grid.base, "dataset": d, "method": method, "seed": grid.seeds[0]})
            built = []
            cpu_build, _ = timed(lambda: built.append(build(cfg)))
            run = built[0]
            stamps = []  # (cpu, wall) after every step: differences include collating the batch

            def train():
                fit(run.model, run.guide, run.train, **{**_fit_kwargs(run.config), "max_steps": steps + 1},
                    progress=progress, callback=lambda _r, _s: stamps.append((time.process_time(), time.perf_counter())))

            timed(train)
            t[f"step_cpu_{kind}"] = statistics.median(b[0] - a[0] for a, b in zip(stamps, stamps[1:]))
            t[f"step_wall_{kind}"] = statistics.median(b[1] - a[1] for a, b in zip(stamps, stamps[1:]))
            full = load_split(d, "eval", run.config.data_dir, limit=run.config.eval_limit)
            subset = list(full.examples)
            if examples and examples < len(subset):
                subset = subset[:: len(subset) // examples][:examples]
            cpu, wall = timed(lambda: predict(run.model, run.guide, subset, num_samples=samples,
                                              batch_size=run.config.eval_batch_size, use_flipout=run.config.flipout,
                                              flipout_per=run.config.flipout_per, progress=progress,
                                              autocast_dtype=torch.bfloat16 if run.config.bf16 else None))
            scale = len(full) / len(subset)
            t[f"pass_cpu_{kind}"], t[f"pass_wall_{kind}"] = cpu * scale, wall * scale
            t["build_cpu"], t["n"] = cpu_build, len(full)
    eff = efficiency if efficiency is not None else min(1.0, max(ratios) / threads)
    speed = threads * eff  # CPU seconds per wall second on dedicated cores

    # what one seed of the grid runs, per dataset: trainings and prediction passes of each kind
    counts = {"train_det": 0, "train_sto": 0, "pass_det": 0, "pass_sto": 0}
    for e in grid.entries:
        cell = Cell(e, grid.datasets[0], grid.seeds[0], Path("."))
        for cfg in cell.member_configs(grid.base):
            counts["train_sto" if cfg.guide != "auto_delta" else "train_det"] += 1
            for samples in cell.member_rows(cfg).values():
                counts["pass_sto" if _stochastic_pass(cfg, samples) else "pass_det"] += max(1, samples)
    trainings = counts["train_det"] + counts["train_sto"]
    eval_cpu = seeds * sum(counts["pass_det"] * t["pass_cpu_det"] + counts["pass_sto"] * t["pass_cpu_sto"]
                           for t in meas.values())
    build_cpu = seeds * trainings * sum(t["build_cpu"] for t in meas.values())
    step_cpu = seeds * sum(counts["train_det"] * t["step_cpu_det"] + counts["train_sto"] * t["step_cpu_sto"]
                           for t in meas.values())
    budget = budget_hours * 3600
    fixed = (eval_cpu + build_cpu) / speed
    s_max = int((budget - fixed) / (step_cpu / speed)) if budget > fixed else 0
    lines = [f"Pilot of `{grid.source}`: torch threads {threads}, cpu_count {os.cpu_count()}, "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; {steps} timed steps after 1 warm-up; "
             f"one pass over {'the full dev split' if not examples else f'{examples} evenly spaced dev examples (scaled to the split)'}.",
             "", "CPU seconds (wall seconds on this machine in brackets):", "",
             "| dataset | dev N | step det. | step stoch. | dev pass N=0 | dev pass Flipout N=1 | model load |",
             "|---|---|---|---|---|---|---|"]
    for d, t in meas.items():
        lines.append(f"| {d} | {t['n']} | {t['step_cpu_det']:.3f} ({t['step_wall_det']:.3f}) | "
                     f"{t['step_cpu_sto']:.3f} ({t['step_wall_sto']:.3f}) | {t['pass_cpu_det']:.1f} ({t['pass_wall_det']:.1f}) | "
                     f"{t['pass_cpu_sto']:.1f} ({t['pass_wall_sto']:.1f}) | {t['build_cpu']:.1f} |")
    lines += ["", f"One seed of the grid trains {counts['train_det']} deterministic and {counts['train_sto']} stochastic "
              f"runs and makes {counts['pass_det']} plain and {counts['pass_sto']} Flipout passes over each dev split "
              f"(N=0 counts as one pass).", "",
              f"- highest CPU/wall ratio seen: {max(ratios):.2f} ⇒ parallel efficiency {eff:.2f}, "
              f"{speed:.2f} CPU s per wall s on {threads} dedicated cores",
              f"- evaluation: {seeds} seeds × Σ_d ({counts['pass_det']}·pass_det + {counts['pass_sto']}·pass_sto) "
              f"= {eval_cpu:.0f} CPU s = {eval_cpu / speed:.0f} s wall",
              f"- model loads: {seeds} × {trainings} × Σ_d load = {build_cpu:.0f} CPU s = {build_cpu / speed:.0f} s wall",
              f"- training: S × {seeds} × Σ_d ({counts['train_det']}·step_det + {counts['train_sto']}·step_stoch) = "
              f"S × {step_cpu:.2f} CPU s = S × {step_cpu / speed:.2f} s wall",
              f"- budget {budget:.0f} s ⇒ S ≤ ({budget:.0f} − {fixed:.0f}) / {step_cpu / speed:.2f} = **{s_max}**"]
    return "\n".join(lines) + "\n"


# ---- command line ----------------------------------------------------------------------------------
def _parse_set(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BenchError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blob_pyro.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("run", "run (or resume) a grid, then write results"),
                           ("report", "write results.csv / results.md / plots from the finished cells"),
                           ("pilot", "time a few steps and examples per dataset; print the step budget"),
                           ("merge", "add the rows of other results.csv files to the grid's results and re-render")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("config", help="grid file (JSON or YAML)")
        q.add_argument("--out", help="output folder (default: the grid's output_dir)")
        q.add_argument("--data-dir", help="benchmark data folder (default: base.data_dir, else $BLOB_DATA_DIR)")
        q.add_argument("--methods", nargs="+", help="only these entries (method or variant names)")
        q.add_argument("--datasets", nargs="+", help="only these datasets")
        q.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
        q.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override TrainConfig fields of every cell")
        q.add_argument("--quiet", action="store_true", help="no progress bars (one line per cell remains)")
        if name == "run":
            q.add_argument("--keep-going", action="store_true", help="run the other cells when one fails")
            q.add_argument("--dry-run", action="store_true", help="list the cells and whether they are done")
        if name == "merge":
            q.add_argument("--from", dest="sources", nargs="+", required=True, metavar="RESULTS_CSV",
                           help="results.csv files of other output folders (or machines) to add")
        if name == "pilot":
            q.add_argument("--steps", type=int, default=4, help="timed training steps per run (after 1 warm-up)")
            q.add_argument("--examples", type=int, default=None, help="time this many dev examples (default: all)")
            q.add_argument("--budget-hours", type=float, default=3.0)
            q.add_argument("--efficiency", type=float, default=None,
                           help="parallel efficiency of the threads (default: the best CPU/wall ratio seen / threads)")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    from .cli import _user_errors

    try:
        grid = load_grid(args.config, overrides=_parse_set(args.set), data_dir=args.data_dir, output_dir=args.out,
                         methods=args.methods, datasets=args.datasets, seeds=args.seeds)
        if args.command == "pilot":
            print(pilot(grid, steps=args.steps, examples=args.examples, budget_hours=args.budget_hours,
                        efficiency=args.efficiency, progress=not args.quiet))
        elif args.command == "report":
            rows = report(grid)
            print(f"{len(rows)} rows -> {grid.report_dir}")
        elif args.command == "merge":
            rows = merge_results(grid, args.sources)
            print(f"{len(rows)} rows -> {grid.report_dir}")
        elif args.dry_run:
            ood, _ = available_ood(grid) if grid.ood_datasets else ([], [])
            for i, cell in enumerate(cells_of(grid), 1):
                status = "done" if is_complete(cell, ood) else "trained, predictions to add" if is_finished(cell) else "to do"
                print(f"[{i}] {cell.label}: {status}  {cell.dir}")
        else:
            narrowed = args.methods or args.datasets or args.seeds
            whole = load_grid(args.config, overrides=_parse_set(args.set), data_dir=args.data_dir,
                              output_dir=args.out) if narrowed else grid
            run_grid(grid, progress=not args.quiet, keep_going=args.keep_going, whole=whole)
            print((grid.report_dir / "results.md").read_text() if (grid.report_dir / "results.md").is_file() else "")
    except BenchError as err:
        cause = err.__cause__
        if cause is not None and not isinstance(cause, _user_errors() + (BenchError,)):
            traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
        print(f"bench: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except _user_errors() as err:
        print(f"bench: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
