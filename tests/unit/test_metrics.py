"""blob_pyro.metrics: agreement with torchmetrics / torch references (the BLoB protocol) on seeded random predictions."""

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

from blob_pyro.metrics import (
    accuracy,
    aggregate_probs,
    brier_score,
    compute_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)

# (N, K, logit scale): scale 0.3 -> unconfident, 3 -> moderate, 40 -> many float32 confidences of exactly 1.0
CASES = [(n, k, s) for n in (1, 7, 100, 2000) for k in (2, 5) for s in (0.3, 3.0, 40.0)] + [(513, 4, 8.0)]


def _random_case(n, k, scale, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, k, (n,), generator=g)
    # make the labels informative for part of the data, so accuracy is neither ~1/K nor trivial
    agree = torch.rand(n, generator=g) < 0.6
    labels = torch.where(agree, logits.argmax(1), labels)
    return torch.softmax(logits, dim=1).to(dtype), labels


def _tm_ece(probs, labels, n_bins=15):
    return float(multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=n_bins, norm="l1"))


@pytest.mark.parametrize("n,k,scale", CASES)
def test_ece_accuracy_nll_match_references(n, k, scale):
    probs, labels = _random_case(n, k, scale, seed=1000 * n + 10 * k + int(scale))
    assert expected_calibration_error(probs, labels) == pytest.approx(_tm_ece(probs, labels), abs=1e-6)
    tm_acc = multiclass_accuracy(probs, labels, num_classes=k, average="micro", top_k=1)
    assert accuracy(probs, labels) == pytest.approx(float(tm_acc), abs=1e-7)
    ref_nll = torch.nn.functional.nll_loss(probs.log(), labels)
    p_true = probs.gather(1, labels[:, None])
    if bool((p_true > 1e-12).all()):
        assert negative_log_likelihood(probs, labels) == pytest.approx(float(ref_nll), rel=1e-6, abs=1e-9)
    # saturated cases: the gold probability underflows, and NLL is taken with p clamped at eps = 1e-12
    ref_clamped = torch.nn.functional.nll_loss(probs.double().clamp_min(1e-12).log(), labels)
    assert negative_log_likelihood(probs, labels) == pytest.approx(float(ref_clamped), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("n_bins", [1, 3, 10, 15, 20])
def test_ece_matches_torchmetrics_for_other_bin_counts_and_float64(n_bins):
    probs, labels = _random_case(300, 3, 2.0, seed=n_bins, dtype=torch.float64)
    assert expected_calibration_error(probs, labels, n_bins=n_bins) == pytest.approx(
        _tm_ece(probs, labels, n_bins), abs=1e-6
    )


def test_ece_bin_boundaries_match_torchmetrics_exactly():
    # Top-label confidences sitting exactly on (float32) bin edges, at 1.0, and at ties, where the choice of
    # left/right-closed bins and the treatment of 1.0 change the answer.
    edges = torch.linspace(0, 1, 16, dtype=torch.float32)
    rows, labels = [], []
    for i, c in enumerate([*edges[8:].tolist(), 0.6, 0.8, 0.2 + 1e-9, 1.0, 1.0, 0.5]):
        rows.append([c, 1.0 - c])
        labels.append(i % 2)
    probs = torch.tensor(rows, dtype=torch.float32)
    labels = torch.tensor(labels)
    assert expected_calibration_error(probs, labels) == pytest.approx(_tm_ece(probs, labels), abs=1e-7)
    # a case where putting conf == 1.0 into the last regular bin would give 0.475 instead of 0.525
    probs = torch.tensor([[0.95, 0.05], [1.0, 0.0]])
    labels = torch.tensor([0, 1])
    assert _tm_ece(probs, labels) == pytest.approx(0.525, abs=1e-6)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.525, abs=1e-6)


def test_accuracy_breaks_ties_like_torchmetrics():
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.2, 0.8], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 1, 0])
    tm = multiclass_accuracy(probs, labels, num_classes=2, average="micro", top_k=1)
    assert accuracy(probs, labels) == pytest.approx(float(tm))
    assert expected_calibration_error(probs, labels) == pytest.approx(_tm_ece(probs, labels), abs=1e-7)


def test_brier_hand_computed():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    labels = torch.tensor([0, 0, 2])
    # per example: 0; (0.5^2 + 0.5^2) = 0.5; (0.2^2 + 0.3^2 + 0.5^2) = 0.38  -> mean 0.88 / 3
    assert brier_score(probs, labels) == pytest.approx(0.88 / 3, abs=1e-7)


def test_nll_clamps_zero_probability():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    labels = torch.tensor([1, 0])
    assert negative_log_likelihood(probs, labels) == pytest.approx((-math.log(1e-12) + math.log(2)) / 2)
    assert math.isfinite(negative_log_likelihood(probs, labels, eps=1e-6))


def test_compute_metrics_returns_floats():
    probs, labels = _random_case(64, 5, 2.0, seed=3)
    m = compute_metrics(probs, labels)
    assert set(m) == {"accuracy", "ece", "nll", "brier"}
    assert all(type(v) is float for v in m.values())
    assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["ece"] <= 1.0 and 0.0 <= m["brier"] <= 2.0
    assert m["ece"] == expected_calibration_error(probs, labels)


