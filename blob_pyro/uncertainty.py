"""Uncertainty beyond calibration: the entropy split, OOD detection and selective prediction.

::

    out = predict(model, guide, dev, num_samples=10, keep_draws=True)      # out.logits (S, N, K)
    draws = torch.softmax(out.logits, dim=-1)                              # per-draw probabilities
    mutual_information(draws).mean()                                       # epistemic part, (N,) -> scalar
    uncertainty_metrics(draws, out.labels)       # entropy, expected_entropy, mutual_information, aurc, accuracy_at_80
    ood_auroc(draws, torch.softmax(shifted.logits, -1))    # {"max_prob", "entropy", "mutual_information"}

:mod:`blob_pyro.metrics` scores one predictive distribution ``(N, K)`` against the labels (is the confidence
right on average?). This module asks what calibration does not: how the predictive's uncertainty splits
into what more data would remove and what it would not (which needs the S posterior draws, not only their
average), and whether it *ranks* examples well: shifted inputs above in-distribution ones (OOD detection) and
wrong answers above right ones (selective prediction).

Per-draw probabilities ``probs`` have shape ``(S, N, K)`` (S posterior draws, N examples, K classes); a
``(N, K)`` tensor is one draw (a point estimate). Entropies are in nats (natural log, ``0 log 0 = 0``):

- predictive entropy ``H[p̄]`` with ``p̄ = mean_s p_s``: the total uncertainty of the averaged predictive;
- expected entropy ``mean_s H[p_s]``: the aleatoric part (what each posterior draw is unsure of);
- mutual information ``MI = H[p̄] − mean_s H[p_s]`` (the BALD score, ``I[y; θ]``): the epistemic part, how
  much the draws disagree. ``MI >= 0`` by Jensen's inequality and is exactly 0 for one draw, so MLE, MAP and
  BLoB's posterior mean (N = 0) have none: that is the point of the split.

OOD detection: an AUROC of "shifted vs in-distribution" for a score where higher means "more likely shifted":
``1 − max p̄`` (``"max_prob"``), ``H[p̄]`` (``"entropy"``) and MI (``"mutual_information"``). 0.5 is chance,
1 a perfect separation; ties count one half (the Mann–Whitney statistic, equal to torchmetrics'
``binary_auroc``).

Selective prediction: answer only the examples whose confidence ``max p̄`` is highest. At coverage ``i/N`` (the
``i`` most confident answered) the risk is the error rate among them; AURC is the mean of the risk over
``i = 1..N`` (Geifman & El-Yaniv's empirical AURC; lower is better). Tied confidences have no order, so within
a tie group the errors are spread evenly: the curve is the expected one over random orders of the ties, which
makes it independent of how the examples happen to be sorted.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .metrics import _check_inputs

__all__ = [
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "auroc",
    "ood_auroc",
    "risk_coverage_curve",
    "aurc",
    "selective_accuracy",
    "uncertainty_metrics",
    "UNCERTAINTY_METRICS",
    "OOD_SCORES",
]

#: the keys :func:`uncertainty_metrics` returns, in the order reports print them
UNCERTAINTY_METRICS = (
    "confidence", "entropy", "expected_entropy", "mutual_information", "aurc", "accuracy_at_80")
#: the scores :func:`ood_auroc` ranks by
OOD_SCORES = ("max_prob", "entropy", "mutual_information")


def _draws(probs) -> Tensor:
    """``probs`` as a float64 ``(S, N, K)`` tensor of per-draw probabilities (a ``(N, K)`` one is S = 1)."""
    p = torch.as_tensor(probs)
    if not p.is_floating_point():
        raise ValueError(f"probs must be a floating tensor of probabilities, got dtype {p.dtype}")
    if p.dim() == 2:
        p = p.unsqueeze(0)
    if p.dim() != 3:
        raise ValueError(f"probs must have shape (S, N, K) (draws, examples, classes) or (N, K); "
                         f"got {tuple(p.shape)}")
    s, n, k = p.shape
    if s == 0 or n == 0:
        raise ValueError(f"probs needs at least one draw and one example; got shape {tuple(p.shape)}")
    if k < 2:
        raise ValueError(f"probs must have at least 2 classes (K >= 2), got K={k}")
    p = p.detach().to(torch.float64)
    if not bool(torch.isfinite(p).all()):
        raise ValueError("probs contains NaN or infinite values")
    if bool((p < -1e-3).any()) or bool((p > 1 + 1e-3).any()) or float((p.sum(-1) - 1).abs().max()) > 1e-3:
        raise ValueError("probs must be probabilities in [0, 1] whose last axis sums to 1; pass "
                         "torch.softmax(logits, dim=-1), not logits")
    return p.clamp(0, 1)


def _entropy(p: Tensor) -> Tensor:
    """``-sum_k p_k log p_k`` over the last axis, with ``0 log 0 = 0``."""
    return -torch.special.xlogy(p, p).sum(-1)


def predictive_entropy(probs) -> Tensor:
    """``H[mean_s p_s]`` per example: ``(S, N, K)`` or ``(N, K)`` probabilities -> ``(N,)`` float64, in nats."""
    return _entropy(_draws(probs).mean(0))


def expected_entropy(probs) -> Tensor:
    """``mean_s H[p_s]`` per example (the aleatoric part): ``(S, N, K)`` -> ``(N,)`` float64, in nats."""
    return _entropy(_draws(probs)).mean(0)


def mutual_information(probs) -> Tensor:
    """``H[mean_s p_s] − mean_s H[p_s]`` per example (the epistemic part): ``(S, N, K)`` -> ``(N,)`` float64.

    Non-negative (round-off below 0 is clamped) and exactly 0 for a single draw.
    """
    p = _draws(probs)
    if p.shape[0] == 1:
        return torch.zeros(p.shape[1], dtype=torch.float64)
    return (_entropy(p.mean(0)) - _entropy(p).mean(0)).clamp_min(0)


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve of telling ``scores_out`` (positives) from ``scores_in`` (negatives).

    ``AUROC = P(s_out > s_in) + ½ P(s_out = s_in)`` over all pairs, i.e. the Mann–Whitney U statistic over
    ``n_in · n_out``, computed from average ranks: the same number as torchmetrics'
    ``binary_auroc(cat(scores), cat(zeros(n_in), ones(n_out)))``. 1-D inputs, each non-empty.
    """
    a = np.asarray(torch.as_tensor(scores_in).detach().cpu().double().reshape(-1))
    b = np.asarray(torch.as_tensor(scores_out).detach().cpu().double().reshape(-1))
    if a.size == 0 or b.size == 0:
        raise ValueError(f"auroc needs scores on both sides; got {a.size} in-distribution and {b.size} shifted")
    both = np.concatenate([a, b])
    if not np.isfinite(both).all():
        raise ValueError("auroc scores contain NaN or infinite values")
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2.0)[inverse]  # average rank of each tie group, 1-based
    u = ranks[a.size:].sum() - b.size * (b.size + 1) / 2.0
    return float(u / (a.size * b.size))


