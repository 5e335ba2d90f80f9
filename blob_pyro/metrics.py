"""Classification metrics for BLoB evaluation: accuracy, ECE, NLL, Brier score, reliability bins.

All metrics take **probabilities** ``probs`` of shape ``(N, K)`` (rows sum to 1) and integer ``labels`` of
shape ``(N,)``, and return plain Python floats as *fractions* (the BLoB paper prints ACC and ECE x100).
For a Bayesian model, first turn the logits of the S posterior draws into one predictive distribution with
:func:`aggregate_probs` (softmax per draw, then average the probabilities, as BLoB does), then score it.

The ECE reproduces ``torchmetrics.functional.classification.multiclass_calibration_error(probs, labels,
num_classes=K, n_bins=15, norm="l1")`` exactly, including its binning: top-label confidences are cast to
float32 and bucketed against ``torch.linspace(0, 1, n_bins + 1)`` (float32) into half-open bins
``[e_i, e_{i+1})``; a confidence of exactly 1.0 lands in an extra, degenerate bin ``{1.0}`` of its own
(reported by :func:`reliability_bins` as ``count_at_one`` / ``accuracy_at_one``).

Example::

    >>> import torch
    >>> from blob_pyro.metrics import aggregate_probs, compute_metrics
    >>> logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]],      # draw 1: (N=2, K=2)
    ...                        [[0.0, 1.0], [0.0, 3.0]]])     # draw 2
    >>> probs = aggregate_probs(logits)                      # (2, 2), rows sum to 1
    >>> m = compute_metrics(probs, torch.tensor([1, 1]))
    >>> sorted(m)
    ['accuracy', 'brier', 'ece', 'nll']
    >>> round(m["accuracy"], 3)
    0.5
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "expected_calibration_error",
    "negative_log_likelihood",
    "brier_score",
    "compute_metrics",
    "reliability_bins",
    "aggregate_probs",
]


def _check_inputs(probs, labels) -> tuple[Tensor, Tensor]:
    """Validate ``probs`` (N, K) / ``labels`` (N,) and return them as tensors on the same device."""
    probs = torch.as_tensor(probs)
    labels = torch.as_tensor(labels)
    if not probs.is_floating_point():
        raise ValueError(f"probs must be a floating tensor of probabilities, got dtype {probs.dtype}")
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (N, K), got shape {tuple(probs.shape)}")
    n, k = probs.shape
    if n == 0:
        raise ValueError("probs is empty: need at least one example (N >= 1)")
    if k < 2:
        raise ValueError(f"probs must have at least 2 classes (K >= 2), got K={k}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(
            f"labels must have shape ({n},) to match probs {tuple(probs.shape)}, got {tuple(labels.shape)}"
        )
    labels = labels.to(device=probs.device, dtype=torch.long)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= k:
        raise ValueError(f"labels must lie in [0, {k - 1}] for K={k} classes, got values in [{lo}, {hi}]")
    p = probs.detach().double()
    if not bool(torch.isfinite(p).all()):
        raise ValueError("probs contains NaN or infinite values")
    tol = 1e-3 if probs.dtype in (torch.float32, torch.float64) else 5e-2
    if bool((p < -tol).any()) or bool((p > 1 + tol).any()):
        raise ValueError(
            f"probs must lie in [0, 1] (got range [{float(p.min()):.4g}, {float(p.max()):.4g}]); "
            "pass probabilities, not logits (see aggregate_probs)"
        )
    worst = float((p.sum(dim=1) - 1).abs().max())
    if worst > tol:
        raise ValueError(f"each row of probs must sum to 1, but a row is off by {worst:.3g}; pass probabilities")
    return probs, labels


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def _top_label(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence (float32, as torchmetrics) and correctness (float64) of each example."""
    conf, pred = probs.detach().max(dim=1)
    return conf.float(), pred.eq(labels).double()


def _bin_statistics(conf: Tensor, correct: Tensor, n_bins: int):
    """Per-bin count, summed confidence and summed correctness over the n_bins + 1 torchmetrics bins.

    Bins ``0..n_bins-1`` are ``[e_i, e_{i+1})`` with float32 edges; bin ``n_bins`` holds confidences == 1.0.
    """
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32, device=conf.device)
    idx = torch.bucketize(conf, edges, right=True) - 1
    idx = idx.clamp_(0, n_bins)  # conf >= 0 always; the clamp only guards round-off below 0
    count = torch.zeros(n_bins + 1, dtype=torch.float64, device=conf.device)
    count.index_add_(0, idx, torch.ones_like(correct))
    conf_sum = torch.zeros_like(count).index_add_(0, idx, conf.double())
    acc_sum = torch.zeros_like(count).index_add_(0, idx, correct)
    return edges, count, conf_sum, acc_sum


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy (fraction) of the predictive probabilities: mean of ``argmax(probs) == labels``."""
    probs, labels = _check_inputs(probs, labels)
    return float(probs.detach().argmax(dim=1).eq(labels).double().mean())


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Top-label, L1, equal-width-bin ECE; identical to torchmetrics ``multiclass_calibration_error(norm="l1")``.

    ``ECE = sum_b (n_b / N) * |acc_b - conf_b|`` over the bins described in the module docstring.
    """
    probs, labels = _check_inputs(probs, labels)
    n_bins = _check_n_bins(n_bins)
    conf, correct = _top_label(probs, labels)
    _, count, conf_sum, acc_sum = _bin_statistics(conf, correct, n_bins)
    # |acc_sum - conf_sum| / N == (count / N) * |acc_mean - conf_mean|; empty bins contribute 0.
    return float((acc_sum - conf_sum).abs().sum() / conf.numel())


