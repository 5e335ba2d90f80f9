"""Posterior predictive checks of a BLoB run: replicated labels, test statistics, Bayesian p-values.

::

    idata = to_inference_data(run, num_samples=100)        # y_rep (1, S, N), logits (1, S, N, K)
    result = check_idata(idata)                            # PPCResult: statistics, replicated draws, band
    print(format_table(result))
    run_ppc("runs/wg", dataset="winogrande_s", num_samples=100, out_dir="runs/wg/ppc")   # = scripts/ppc.py

**Replicates.** For s = 1..S, θ_s ~ q once for the whole split and y_rep_s,i ~ Categorical(softmax(
logits_s,i)) for every example i (:func:`~blob_pyro.arviz_io.to_inference_data`): S replicated label
vectors from the posterior predictive.

**Test statistics** T(y), computed with the model's predictive p̄ = mean_s softmax(logits_s) (BLoB's
rule) and its top label ŷ held fixed, for the observed labels and for each replicate:

- ``accuracy``: mean(ŷ == y). Its replicated mean is the mean top-label confidence.
- ``confidence_gap``: mean top-label confidence − accuracy(y) (> 0: over-confident).
- ``class_frequency[k]``: share of examples labelled k.
- ``per_class_error[k]``: error rate among the examples labelled k.
- ``ece``: expected calibration error of p̄ against y (15 bins, as :mod:`blob_pyro.metrics`). Even a
  perfectly calibrated model has ECE > 0 on finite N; the replicates give that reference.

**p-value** p = P(T(y_rep) > T(y)) + ½ P(T(y_rep) = T(y)) over the S replicates (the mid-p form, as the
statistics are discrete). Values near 0 or 1 say the data are unlike the model's replicates; a
statistic is flagged ``extreme`` when p < 0.025 or p > 0.975. Use S ≥ 100 for p-values worth reading.

A statistic undefined for the data (the error of a class no example has) is NaN in memory and null in
``ppc.json``, and never flagged.

**Reliability band.** Per confidence bin of p̄, the 5–95 % range over replicates of the accuracy
(ŷ == y_rep): where the observed accuracy leaves the band, the model's calibration is off there.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["PPCResult", "check_predictive", "check_idata", "format_table", "write_outputs", "run_ppc",
           "QUANTILES", "EXTREME"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
EXTREME = 0.025  # two-sided 5 %


@dataclass
class PPCResult:
    statistics: dict  # name -> {"observed", "replicated": {mean, q05.., q95}, "p_value", "extreme", "description"}
    replicated: dict  # name -> (S,) array of T(y_rep_s) (nan where undefined)
    band: dict  # {"lower", "upper"}: (n_bins,) accuracy band for reliability_diagram
    probs: torch.Tensor  # (N, K) predictive p̄
    labels: torch.Tensor  # (N,)
    y_rep: torch.Tensor  # (S, N)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.meta, "statistics": self.statistics}


def _p_value(rep: np.ndarray, obs: float) -> float:
    rep = rep[np.isfinite(rep)]
    if rep.size == 0 or not np.isfinite(obs):
        return float("nan")
    return float(np.mean(rep > obs) + 0.5 * np.mean(rep == obs))


def _bins(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin of each confidence, exactly as :mod:`blob_pyro.metrics` (float32 edges; bin n_bins = {1.0})."""
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
    return (torch.bucketize(conf.float(), edges, right=True) - 1).clamp(0, n_bins)