def _scores(probs) -> dict[str, Tensor]:
    p = _draws(probs)
    mean = p.mean(0)
    h = _entropy(mean)
    mi = (h - _entropy(p).mean(0)).clamp_min(0) if p.shape[0] > 1 else torch.zeros_like(h)
    return {"max_prob": 1 - mean.max(-1).values, "entropy": h, "mutual_information": mi}


def ood_auroc(probs_in, probs_out) -> dict[str, float]:
    """OOD-detection AUROC of each score, shifted examples being the positives.

    Args:
        probs_in: ``(S, N_in, K_in)`` per-draw probabilities on the in-distribution split (``(N, K)``: one draw).
        probs_out: ``(S', N_out, K_out)`` on the shifted split; the class counts may differ (ARC has 4 options,
            OBQA 4, BoolQ 2): every score is a number per example.

    Returns ``{"max_prob", "entropy", "mutual_information"}`` (:data:`OOD_SCORES`): the :func:`auroc` of
    ``1 − max p̄``, ``H[p̄]`` and MI. With one draw on both sides MI is 0 everywhere and its AUROC is 0.5.
    """
    s_in, s_out = _scores(probs_in), _scores(probs_out)
    return {name: auroc(s_in[name], s_out[name]) for name in OOD_SCORES}


def _sorted_errors(probs, labels, confidence) -> tuple[Tensor, Tensor]:
    """(confidence sorted descending, expected cumulative errors at 1..N with ties spread evenly), float64."""
    probs, labels = _check_inputs(probs, labels)
    p = probs.detach().double()
    conf = p.max(-1).values if confidence is None else torch.as_tensor(confidence).detach().double().reshape(-1)
    if conf.shape[0] != p.shape[0]:
        raise ValueError(f"confidence must have shape ({p.shape[0]},); got {tuple(conf.shape)}")
    if not bool(torch.isfinite(conf).all()):
        raise ValueError("confidence contains NaN or infinite values")
    errors = p.argmax(-1).ne(labels).double().cpu()
    conf = conf.cpu()
    order = torch.argsort(conf, descending=True, stable=True)
    conf, errors = conf[order], errors[order]
    _, group, size = torch.unique_consecutive(conf, return_inverse=True, return_counts=True)
    group_errors = torch.zeros(size.shape[0], dtype=torch.float64).index_add_(0, group, errors)
    before = torch.cumsum(group_errors, 0) - group_errors  # errors in the more confident groups
    start = torch.cumsum(size, 0) - size
    within = torch.arange(conf.shape[0]) - start[group] + 1  # 1-based position inside the tie group
    cum_errors = before[group] + within * group_errors[group] / size[group]
    return conf, cum_errors


