"""Running one cell: train a run (or an ensemble's members), predict its result rows, evaluate it out of distribution.

A cell's run is a regular run folder (:func:`blob_pyro.training.load_run` reads it). It trains through
:func:`blob_pyro.infer.fit` with the run's ``cfg.fit``, the training log written by fit's ``callback``, and
predicts each result row with :func:`blob_pyro.predict` (``cfg.predict`` with that row's number of samples),
keeping the per-draw logits for the ensemble's logit average, the uncertainty metrics (entropy, mutual
information, AURC; :mod:`blob_pyro.uncertainty`), the OOD AUROCs of the report and the reliability diagrams. Besides the
files :func:`~blob_pyro.training.train_run` writes it holds predictions.safetensors, and metrics.json
gains a ``bench`` section; metrics.json is written last.

The entries (the methods' semantics are :data:`blob_pyro.methods.METHODS`, docs/methods.md):

- ``mle``, ``map``, ``mcdropout``, ``bbb``, ``temperature``, ``laplace``, ``blob``: one run (``temperature`` fits
  T after training, ``laplace`` its posterior around the MAP, :func:`blob_pyro.training.post_fit`, counted in the
  training time); ``blob`` by default predicts two rows from the same trained
  run, ``blob`` (``num_samples`` draws) and ``blob_mean`` (N = 0, the posterior mean).
- ``ensemble``: ``members`` (the grid's ``ensemble_size``, 3) independent ``member_method`` (``mle``) runs with
  seeds ``seed + 1000·j`` (:func:`blob_pyro.ensemble.member_seed`); row ``ensemble`` averages the members'
  probabilities, row ``ensemble_logitavg`` averages their logits and then applies the softmax (what the official
  ``deepensemble`` wrapper does); both rules are :func:`blob_pyro.ensemble.ensemble_average`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from blob_pyro.config import RunConfig
from blob_pyro.ensemble import ensemble_average

from .files import (
    METRICS,
    PREDICTIONS,
    check_finished,
    clear_unfinished,
    is_finished,
    load_predictions,
    save_predictions,
    write_json,
)
from .grid import BenchError, Cell, Entry, Grid

__all__ = ["train_member", "run_cell", "run_ood", "available_ood", "ensemble_average", "predict_rows",
           "METRIC_NAMES", "UNCERTAINTY_NAMES"]

METRIC_NAMES = ("accuracy", "ece", "nll", "brier")
# blob_pyro.uncertainty.UNCERTAINTY_METRICS but "confidence", which the report reads from the saved predictions
# (report._mean_confidence) for old and new rows alike; these are absent from rows predicted before they were reported
UNCERTAINTY_NAMES = ("entropy", "expected_entropy", "mutual_information", "aurc", "accuracy_at_80")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def predict_rows(run, data, rows: dict[str, int], progress: bool) -> dict:
    """{row: (Prediction with draws, seconds)} for each number of samples, on one built or loaded run."""
    from blob_pyro.predictive import predict

    cfg = run.config
    out = {}
    for row, samples in rows.items():
        t0, c0 = time.perf_counter(), time.process_time()
        pred = predict(run.model, run.guide, data, **{**cfg.predict.kwargs(), "num_samples": samples},
                       keep_draws=True, progress=progress, autocast_dtype=cfg.runtime.autocast_dtype())
        out[row] = (pred, (time.perf_counter() - t0, time.process_time() - c0))
    return out


def _row_metrics(probs, labels, samples, seconds, data, logits=None, bins: int = 15) -> dict:
    """A result row's metrics: :func:`~blob_pyro.metrics.compute_metrics` of ``probs`` (N, K) with ``bins`` ECE bins
    and :func:`~blob_pyro.uncertainty.uncertainty_metrics` of the draws ``softmax(logits)`` (S, N, K).

    ``seconds``: (wall, CPU) seconds of the row's predictions; CPU time is the process's over all its threads,
    the cost figure that a shared machine's load changes least."""
    import torch

    from blob_pyro.metrics import compute_metrics
    from blob_pyro.uncertainty import uncertainty_metrics

    m = compute_metrics(probs, labels, n_bins=bins)
    m.update(uncertainty_metrics(torch.softmax(logits.float(), -1) if logits is not None else probs, labels))
    m.update(num_samples=samples, num_examples=int(labels.shape[0]), eval_seconds=seconds[0], eval_cpu_seconds=seconds[1],
             dataset=getattr(data, "dataset", None), split=getattr(data, "split", None), ece_bins=bins)
    return m