def check_predictive(logits, labels, y_rep, *, n_bins: int = 15) -> PPCResult:
    """Test statistics and p-values from per-draw ``logits`` (S, N, K), ``labels`` (N,), ``y_rep`` (S, N)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    y_rep = torch.as_tensor(np.asarray(y_rep), dtype=torch.long)
    if logits.dim() != 3 or y_rep.shape != logits.shape[:2] or labels.shape != logits.shape[1:2]:
        raise ValueError(f"need logits (S, N, K), labels (N,), y_rep (S, N); got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(y_rep.shape)}")
    s_draws, n, k = logits.shape
    probs = torch.softmax(logits, -1).mean(0)
    conf, pred = probs.max(-1)
    ys = torch.cat([labels[None], y_rep])  # row 0 = observed, rows 1.. = replicates
    correct = (ys == pred[None]).double()  # (1+S, N)
    stats = {}

    def add(name, values, description):
        values = np.asarray(values, dtype=np.float64)
        stats[name] = (float(values[0]), values[1:], description)

    add("accuracy", correct.mean(1), "share of examples whose top predicted class is the label")
    add("confidence_gap", float(conf.mean()) - correct.mean(1),
        "mean top-label confidence minus accuracy (> 0: over-confident)")
    idx = _bins(conf, n_bins)
    onehot = torch.nn.functional.one_hot(idx, n_bins + 1).double()  # (N, n_bins+1)
    conf_sum = conf @ onehot
    acc_sum = correct @ onehot  # (1+S, n_bins+1)
    add("ece", (acc_sum - conf_sum).abs().sum(1) / n, f"expected calibration error of the predictive ({n_bins} bins)")
    for c in range(k):
        is_c = (ys == c).double()
        add(f"class_frequency[{c}]", is_c.mean(1), f"share of examples labelled {c}")
        with np.errstate(invalid="ignore", divide="ignore"):
            err = ((1 - correct) * is_c).sum(1).numpy() / is_c.sum(1).numpy()
        add(f"per_class_error[{c}]", err, f"error rate among examples labelled {c}")

    statistics, replicated = {}, {}
    for name, (obs, rep, description) in stats.items():
        finite = rep[np.isfinite(rep)]
        qs = np.quantile(finite, QUANTILES) if finite.size else np.full(len(QUANTILES), np.nan)
        p = _p_value(rep, obs)
        statistics[name] = {
            "observed": obs,
            "replicated": {"mean": float(finite.mean()) if finite.size else float("nan"),
                           **{f"q{int(round(q * 100)):02d}": float(v) for q, v in zip(QUANTILES, qs)}},
            "p_value": p, "extreme": bool(np.isfinite(p) and (p < EXTREME or p > 1 - EXTREME)),
            "description": description}
        replicated[name] = rep
    count = onehot.sum(0)[:n_bins]
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_rep = (acc_sum[1:, :n_bins] / count).numpy()  # (S, n_bins), nan for empty bins
    band = {"lower": np.quantile(acc_rep, 0.05, axis=0) if s_draws else np.full(n_bins, np.nan),
            "upper": np.quantile(acc_rep, 0.95, axis=0) if s_draws else np.full(n_bins, np.nan)}
    meta = {"num_examples": n, "num_samples": s_draws, "num_classes": k, "mean_confidence": float(conf.mean()),
            "p_value": "P(T(y_rep) > T(y)) + 0.5 P(T(y_rep) = T(y))", "extreme_if": f"p < {EXTREME} or p > {1 - EXTREME}"}
    return PPCResult(statistics, replicated, band, probs.float(), labels, y_rep, meta)


def check_idata(idata, *, n_bins: int = 15) -> PPCResult:
    """:func:`check_predictive` on the groups written by :func:`~blob_pyro.arviz_io.to_inference_data`."""
    pp = idata.posterior_predictive
    logits = np.asarray(pp["logits"]).reshape(-1, *pp["logits"].shape[2:])
    y_rep = np.asarray(pp["y"]).reshape(-1, pp["y"].shape[-1])
    result = check_predictive(logits, np.asarray(idata.observed_data["y"]), y_rep, n_bins=n_bins)
    attrs = {k: idata.attrs[k] for k in ("dataset", "split", "seed") if k in idata.attrs}
    result.meta.update({k: v.item() if hasattr(v, "item") else v for k, v in attrs.items()})  # NetCDF gives numpy
    return result


def format_table(result: PPCResult) -> str:
    """A short text table: observed value, replicated 5–95 %, p-value, '!' for extreme."""
    head = f"{'statistic':<22}{'observed':>10}{'replicated 5%-95%':>22}{'p-value':>10}"
    lines = [head, "-" * len(head)]
    for name, st in result.statistics.items():
        rep = st["replicated"]
        span = f"[{rep['q05']:.3f}, {rep['q95']:.3f}]"
        flag = "  !" if st["extreme"] else ""
        lines.append(f"{name:<22}{st['observed']:>10.4f}{span:>22}{st['p_value']:>10.3f}{flag}")
    lines.append(f"S={result.meta.get('num_samples')} replicates of N={result.meta.get('num_examples')} labels; "
                 f"ECE bins={len(result.band['lower'])}; '!' = p < {EXTREME} or p > {1 - EXTREME}")
    return "\n".join(lines)


def write_outputs(result: PPCResult, idata, out_dir, *, extra: dict | None = None) -> list[Path]:
    """Write ppc.json, idata.nc and the PNGs into ``out_dir``; returns the paths written.

    ppc.json's ``metrics``: :func:`~blob_pyro.metrics.compute_metrics` of p̄ (the result's bin count) and
    :func:`~blob_pyro.uncertainty.uncertainty_metrics` of the S replicated draws' probabilities.
    """
    import matplotlib.pyplot as plt

    from . import arviz_io
    from .io import atomic_write_text
    from .metrics import compute_metrics
    from .plots import confidence_histogram, plot_ppc_statistics, reliability_diagram, risk_coverage_plot, save_figure
    from .uncertainty import uncertainty_metrics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [arviz_io.save(idata, out / "idata.nc")]
    n_bins = len(result.band["lower"])
    ax = reliability_diagram(result.probs, result.labels, band=result.band, label="predictive", n_bins=n_bins)
    ax.set_title("Reliability with posterior-predictive 5-95% band")
    paths.append(save_figure(ax, out / "reliability.png"))
    paths.append(save_figure(risk_coverage_plot(result.probs, result.labels, label="predictive"),
                             out / "risk_coverage.png"))
    paths.append(save_figure(confidence_histogram(result.probs, labels=result.labels), out / "confidence_histogram.png"))
    fig, ax = plt.subplots(figsize=(5.0, 3.5))
    arviz_io.plot_ppc(idata, ax=ax)
    ax.set_title("Labels: observed vs posterior predictive")
    paths.append(save_figure(fig, out / "ppc_labels.png"))
    paths.append(save_figure(plot_ppc_statistics(result), out / "ppc_statistics.png"))
    report = {**result.to_dict(), **(extra or {}),
              "metrics": {**compute_metrics(result.probs, result.labels, n_bins=n_bins),
                          **uncertainty_metrics(_draw_probs(idata), result.labels), "ece_bins": n_bins},
              "files": [p.name for p in paths] + ["ppc.json"]}
    atomic_write_text(out / "ppc.json", json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    return paths + [out / "ppc.json"]


def _draw_probs(idata) -> torch.Tensor:
    """(S, N, K) probabilities of the posterior draws behind ``idata``'s posterior-predictive logits."""
    logits = np.asarray(idata.posterior_predictive["logits"])
    return torch.softmax(torch.as_tensor(logits.reshape(-1, *logits.shape[2:]), dtype=torch.float64), -1)