@pytest.mark.parametrize("n,k,scale", [(7, 2, 0.3), (500, 5, 3.0), (500, 2, 40.0), (2000, 5, 40.0)])
def test_reliability_bins_consistent_with_ece(n, k, scale):
    probs, labels = _random_case(n, k, scale, seed=n + k)
    rb = reliability_bins(probs, labels)
    assert rb["edges"].shape == (16,) and rb["edges"][0] == 0.0 and rb["edges"][-1] == 1.0
    for key in ("confidence", "accuracy", "count"):
        assert rb[key].shape == (15,)
    assert rb["count"].dtype.kind == "i"
    assert rb["count"].sum() + rb["count_at_one"] == n == rb["n"]
    empty = rb["count"] == 0
    assert np.isnan(rb["confidence"][empty]).all() and np.isnan(rb["accuracy"][empty]).all()
    full = ~empty
    lo, hi = rb["edges"][:-1][full], rb["edges"][1:][full]
    assert ((rb["confidence"][full] >= lo - 1e-7) & (rb["confidence"][full] < hi + 1e-7)).all()
    ece = float(np.sum(rb["count"][full] / n * np.abs(rb["accuracy"][full] - rb["confidence"][full])))
    if rb["count_at_one"]:
        ece += rb["count_at_one"] / n * abs(rb["accuracy_at_one"] - 1.0)
    else:
        assert math.isnan(rb["accuracy_at_one"])
    assert ece == pytest.approx(expected_calibration_error(probs, labels), abs=1e-9)
    assert rb["ece"] == pytest.approx(_tm_ece(probs, labels), abs=1e-6)
    if scale == 40.0:
        assert rb["count_at_one"] > 0  # the saturated case really exercises the extra bin


def test_aggregate_probs_averages_probabilities_not_logits():
    logits = torch.tensor([[[4.0, 0.0]], [[0.0, 1.0]]])  # S=2 draws, N=1, K=2
    p = aggregate_probs(logits)
    s = torch.sigmoid(torch.tensor(4.0))
    expected = torch.tensor([[(s + (1 - torch.sigmoid(torch.tensor(1.0)))) / 2]])
    assert p.shape == (1, 2)
    assert torch.allclose(p[:, 0], expected[0], atol=1e-6)
    from_mean_logits = torch.softmax(logits.mean(0), dim=-1)
    assert not torch.allclose(p, from_mean_logits, atol=1e-3)  # averaging logits gives 0.818, probs give 0.625
    assert torch.allclose(p.sum(-1), torch.ones(1))


def test_aggregate_probs_shapes_and_half_precision():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 6, 4, generator=g)
    p = aggregate_probs(logits.to(torch.bfloat16))
    assert p.shape == (6, 4) and p.dtype == torch.float32
    assert torch.allclose(p.sum(-1), torch.ones(6), atol=1e-6)
    assert torch.allclose(aggregate_probs(logits[:1]), torch.softmax(logits[0], -1))


@pytest.mark.parametrize(
    "probs,labels,match",
    [
        (torch.full((3,), 1 / 3), torch.tensor([0, 1, 2]), "shape"),
        (torch.full((3, 2), 0.5), torch.tensor([0, 1]), "labels must have shape"),
        (torch.full((3, 2), 0.5), torch.tensor([[0], [1], [1]]), "labels must have shape"),
        (torch.full((3, 2), 0.5), torch.tensor([0, 2, 1]), r"\[0, 1\]"),
        (torch.full((3, 2), 0.5), torch.tensor([0, -1, 1]), r"\[0, 1\]"),
        (torch.full((3, 2), 0.5), torch.tensor([0.0, 1.0, 1.0]), "integer"),
        (torch.tensor([[2.0, -1.0], [0.5, 0.5]]), torch.tensor([0, 1]), "logits"),
        (torch.tensor([[0.7, 0.7], [0.5, 0.5]]), torch.tensor([0, 1]), "sum to 1"),
        (torch.tensor([[float("nan"), 0.5]]), torch.tensor([0]), "NaN"),
        (torch.ones(3, 1), torch.tensor([0, 0, 0]), "K >= 2"),
        (torch.empty(0, 2), torch.empty(0, dtype=torch.long), "empty"),
        (torch.tensor([[1, 0]]), torch.tensor([0]), "floating"),
    ],
)
def test_invalid_inputs_raise_one_line_value_error(probs, labels, match):
    for fn in (accuracy, expected_calibration_error, negative_log_likelihood, brier_score, compute_metrics,
               reliability_bins):
        with pytest.raises(ValueError, match=match) as info:
            fn(probs, labels)
        assert "\n" not in str(info.value)


def test_invalid_bins_and_logit_shapes_raise():
    probs, labels = _random_case(5, 2, 1.0, seed=0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n_bins"):
            expected_calibration_error(probs, labels, n_bins=bad)
        with pytest.raises(ValueError, match="n_bins"):
            reliability_bins(probs, labels, n_bins=bad)
    with pytest.raises(ValueError, match=r"\(S, N, K\)"):
        aggregate_probs(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="S == 0"):
        aggregate_probs(torch.zeros(0, 4, 2))
    with pytest.raises(ValueError, match="floating"):
        aggregate_probs(torch.zeros(2, 4, 2, dtype=torch.long))