def train_member(cfg: RunConfig, out, rows: dict[str, int], *, progress: bool = True) -> dict:
    """Train ``cfg`` into the run folder ``out`` and evaluate it once per entry of ``rows`` (row -> samples).

    The first row with the run's own ``num_samples`` gives the numbers :func:`blob_pyro.training.train_run`
    would. Returns the metrics.json it wrote (last).
    """
    from blob_pyro.infer import fit
    from blob_pyro.training import build, post_fit, run_versions, save_run

    out = Path(out)
    t0 = time.perf_counter()
    run = build(cfg)
    cfg = run.config
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"config": cfg.to_dict(), "versions": run_versions()})
    setup = time.perf_counter() - t0
    with open(out / "train_log.jsonl", "w") as log:
        t1, c1 = time.perf_counter(), time.process_time()
        if cfg.from_run is None:  # a post-hoc entry starts from its source entry's finished run
            fit(run.model, run.guide, run.train, cfg.fit, autocast_dtype=cfg.runtime.autocast_dtype(),
                progress=progress, callback=lambda record, _state: log.write(json.dumps(record) + "\n"))
        post_fit(run)  # a method's post-hoc step (temperature: T on the held-out training slice)
        train_seconds, train_cpu = time.perf_counter() - t1, time.process_time() - c1
    preds = predict_rows(run, run.eval, rows, progress)
    save_run(out, run)
    labels = next(iter(preds.values()))[0].labels
    save_predictions(out / PREDICTIONS, labels, {r: (p.probs, p.logits) for r, (p, _) in preds.items()})
    row_metrics = {r: _row_metrics(p.probs, p.labels, rows[r], s, run.eval, p.logits, cfg.predict.ece_bins)
                   for r, (p, s) in preds.items()}
    first = row_metrics[next(iter(rows))]
    metrics = {k: first[k] for k in METRIC_NAMES + UNCERTAINTY_NAMES}
    metrics.update(dataset=run.eval.dataset, split=run.eval.split, num_samples=first["num_samples"],
                   num_examples=first["num_examples"], ece_bins=first["ece_bins"],
                   bench={"rows": row_metrics, "train_seconds": train_seconds, "train_cpu_seconds": train_cpu,
                          "setup_seconds": setup})
    write_json(out / METRICS, metrics)
    return metrics


def _add_rows(run_dir: Path, cfg: RunConfig, rows: dict[str, int], progress: bool) -> dict:
    """Predict the rows a finished run lacks (loading it; no training); returns its updated metrics.json."""
    from blob_pyro.training import eval_split_of, load_run

    metrics = json.loads((run_dir / METRICS).read_text())
    have = metrics.setdefault("bench", {}).setdefault("rows", {})
    missing = {r: n for r, n in rows.items() if r not in have}
    if not missing:
        return metrics
    run = load_run(run_dir)
    split = eval_split_of(cfg)
    preds = predict_rows(run, split, missing, progress)
    labels, old = load_predictions(run_dir / PREDICTIONS)
    old.update({r: (p.probs, p.logits) for r, (p, _) in preds.items()})
    save_predictions(run_dir / PREDICTIONS, labels, old)
    have.update({r: _row_metrics(p.probs, p.labels, missing[r], s, split, p.logits, cfg.predict.ece_bins)
                 for r, (p, s) in preds.items()})
    write_json(run_dir / METRICS, metrics)
    return metrics


# ---- ensembles (the seeds and the averages are blob_pyro.ensemble's) ---------------------------------
def _sum_or_none(values) -> float | None:
    """The sum, or None when any member lacks the figure (a member finished before CPU time was recorded)."""
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _combine_members(entry: Entry, member_preds: list, member_seconds: list, data_info: dict,
                     bins: int = 15) -> tuple[dict, dict]:
    """Ensemble rows from the members' ("member") predictions: ({row: metrics}, {row: (probs, draws' logits)}).

    Row ``probs``: the members are the draws, kept as their log-probabilities (M, N, K); row ``logits``: one
    draw, the log of its probabilities (1, N, K)."""
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
        draws = torch.stack([x.float() for x in probs]) if rule == "probs" else p.unsqueeze(0)
        kept[row] = (p, draws.log())  # softmax(log p) = p: each draw's probabilities
        m = _row_metrics(p, labels, None, tuple(map(_sum_or_none, zip(*member_seconds))), None, kept[row][1], bins)
        m.update(data_info, members=len(member_preds), rule=rule)
        metrics[row] = m
    return metrics, kept