def negative_log_likelihood(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> float:
    """Mean over examples of ``-log p[label]``, with ``p`` clamped below at ``eps``.

    ``probs`` must already be the posterior-averaged predictive (see :func:`aggregate_probs`). BLoB averages the
    per-batch means over equal-size batches, which equals this overall mean.
    """
    probs, labels = _check_inputs(probs, labels)
    p_true = probs.detach().double().gather(1, labels[:, None]).squeeze(1)
    return float(-p_true.clamp_min(eps).log().mean())


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Mean over examples of ``sum_k (p_k - onehot(label)_k)^2`` (range [0, 2])."""
    probs, labels = _check_inputs(probs, labels)
    p = probs.detach().double()
    onehot = torch.nn.functional.one_hot(labels, num_classes=p.shape[1]).double()
    return float((p - onehot).pow(2).sum(dim=1).mean())


def compute_metrics(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict:
    """All headline metrics as Python floats (fractions): ``{"accuracy", "ece", "nll", "brier"}``."""
    probs, labels = _check_inputs(probs, labels)
    return {
        "accuracy": accuracy(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins=n_bins),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
    }


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict:
    """Per-bin statistics behind the ECE, as numpy arrays (for reliability diagrams).

    Returns a dict with:

    - ``"edges"``: float64 array (n_bins + 1,), the float32 ``linspace(0, 1, n_bins + 1)`` used for binning;
    - ``"confidence"``, ``"accuracy"``: float64 arrays (n_bins,), mean top-label confidence / accuracy of the
      examples in ``[edges[i], edges[i+1])``; ``nan`` for an empty bin;
    - ``"count"``: int64 array (n_bins,), number of examples per bin;
    - ``"count_at_one"`` (int), ``"accuracy_at_one"`` (float, ``nan`` if none): the examples whose float32
      confidence is exactly 1.0, which torchmetrics keeps in a bin of their own (confidence 1.0);
    - ``"n"`` (int, N) and ``"ece"`` (float, equal to :func:`expected_calibration_error`).

    Consistency: ``ece == sum(count / n * |accuracy - confidence|)`` over non-empty bins
    ``+ count_at_one / n * |accuracy_at_one - 1|``; the second term is absent when no confidence is exactly 1.
    """
    probs, labels = _check_inputs(probs, labels)
    n_bins = _check_n_bins(n_bins)
    conf, correct = _top_label(probs, labels)
    edges, count, conf_sum, acc_sum = _bin_statistics(conf, correct, n_bins)
    count_np = count.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        conf_mean = np.where(count_np > 0, conf_sum.cpu().numpy() / count_np, np.nan)
        acc_mean = np.where(count_np > 0, acc_sum.cpu().numpy() / count_np, np.nan)
    n = int(conf.numel())
    return {
        "edges": edges.double().cpu().numpy(),
        "confidence": conf_mean[:n_bins],
        "accuracy": acc_mean[:n_bins],
        "count": count_np[:n_bins].astype(np.int64),
        "count_at_one": int(count_np[n_bins]),
        "accuracy_at_one": float(acc_mean[n_bins]),
        "n": n,
        "ece": float((acc_sum - conf_sum).abs().sum() / n),
    }


def aggregate_probs(logits_draws: Tensor) -> Tensor:
    """Posterior predictive from S draws: ``(S, N, K)`` logits -> ``(N, K)`` probabilities.

    Applies a softmax to each draw, **then** averages the probabilities over draws (BLoB's rule; averaging the
    logits instead would give an over-confident predictive). Half-precision logits are upcast to float32.
    """
    logits_draws = torch.as_tensor(logits_draws)
    if not logits_draws.is_floating_point():
        raise ValueError(f"logits_draws must be a floating tensor, got dtype {logits_draws.dtype}")
    if logits_draws.dim() != 3:
        raise ValueError(
            f"logits_draws must have shape (S, N, K) (draws, examples, classes), got {tuple(logits_draws.shape)}; "
            "for a single draw use logits.unsqueeze(0)"
        )
    if logits_draws.shape[0] == 0:
        raise ValueError("logits_draws has no posterior draws (S == 0)")
    if logits_draws.shape[-1] < 2:
        raise ValueError(f"logits_draws must have at least 2 classes (K >= 2), got K={logits_draws.shape[-1]}")
    if logits_draws.dtype not in (torch.float32, torch.float64):
        logits_draws = logits_draws.float()
    return torch.softmax(logits_draws, dim=-1).mean(dim=0)
