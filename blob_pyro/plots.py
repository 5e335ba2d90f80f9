"""Matplotlib figures for BLoB runs: calibration, training traces, posterior spread, run comparison.

Every function draws into a given ``ax``/``axes`` or creates a new figure, returns the Axes or Figure, and
never calls ``plt.show()``, so it works in notebooks and headless (``Agg``) alike. Save with
:func:`save_figure`, which also closes the figure.

Example::

    import matplotlib
    matplotlib.use("Agg")
    from blob_pyro.metrics import aggregate_probs
    from blob_pyro.plots import reliability_diagram, save_figure

    probs = aggregate_probs(logits_draws)          # (S, N, K) -> (N, K)
    ax = reliability_diagram(probs, labels, label="BLoB (N=10)")
    save_figure(ax.figure, "out/reliability.png")
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from .metrics import _check_inputs, reliability_bins

__all__ = [
    "reliability_diagram",
    "risk_coverage_plot",
    "confidence_histogram",
    "plot_training_trace",
    "plot_posterior_std",
    "plot_prior_vs_posterior",
    "plot_metric_comparison",
    "plot_ppc_statistics",
    "plot_importance_ratios",
    "save_figure",
]

_DIAGONAL_GID = "blob_pyro-perfect-calibration"
_ORACLE_GID = "blob_pyro-oracle-risk"
_FACTOR_COLORS = {"lora_A": "tab:blue", "lora_B": "tab:orange"}


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _new_ax(ax, figsize=(5.0, 5.0)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _axes_list(axes, n: int, figsize_per=(6.0, 2.4), sharex=False):
    """Return (figure, list of n Axes): new stacked subplots, or the first n of the given Axes."""
    if axes is None:
        fig, ax_arr = plt.subplots(n, 1, figsize=(figsize_per[0], figsize_per[1] * n), sharex=sharex, squeeze=False)
        return fig, list(ax_arr[:, 0])
    ax_seq = list(np.ravel(np.asarray(axes, dtype=object))) if not isinstance(axes, plt.Axes) else [axes]
    if len(ax_seq) < n:
        raise ValueError(f"need {n} Axes, got {len(ax_seq)}")
    return ax_seq[0].figure, ax_seq[:n]


# --------------------------------------------------------------------------------------------- calibration
def reliability_diagram(probs, labels, n_bins: int = 15, ax=None, band=None, label=None, kind: str = "bar"):
    """Reliability diagram: accuracy vs confidence per equal-width bin, with the diagonal and the ECE.

    Args:
        probs, labels: ``(N, K)`` predictive probabilities and ``(N,)`` labels (see :mod:`blob_pyro.metrics`).
        n_bins: number of equal-width confidence bins (15 as in BLoB).
        ax: Axes to draw into; a new figure is made when ``None``. Call again with the same ``ax`` (preferably
            with ``kind="line"``) to overlay several runs.
        band: optional dict with per-bin ``"lower"`` and ``"upper"`` accuracy arrays of length ``n_bins``
            (e.g. a posterior-predictive interval over draws), drawn as a shaded region; ``nan`` = no band.
        label: legend name of this run; the legend entry reads ``"<label> (ECE x.xx%)"``.
        kind: ``"bar"`` (one bar per non-empty bin, at the bin position) or ``"line"`` (markers at
            (mean confidence, accuracy) per non-empty bin, suited to overlays).

    The ECE is the torchmetrics-compatible value; it goes in the legend, and in the title when the Axes has
    no title yet. Predictions with confidence exactly 1.0 (a bin of their own in the ECE) are shown as a star
    at confidence 1. Returns the Axes.
    """
    if kind not in ("bar", "line"):
        raise ValueError(f"kind must be 'bar' or 'line', got {kind!r}")
    rb = reliability_bins(probs, labels, n_bins=n_bins)
    ece = rb["ece"]
    edges, acc, conf, count = rb["edges"], rb["accuracy"], rb["confidence"], rb["count"]
    full = count > 0
    ax = _new_ax(ax)
    name = f"{label} (ECE {100 * ece:.2f}%)" if label else f"ECE {100 * ece:.2f}%"

    if not any(line.get_gid() == _DIAGONAL_GID for line in ax.lines):
        ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration", gid=_DIAGONAL_GID)

    if band is not None:
        if not isinstance(band, Mapping) or "lower" not in band or "upper" not in band:
            raise ValueError("band must be a dict with per-bin 'lower' and 'upper' accuracy arrays")
        lower, upper = _to_numpy(band["lower"]).ravel(), _to_numpy(band["upper"]).ravel()
        if lower.shape != (n_bins,) or upper.shape != (n_bins,):
            raise ValueError(
                f"band 'lower'/'upper' must each have n_bins={n_bins} values, got {lower.size}/{upper.size}"
            )
        # step region over the bin edges: bin i spans edges[i]..edges[i+1], so the right edge of every
        # non-empty bin must be inside the region too, holding that bin's value (isolated bins included)
        ok = np.isfinite(lower) & np.isfinite(upper)
        where = np.append(ok, False)
        where[1:] |= ok
        ends = np.flatnonzero(where[1:] & ~np.append(ok[1:], False)) + 1
        lo_y, hi_y = np.append(lower, np.nan), np.append(upper, np.nan)
        lo_y[ends], hi_y[ends] = lower[ends - 1], upper[ends - 1]
        ax.fill_between(
            edges, lo_y, hi_y, where=where,
            step="post", alpha=0.3, color="tab:green", lw=0, label="predictive band", zorder=3,
        )

    if kind == "bar":
        widths = np.diff(edges)
        ax.bar(edges[:-1][full], acc[full], width=widths[full], align="edge", edgecolor="black", lw=0.6,
               alpha=0.75, label=name)
        # gap to the mean confidence of each bin
        ax.plot(conf[full], acc[full], "o", color="black", ms=2.5, alpha=0.7)
    else:
        ax.plot(conf[full], acc[full], "o-", ms=4, label=name)
    if rb["count_at_one"]:
        ax.plot([1.0], [rb["accuracy_at_one"]], "*", ms=11, color="tab:red", clip_on=False, zorder=4,
                label=f"conf = 1.0 (n={rb['count_at_one']})")

    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("accuracy")
    if not ax.get_title():
        ax.set_title(f"Reliability diagram, ECE = {ece:.4f} ({100 * ece:.2f}%)")
    ax.legend(loc="upper left", fontsize="small", framealpha=0.9)
    return ax


def risk_coverage_plot(probs, labels, ax=None, label=None, confidence=None):
    """Risk–coverage curve of selective prediction: the error rate among the most confident answers vs their share.

    Args:
        probs, labels: ``(N, K)`` predictive probabilities and ``(N,)`` labels.
        ax: Axes to draw into (a new figure when ``None``); call again with the same ``ax`` to overlay runs.
        label: legend name; the entry reads ``"<label> (AURC x.xxx)"``.
        confidence: ``(N,)`` ranking score (default ``max p``); see :func:`blob_pyro.uncertainty.risk_coverage_curve`
            for the treatment of ties.

    The first call on an Axes also draws the best curve these errors allow (every right answer first, dotted) and
    a vertical line at 80 % coverage, where ``accuracy_at_80`` is read. Returns the Axes.
    """
    from .uncertainty import aurc, risk_coverage_curve

    coverage, risk = risk_coverage_curve(probs, labels, confidence)
    value = aurc(probs, labels, confidence)
    ax = _new_ax(ax, figsize=(5.0, 4.0))
    if not any(line.get_gid() == _ORACLE_GID for line in ax.lines):
        n = coverage.shape[0]
        errors = float(risk[-1]) * n
        answered = np.arange(1, n + 1)
        ax.plot(coverage.numpy(), np.clip(answered - (n - errors), 0, None) / answered, ":", color="gray", lw=1,
                label="best ranking", gid=_ORACLE_GID)
        ax.axvline(0.8, color="gray", lw=0.6, ls="--")
    name = f"{label} (AURC {value:.3f})" if label else f"AURC {value:.3f}"
    ax.plot(coverage.numpy(), risk.numpy(), "-", lw=1.5, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (share answered, most confident first)")
    ax.set_ylabel("risk (error rate among answered)")
    if not ax.get_title():
        ax.set_title(f"Risk–coverage, AURC = {value:.4f}")
    ax.legend(loc="upper left", fontsize="small", framealpha=0.9)
    return ax


def confidence_histogram(probs, ax=None, n_bins: int = 15, labels=None):
    """Histogram of top-label confidences (fraction of examples per equal-width bin).

    Draws ``n_bins`` bars (confidences of exactly 1.0 are counted in the last bar) and a vertical line at the
    mean confidence; with ``labels`` also one at the accuracy (the gap is the over/under-confidence).
    Returns the Axes.
    """
    probs_t = torch.as_tensor(probs)
    if labels is None:
        probs_t, _ = _check_inputs(probs_t, torch.zeros(probs_t.shape[0] if probs_t.dim() else 0, dtype=torch.long))
    else:
        probs_t, labels_t = _check_inputs(probs_t, labels)
    conf = probs_t.detach().max(dim=1).values.float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
    idx = (torch.bucketize(conf.cpu(), edges, right=True) - 1).clamp(0, n_bins - 1)
    frac = torch.bincount(idx, minlength=n_bins).double().numpy() / conf.numel()
    edges_np = edges.double().numpy()
    ax = _new_ax(ax, figsize=(5.0, 3.5))
    ax.bar(edges_np[:-1], frac, width=np.diff(edges_np), align="edge", edgecolor="black", lw=0.6, alpha=0.75)
    mean_conf = float(conf.double().mean())
    ax.axvline(mean_conf, color="tab:red", ls="--", label=f"mean confidence {mean_conf:.3f}")
    if labels is not None:
        acc = float(probs_t.argmax(1).eq(labels_t).double().mean())
        ax.axvline(acc, color="black", ls="-", label=f"accuracy {acc:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("fraction of examples")
    ax.set_title("Confidence histogram")
    ax.legend(loc="upper left", fontsize="small")
    return ax


# ------------------------------------------------------------------------------------------------ training
def _load_records(records):
    if isinstance(records, (str, Path)):
        with open(records) as f:
            return [json.loads(line) for line in f if line.strip()]
    return list(records)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))


def plot_training_trace(records, keys=("loss", "nll", "kl", "kl_weight"), axes=None):
    """One subplot per logged quantity against the step.

    Args:
        records: list of per-step dicts as written to ``train_log.jsonl`` (or the path of that file), e.g.
            ``{"step": 1, "loss": 12.3, "nll": 0.69, "kl": 1500.0, "kl_weight": 0.01, "lr": {...}}``.
            The x axis is ``"step"`` (record index when absent).
        keys: quantities to plot. Keys no record has are skipped; a dict-valued key (``"lr"``) gets one line
            per entry. Positive series spanning more than two decades (the KL) get a log y axis.
        axes: optional sequence of Axes, one per plotted key.

    Returns the Figure. Raises ``ValueError`` when none of ``keys`` occurs in ``records``.
    """
    recs = _load_records(records)
    series = {}  # key -> {line name: (x list, y list)}
    for key in keys:
        lines = {}
        for i, r in enumerate(recs):
            if key not in r:
                continue
            x = r.get("step", i)
            v = r[key]
            items = v.items() if isinstance(v, Mapping) else [(key, v)]
            for name, y in items:
                if _is_number(y):
                    xs, ys = lines.setdefault(str(name), ([], []))
                    xs.append(x)
                    ys.append(float(y))
        if lines:
            series[key] = lines
    if not series:
        raise ValueError(f"none of the keys {tuple(keys)} has a numeric value in the {len(recs)} records")
    fig, ax_list = _axes_list(axes, len(series), sharex=True)
    for ax, (key, lines) in zip(ax_list, series.items()):
        for name, (xs, ys) in lines.items():
            ax.plot(xs, ys, lw=1.2, label=name if len(lines) > 1 else None)
        ys_all = np.concatenate([np.asarray(ys) for _, ys in lines.values()])
        if (ys_all > 0).all() and ys_all.max() / ys_all.min() > 100:
            ax.set_yscale("log")
        if len(lines) > 1:
            ax.legend(fontsize="small")
        ax.set_ylabel(key)
        ax.set_title(key, fontsize="medium")
        ax.grid(alpha=0.3)
    ax_list[-1].set_xlabel("step")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ posterior
def _short_site_name(site: str) -> tuple[str, str]:
    """'base_model.model.encoder.layer.3.attention.self.query.lora_B' -> ('L3 query B', 'lora_B')."""
    parts = site.split(".")
    factor = next((p for p in reversed(parts) if p.startswith("lora_")), "")
    if factor:
        module_idx = max(i for i, p in enumerate(parts) if p == factor) - 1
    else:
        module_idx = len(parts) - 1
        while module_idx > 0 and parts[module_idx] in ("weight", "bias", "default", "loc", "scale"):
            module_idx -= 1
    module = parts[module_idx] if module_idx >= 0 else site
    layer = None
    for i in range(len(parts) - 1):
        if re.fullmatch(r"(layers?|h|blocks?)", parts[i]) and parts[i + 1].isdigit():
            layer = parts[i + 1]
    if layer is None:
        nums = [p for p in parts[:module_idx] if p.isdigit()]
        layer = nums[-1] if nums else None
    label = " ".join(x for x in (f"L{layer}" if layer is not None else "", module, factor.replace("lora_", "")) if x)
    return label, factor


def plot_posterior_std(stds, ax=None, whiskers: str = "minmax"):
    """Bar per LoRA site: mean posterior standard deviation, with whiskers over its entries.

    Args:
        stds: maps a site name (``"base_model.model.encoder.layer.3.attention.self.query.lora_B"``) to a tensor
            or array of posterior standard deviations of that factor.
        ax: Axes to draw into (new figure when ``None``).
        whiskers: ``"minmax"`` (min to max) or ``"percentile"`` (5th to 95th percentile).

    Bars are grouped and colored by factor (``lora_A``, then ``lora_B``, then others), in insertion order
    within a group, and labelled ``"L<layer> <module> <A|B>"``. Returns the Axes.
    """
    if whiskers not in ("minmax", "percentile"):
        raise ValueError(f"whiskers must be 'minmax' or 'percentile', got {whiskers!r}")
    if not stds:
        raise ValueError("stds is empty: pass a dict of site name -> posterior std tensor")
    rows = []
    for site, value in stds.items():
        v = _to_numpy(value).ravel()
        v = v[np.isfinite(v)]
        if v.size == 0:
            raise ValueError(f"posterior std of site {site!r} has no finite values")
        lo, hi = (v.min(), v.max()) if whiskers == "minmax" else tuple(np.percentile(v, [5, 95]))
        label, factor = _short_site_name(site)
        rows.append((label, factor, v.mean(), lo, hi))
    order = {"lora_A": 0, "lora_B": 1}
    rows.sort(key=lambda r: order.get(r[1], 2))  # stable: keeps insertion order within a factor
    # a one-slot gap between factor groups
    x, pos, prev = [], 0.0, None
    for r in rows:
        if prev is not None and r[1] != prev:
            pos += 1.0
        x.append(pos)
        pos += 1.0
        prev = r[1]
    x = np.asarray(x)
    means = np.array([r[2] for r in rows])
    err = np.array([[r[2] - r[3] for r in rows], [r[4] - r[2] for r in rows]])
    colors = [_FACTOR_COLORS.get(r[1], "tab:gray") for r in rows]
    ax = _new_ax(ax, figsize=(max(6.0, 0.3 * len(rows) + 2), 4.0))
    ax.bar(x, means, color=colors, edgecolor="black", lw=0.5)
    ax.errorbar(x, means, yerr=err, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels([r[0] for r in rows], rotation=90, fontsize="small")
    ax.set_ylabel("posterior std")
    span = "min-max" if whiskers == "minmax" else "5-95%"
    ax.set_title(f"Posterior standard deviation per LoRA factor (bar: mean, whiskers: {span})")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for f, c in _FACTOR_COLORS.items() if any(r[1] == f for r in rows)]
    names = [f for f in _FACTOR_COLORS if any(r[1] == f for r in rows)]
    if any(r[1] not in _FACTOR_COLORS for r in rows):
        handles.append(plt.Rectangle((0, 0), 1, 1, color="tab:gray"))
        names.append("other")
    ax.legend(handles, names, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


def _prior_density(prior, grid: np.ndarray) -> np.ndarray:
    """Density of a scalar prior on ``grid``: a torch Distribution, or a callable returning densities."""
    if isinstance(prior, torch.distributions.Distribution):
        if prior.batch_shape.numel() != 1 or prior.event_shape.numel() != 1:
            raise ValueError(
                f"prior must be a scalar distribution, got batch_shape {tuple(prior.batch_shape)} "
                f"and event_shape {tuple(prior.event_shape)}"
            )
        g = len(grid)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
            anchor = prior.sample()  # a point inside the support, with the prior's dtype and shape
        with torch.no_grad():
            x = torch.as_tensor(grid, dtype=anchor.dtype).reshape(g, *prior.batch_shape, *prior.event_shape)
            inside = prior.support.check(x).reshape(g, -1).all(dim=1)
            x_safe = torch.where(inside.reshape((g,) + (1,) * (x.dim() - 1)), x, anchor)
            dens = torch.where(inside, prior.log_prob(x_safe).reshape(g).exp(), torch.zeros((), dtype=anchor.dtype))
        return dens.double().numpy()
    if callable(prior):
        return np.asarray(prior(grid), dtype=np.float64).reshape(len(grid))
    raise ValueError(
        f"prior must be a torch.distributions.Distribution or a density callable, got {type(prior).__name__}"
    )


def _prior_range(prior) -> tuple[float, float] | None:
    try:
        m, s = float(prior.mean), float(prior.stddev)
    except (AttributeError, NotImplementedError, TypeError, ValueError, RuntimeError):
        return None
    if not (math.isfinite(m) and math.isfinite(s)) or s <= 0:
        return None
    return m - 4 * s, m + 4 * s


def plot_prior_vs_posterior(entries, axes=None, n_points: int = 400, logy: bool = False):
    """Prior density vs Gaussian posterior density for a few scalar weight entries, one subplot each.

    Args:
        entries: ``{name: (prior, (loc, scale))}``; ``prior`` is a scalar ``torch.distributions`` object (Pyro's
            included) or a callable mapping a numpy grid to densities; ``loc``/``scale`` are the mean and
            standard deviation of the Normal posterior of that entry (floats or 0-d tensors).
        axes: optional Axes (one entry) or sequence of Axes (one per entry).
        n_points: grid size; the grid is refined around the posterior so a narrow posterior stays resolved.
        logy: log-scale density axis (useful when the posterior is much narrower than the prior).

    Returns the Figure.
    """
    if not entries:
        raise ValueError("entries is empty: pass {name: (prior, (loc, scale))}")
    fig, ax_list = _axes_list(axes, len(entries), figsize_per=(5.0, 2.8))
    for ax, (name, entry) in zip(ax_list, entries.items()):
        try:
            prior, (loc, scale) = entry
        except (TypeError, ValueError):
            raise ValueError(f"entry {name!r} must be (prior, (loc, scale))") from None
        loc, scale = float(loc), float(scale)
        if not (math.isfinite(loc) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"entry {name!r}: posterior needs a finite loc and a scale > 0, got ({loc}, {scale})")
        lo, hi = loc - 4 * scale, loc + 4 * scale
        pr = _prior_range(prior)
        if pr is not None:
            lo, hi = min(lo, pr[0]), max(hi, pr[1])
        else:
            lo, hi = min(lo, loc - 10 * scale), max(hi, loc + 10 * scale)
        grid = np.unique(np.concatenate([np.linspace(lo, hi, n_points),
                                         np.linspace(loc - 4 * scale, loc + 4 * scale, n_points)]))
        post = np.exp(-0.5 * ((grid - loc) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))
        ax.plot(grid, _prior_density(prior, grid), color="tab:gray", lw=1.5, label="prior")
        ax.plot(grid, post, color="tab:blue", lw=1.5, label=f"posterior N({loc:.3g}, {scale:.2g}²)")
        ax.fill_between(grid, post, alpha=0.2, color="tab:blue")
        ax.axvline(loc, color="tab:blue", ls=":", lw=1)
        if logy:
            ax.set_yscale("log")
        ax.set_title(str(name), fontsize="medium")
        ax.set_xlabel("weight value")
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ comparison
def _mean_std(value, run: dict, metric: str) -> tuple[float, float]:
    if value is None:
        return float("nan"), float("nan")
    if isinstance(value, torch.Tensor) or isinstance(value, (list, tuple, np.ndarray)):
        arr = _to_numpy(value).ravel()
        if arr.size == 0:
            return float("nan"), float("nan")
        return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    std = run.get(f"{metric}_std", float("nan"))
    return float(value), float(std) if std is not None else float("nan")


def plot_metric_comparison(results, metrics=("accuracy", "ece", "nll"), axes=None, percent: bool = False):
    """Bar charts comparing runs/methods, one subplot per metric, one colored bar per run.

    Args:
        results: ``{run name: {metric: value}}``. A value may be a float (with an optional ``"<metric>_std"``
            entry for an error bar) or a list of per-seed values (bar = mean, error bar = sample std).
            A run lacking a metric gets no bar in that subplot.
        metrics: metrics to show, in order.
        axes: optional sequence of Axes, one per metric.
        percent: show ``accuracy`` and ``ece`` x100, as the BLoB paper does.

    Returns the Figure.
    """
    if not results:
        raise ValueError("results is empty: pass {run name: {metric: value}}")
    metrics = list(metrics)
    runs = list(results)
    fig, ax_list = (None, None)
    if axes is None:
        fig, ax_arr = plt.subplots(1, len(metrics), figsize=(max(3.0, 0.6 * len(runs) + 1.5) * len(metrics), 3.8),
                                   squeeze=False)
        ax_list = list(ax_arr[0])
    else:
        fig, ax_list = _axes_list(axes, len(metrics))
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, metric in zip(ax_list, metrics):
        scale = 100.0 if percent and metric in ("accuracy", "ece") else 1.0
        stats = [_mean_std(results[r].get(metric), results[r], metric) for r in runs]
        means = np.array([m for m, _ in stats]) * scale
        stds = np.array([s for _, s in stats]) * scale
        present = np.isfinite(means)
        x = np.arange(len(runs))
        ax.bar(x[present], means[present], color=[c for c, p in zip(colors, present) if p], edgecolor="black", lw=0.5)
        has_err = present & np.isfinite(stds)
        if has_err.any():
            ax.errorbar(x[has_err], means[has_err], yerr=stds[has_err], fmt="none", ecolor="black", capsize=3)
        tops = means + np.where(np.isfinite(stds), stds, 0.0)
        for xi, m, top in zip(x[present], means[present], tops[present]):
            ax.annotate(f"{m:.2f}" if scale == 100.0 else f"{m:.3g}", (xi, top), ha="center", va="bottom",
                        fontsize="x-small", xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(x)
        ax.set_xticklabels(runs, rotation=30, ha="right", fontsize="small")
        ax.set_title(f"{metric} (%)" if scale == 100.0 else metric)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------- predictive checks
def plot_ppc_statistics(result, names=None, axes=None, ncols: int = 3):
    """Histogram of each test statistic over the replicates, the observed value as a red line.

    Args:
        result: a :class:`blob_pyro.ppc.PPCResult` (or any object with ``statistics``: ``{name: {"observed",
            "p_value", ...}}`` and ``replicated``: ``{name: (S,) array}``).
        names: statistics to show (default: all, in order).
        axes: optional sequence of Axes, one per statistic.
        ncols: columns of the new grid.

    The title of each panel holds the Bayesian p-value; extreme ones (``"extreme": True``) are red.
    Returns the Figure.
    """
    stats, reps = result.statistics, result.replicated
    names = list(stats) if names is None else list(names)
    if not names:
        raise ValueError("no statistics to plot")
    if axes is None:
        nrows = math.ceil(len(names) / ncols)
        fig, ax_arr = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.6 * nrows), squeeze=False)
        ax_list = list(ax_arr.ravel())
        for ax in ax_list[len(names):]:
            ax.set_visible(False)
    else:
        fig, ax_list = _axes_list(axes, len(names))
    for ax, name in zip(ax_list, names):
        rep = np.asarray(reps[name], dtype=np.float64)
        rep = rep[np.isfinite(rep)]
        obs, p = stats[name]["observed"], stats[name]["p_value"]
        if rep.size:
            ax.hist(rep, bins=min(30, max(5, len(np.unique(rep)))), color="tab:blue", alpha=0.6,
                    edgecolor="white", label="T(y_rep)")
        ax.axvline(obs, color="tab:red", lw=2, label="T(y)")
        bad = stats[name].get("extreme", False)
        ax.set_title(f"{name}\np = {p:.3f}" + ("  (extreme)" if bad else ""), fontsize="small",
                     color="tab:red" if bad else "black")
        ax.tick_params(labelsize="x-small")
    ax_list[0].legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def plot_importance_ratios(log_ratios, khat=None, ax=None):
    """Sorted, normalised importance weights of guide draws (PSIS / k̂ of a variational fit).

    Args:
        log_ratios: ``(S,)`` log p(theta_s, y) - log q(theta_s) (see :func:`blob_pyro.diagnostics.vi_pareto_k`).
        khat: the Pareto k-hat, shown in the title.
        ax: Axes to draw into (new figure when ``None``).

    With a good q all S weights are near 1/S (flat line); a few weights near 1 mean q misses the posterior.
    Returns the Axes.
    """
    lr = _to_numpy(log_ratios).ravel()
    if lr.size == 0 or not np.isfinite(lr).all():
        raise ValueError("log_ratios must be a non-empty array of finite values")
    w = np.exp(lr - lr.max())
    w = np.sort(w / w.sum())[::-1]
    ax = _new_ax(ax, figsize=(5.0, 3.5))
    ax.plot(np.arange(1, w.size + 1), w, "o-", ms=3)
    ax.axhline(1.0 / w.size, color="gray", ls="--", lw=1, label="1/S (q = posterior)")
    ax.set_yscale("log")
    ax.set_ylim(top=2.0)  # weights are <= 1
    ax.set_xlabel("draw (sorted by weight)")
    ax.set_ylabel("normalised importance weight")
    ess = 1.0 / np.sum(w**2)
    title = f"Importance weights of {w.size} guide draws, ESS {ess:.1f}"
    if khat is not None:
        title += f", k̂ = {khat:.2f}"
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small")
    return ax


def save_figure(fig, path) -> Path:
    """Save ``fig`` (a Figure, or an Axes of it) as PNG at dpi 120, creating parent folders; then close it."""
    fig = fig.figure if isinstance(fig, plt.Axes) else fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