def risk_coverage_curve(probs, labels, confidence=None) -> tuple[Tensor, Tensor]:
    """The risk–coverage curve of answering the most confident examples first.

    Args:
        probs: ``(N, K)`` predictive probabilities (the draws' average); the prediction is ``argmax``.
        labels: ``(N,)`` class indices.
        confidence: ``(N,)`` ranking score, higher = answered first (default ``max p̄``, softmax response).

    Returns ``(coverage, risk)``, float64 ``(N,)``: ``coverage[i] = (i+1)/N`` and ``risk[i]`` the (expected,
    ties spread evenly) error rate among the ``i+1`` most confident examples; ``risk[-1] = 1 − accuracy``.
    """
    _, cum_errors = _sorted_errors(probs, labels, confidence)
    answered = torch.arange(1, cum_errors.shape[0] + 1, dtype=torch.float64)
    return answered / answered.shape[0], cum_errors / answered


def aurc(probs, labels, confidence=None) -> float:
    """Area under the risk–coverage curve, ``AURC = (1/N) sum_{i=1..N} risk(i/N)`` (lower is better).

    Its floor is the AURC of a ranking that puts every right answer first; a random ranking gives about
    ``1 − accuracy``. (torch-uncertainty integrates the same points with the trapezoid rule over
    ``[1/N, 1]``; the two agree as N grows.)
    """
    _, risk = risk_coverage_curve(probs, labels, confidence)
    return float(risk.mean())


def selective_accuracy(probs, labels, coverage: float = 0.8, confidence=None) -> float:
    """Accuracy on the ``m = ceil(coverage · N)`` most confident examples (ties at the cut: their mean accuracy).

    ``coverage=1`` is the plain accuracy; 0.8 gives ``accuracy_at_80``.
    """
    if isinstance(coverage, bool) or not 0 < float(coverage) <= 1:
        raise ValueError(f"coverage must be in (0, 1]; got {coverage!r}")
    _, cum_errors = _sorted_errors(probs, labels, confidence)
    n = cum_errors.shape[0]
    m = max(1, min(n, math.ceil(float(coverage) * n - 1e-9)))
    return float(1 - cum_errors[m - 1] / m)


def uncertainty_metrics(probs, labels) -> dict[str, float]:
    """The in-distribution uncertainty metrics of per-draw probabilities, as Python floats.

    ``probs``: ``(S, N, K)`` per-draw probabilities (``(N, K)``: one draw); ``labels``: ``(N,)``. Returns
    (:data:`UNCERTAINTY_METRICS`) the means over examples of ``confidence`` (the top-label probability of the
    averaged predictive p̄: above the accuracy means over-confident), ``entropy`` (predictive), ``expected_entropy``
    and ``mutual_information`` (nats), and ``aurc`` and ``accuracy_at_80`` of the averaged predictive ``p̄``.
    """
    p = _draws(probs)
    mean = p.mean(0)
    h = _entropy(mean)
    eh = _entropy(p).mean(0)
    mi = (h - eh).clamp_min(0) if p.shape[0] > 1 else torch.zeros_like(h)
    return {"confidence": float(mean.max(-1).values.mean()), "entropy": float(h.mean()),
            "expected_entropy": float(eh.mean()), "mutual_information": float(mi.mean()),
            "aurc": aurc(mean, labels), "accuracy_at_80": selective_accuracy(mean, labels, 0.8)}