# ---- one cell -----------------------------------------------------------------------------------
def run_cell(cell: Cell, grid: Grid, *, progress: bool = True) -> dict:
    """Train and evaluate one cell (skipping finished member runs); returns its metrics.json content."""
    configs = cell.member_configs(grid.base)
    if is_finished(cell):
        for cfg, d in zip(configs, cell.member_dirs()):
            check_finished(cell.label, d, cfg)
        if not cell.entry.is_ensemble:  # another grid may ask for more prediction rows: add them, no retraining
            return _add_rows(cell.dir, configs[0], cell.member_rows(configs[0]), progress)
        metrics = json.loads((cell.dir / METRICS).read_text())
        if all(r in metrics.get("bench", {}).get("rows", {}) for r in cell.entry.predict):
            return metrics
    elif not cell.entry.is_ensemble:
        clear_unfinished(cell.label, cell.dir)
        return train_member(configs[0], cell.dir, cell.member_rows(configs[0]), progress=progress)
    cell.dir.mkdir(parents=True, exist_ok=True)
    member_metrics, member_preds = [], []
    for j, (cfg, d) in enumerate(zip(configs, cell.member_dirs())):
        if (d / METRICS).is_file():
            check_finished(f"{cell.label} member {j}", d, cfg)
            m = json.loads((d / METRICS).read_text())
        else:
            clear_unfinished(f"{cell.label} member {j}", d)
            say(f"    member {j + 1}/{len(configs)} (seed {cfg.fit.seed})")
            m = train_member(cfg, d, cell.member_rows(cfg), progress=progress)
        member_metrics.append(m)
        member_preds.append(load_predictions(d / PREDICTIONS))
    info = {"dataset": member_metrics[0]["dataset"], "split": member_metrics[0]["split"]}
    seconds = [(m["bench"]["rows"]["member"]["eval_seconds"], m["bench"]["rows"]["member"].get("eval_cpu_seconds"))
               for m in member_metrics]
    rows, kept = _combine_members(cell.entry, member_preds, seconds, info, configs[0].predict.ece_bins)
    save_predictions(cell.dir / PREDICTIONS, member_preds[0][0], kept)
    first = rows[next(iter(rows))]
    metrics = {k: first[k] for k in METRIC_NAMES + UNCERTAINTY_NAMES}
    metrics.update(info, num_examples=first["num_examples"], ece_bins=first["ece_bins"],
                   members=[d.name for d in cell.member_dirs()],
                   bench={"rows": rows, "train_seconds": sum(m["bench"]["train_seconds"] for m in member_metrics),
                          "train_cpu_seconds": _sum_or_none(m["bench"].get("train_cpu_seconds") for m in member_metrics),
                          "setup_seconds": sum(m["bench"]["setup_seconds"] for m in member_metrics)})
    write_json(cell.dir / METRICS, metrics)
    return metrics


# ---- out-of-distribution evaluation ------------------------------------------------------------
def available_ood(grid: Grid) -> tuple[list[str], list[str]]:
    """(datasets to evaluate, messages for skipped ones): MMLU subjects without local data are skipped."""
    from blob_pyro.data import load_split, resolve_data_dir
    from blob_pyro.errors import DataError

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


def _ood_member(run_dir: Path, cfg: RunConfig, datasets: list[str], rows: dict, progress: bool) -> None:
    """Evaluate one finished run on each OOD dataset (writing run_dir/ood/<dataset>.json + .safetensors)."""
    from blob_pyro.data import load_split
    from blob_pyro.training import load_run, retarget_head

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
        retarget_head(run.model, d)
        preds = predict_rows(run, split, missing, progress)
        labels, old = load_predictions(pred_path) if have else (next(iter(preds.values()))[0].labels, {})
        old.update({r: (p.probs, p.logits) for r, (p, _) in preds.items()})
        save_predictions(pred_path, labels, old)
        have.update({r: _row_metrics(p.probs, p.labels, missing[r], s, split, p.logits, cfg.predict.ece_bins)
                     for r, (p, s) in preds.items()})
        write_json(json_path, {"rows": have})


def run_ood(cell: Cell, grid: Grid, datasets: list[str], *, progress: bool = True) -> None:
    """Evaluate a finished cell's run(s) on each of ``datasets``; an ensemble's rows come from its members'."""
    configs = cell.member_configs(grid.base)
    for cfg, d in zip(configs, cell.member_dirs()):
        _ood_member(d, cfg, datasets, cell.member_rows(cfg), progress)
    if not cell.entry.is_ensemble:
        return
    for d in datasets:
        target = cell.dir / "ood" / f"{d}.json"
        if target.is_file() and all(r in json.loads(target.read_text())["rows"] for r in cell.entry.predict):
            continue
        member_preds = [load_predictions(m / "ood" / f"{d}.safetensors") for m in cell.member_dirs()]
        member_rows = [json.loads((m / "ood" / f"{d}.json").read_text())["rows"]["member"] for m in cell.member_dirs()]
        seconds = [(r["eval_seconds"], r.get("eval_cpu_seconds")) for r in member_rows]
        rows, kept = _combine_members(cell.entry, member_preds, seconds, {"dataset": d}, configs[0].predict.ece_bins)
        target.parent.mkdir(exist_ok=True)
        save_predictions(cell.dir / "ood" / f"{d}.safetensors", member_preds[0][0], kept)
        write_json(target, {"rows": rows})