def _json_safe(obj):
    """Strict JSON: NaN/inf (an undefined statistic, e.g. the error of a class with no example) become null."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def run_ppc(run_dir, *, dataset: str | None = None, data_dir: str | None = None, num_samples: int = 100,
            out_dir, progress: bool = True, seed: int = 0, limit: int | None = None,
            n_bins: int | None = None) -> PPCResult:
    """Posterior predictive checks of the run in ``run_dir`` on ``dataset``'s eval split.

    Writes ppc.json, idata.nc, reliability.png, risk_coverage.png, confidence_histogram.png, ppc_labels.png and
    ppc_statistics.png into ``out_dir``; ``n_bins`` is the ECE's bin count (default: the run's ``ece_bins``). A
    user mistake (missing or damaged run folder, unknown dataset, bad data folder, an output path that is a file)
    raises a :class:`~blob_pyro.errors.BlobPyroError`.

    An ensemble run (``method=ensemble``) has no variational posterior: its members are the posterior draws, draw s
    being member ``s mod K`` (:func:`blob_pyro.ensemble.ensemble_draws`), and idata.nc holds no ``posterior`` group.
    """
    from .errors import ConfigError, RunError

    if num_samples is None or int(num_samples) < 1:
        raise ConfigError(f"--num-samples must be >= 1; got {num_samples}")
    if limit is not None and int(limit) < 1:
        raise ConfigError(f"--limit must be >= 1; got {limit}")
    if n_bins is not None and int(n_bins) < 1:
        raise ConfigError(f"--ece-bins must be >= 1; got {n_bins}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"output {out} exists and is not a folder")
    idata, info = _score(run_dir, dataset, data_dir, int(num_samples), seed, limit, progress)
    if n_bins is None:
        from .training import read_run_config

        n_bins = read_run_config(run_dir).predict.ece_bins
    result = check_idata(idata, n_bins=int(n_bins))
    try:
        write_outputs(result, idata, out, extra=info)
    except OSError as err:
        raise RunError(f"cannot write {out}: {err.strerror or err}") from err
    return result


def _score(run_dir, dataset, data_dir, num_samples, seed, limit, progress):
    """Read the split first (a bad dataset fails before the model loads), then the run, then draw."""
    import transformers

    from .arviz_io import to_inference_data
    from .data import dataset_info
    from .errors import RunError
    from .training import eval_split_of, load_run, read_run_config

    transformers.logging.set_verbosity_error()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    cfg = read_run_config(run_dir)
    split = eval_split_of(cfg, dataset, data_dir)
    k_run = dataset_info(cfg.dataset)[0]
    if split.num_classes != k_run:
        raise RunError(f"{split.dataset} has {split.num_classes} classes but the run was trained on "
                       f"{cfg.dataset} with {k_run}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecation notes from transformers on load
        run = load_run(run_dir)
        run.eval = split
        if run.members:  # method=ensemble: the members are the posterior draws (draw s = member s mod K)
            from .ensemble import ensemble_draws

            idata = ensemble_draws(run.members, list(split.examples)[:limit], num_samples=num_samples, seed=seed,
                                   batch_size=cfg.predict.eval_batch_size, progress=progress,
                                   attrs={"dataset": split.dataset, "split": split.split})
        else:
            idata = to_inference_data(run, data=split, num_samples=num_samples, seed=seed, limit=limit,
                                      train_log=Path(run_dir) / "train_log.jsonl", progress=progress)
    info = {"run": str(run_dir), "dataset": split.dataset, "split": split.split, "source": split.source}
    return idata, info
