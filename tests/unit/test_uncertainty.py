"""blob_pyro.uncertainty: the entropy split, OOD AUROC and selective prediction against hand computations and
torchmetrics' binary_auroc (torch-uncertainty is not installed: its AURC is replaced by hand-computed cases)."""

import math

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from blob_pyro.metrics import accuracy
from blob_pyro.uncertainty import (
    OOD_SCORES,
    UNCERTAINTY_METRICS,
    aurc,
    auroc,
    expected_entropy,
    mutual_information,
    ood_auroc,
    predictive_entropy,
    risk_coverage_curve,
    selective_accuracy,
    uncertainty_metrics,
)

LN2 = math.log(2)


def _random_draws(s, n, k, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(s, n, k, generator=g) * scale, dim=-1)


# ---- the entropy split ----------------------------------------------------------------------------------------
def test_entropies_of_hand_cases():
    # example 0: two draws that disagree completely; 1: two identical coin flips; 2: a coin flip and a certainty
    draws = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]],
                          [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]], dtype=torch.float64)
    h_mix = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(predictive_entropy(draws), torch.tensor([LN2, LN2, h_mix], dtype=torch.float64))
    torch.testing.assert_close(expected_entropy(draws), torch.tensor([0.0, LN2, LN2 / 2], dtype=torch.float64))
    torch.testing.assert_close(mutual_information(draws), torch.tensor([LN2, 0.0, h_mix - LN2 / 2],
                                                                       dtype=torch.float64))


def test_mutual_information_is_predictive_minus_expected_entropy_and_non_negative():
    draws = _random_draws(7, 50, 4, seed=1)
    mi = mutual_information(draws)
    torch.testing.assert_close(mi, predictive_entropy(draws) - expected_entropy(draws), atol=1e-12, rtol=0)
    assert bool((mi >= 0).all()) and float(mi.max()) > 0


def test_one_draw_has_no_mutual_information():
    draws = _random_draws(1, 30, 5, seed=2)
    assert torch.equal(mutual_information(draws), torch.zeros(30, dtype=torch.float64))
    assert torch.equal(mutual_information(draws[0]), torch.zeros(30, dtype=torch.float64))  # (N, K): a point estimate
    torch.testing.assert_close(predictive_entropy(draws[0]), expected_entropy(draws))
    m = uncertainty_metrics(draws[0], torch.zeros(30, dtype=torch.long))
    assert m["mutual_information"] == 0.0 and m["entropy"] == pytest.approx(m["expected_entropy"], abs=1e-12)


def test_identical_draws_have_no_mutual_information():
    one = _random_draws(1, 20, 3, seed=3)
    assert float(mutual_information(one.expand(6, -1, -1)).max()) < 1e-12


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="not logits"):
        predictive_entropy(torch.randn(3, 4, 2) * 5)
    with pytest.raises(ValueError, match=r"\(S, N, K\)"):
        mutual_information(torch.ones(4) / 4)
    with pytest.raises(ValueError, match="floating"):
        expected_entropy(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="both sides"):
        auroc(torch.tensor([0.1]), torch.tensor([]))
    with pytest.raises(ValueError, match="coverage"):
        selective_accuracy(torch.tensor([[0.6, 0.4]]), torch.tensor([0]), coverage=0)


# ---- AUROC ----------------------------------------------------------------------------------------------------
def _tm_auroc(scores_in, scores_out):
    scores = torch.cat([scores_in, scores_out]).double()
    target = torch.cat([torch.zeros(len(scores_in)), torch.ones(len(scores_out))]).long()
    return float(binary_auroc(scores, target))


@pytest.mark.parametrize("n_in,n_out,levels,seed", [(1, 1, 0, 0), (5, 9, 0, 1), (200, 150, 0, 2),
                                                    (40, 60, 3, 3), (300, 300, 10, 4), (7, 3, 1, 5)])
def test_auroc_matches_torchmetrics_with_and_without_ties(n_in, n_out, levels, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(n_in, generator=g), torch.rand(n_out, generator=g) + 0.3
    if levels:  # round to a few values: many ties within and across the two sets
        a, b = (a * levels).round() / levels, (b * levels).round() / levels
    assert auroc(a, b) == pytest.approx(_tm_auroc(a, b), abs=1e-6)


def test_auroc_hand_cases():
    assert auroc(torch.tensor([0.1, 0.4]), torch.tensor([0.4, 0.9])) == pytest.approx(3.5 / 4)  # one tied pair
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.9])) == 1.0  # a perfect detector
    assert auroc(torch.tensor([0.3, 0.9]), torch.tensor([0.1, 0.2])) == 0.0  # perfectly backwards
    assert auroc(torch.full((4,), 0.7), torch.full((3,), 0.7)) == 0.5  # all tied: chance


def test_ood_auroc_of_a_perfectly_separating_model():
    # in-distribution: confident draws that agree; shifted: uncertain draws that disagree, with other K
    probs_in = torch.tensor([[[0.95, 0.05, 0.0, 0.0]] * 3, [[0.9, 0.1, 0.0, 0.0]] * 3])
    probs_out = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.1, 0.9], [0.6, 0.4]]])
    assert ood_auroc(probs_in, probs_out) == {"max_prob": 1.0, "entropy": 1.0, "mutual_information": 1.0}
    assert tuple(ood_auroc(probs_in, probs_out)) == OOD_SCORES


def test_ood_auroc_of_point_estimates_gives_mutual_information_chance():
    got = ood_auroc(_random_draws(1, 20, 4, seed=6, scale=5), _random_draws(1, 25, 4, seed=7, scale=0.5))
    assert got["mutual_information"] == 0.5 and got["max_prob"] > 0.8 and got["entropy"] > 0.8


def test_ood_auroc_scores_match_torchmetrics():
    probs_in, probs_out = _random_draws(5, 60, 4, seed=8, scale=3), _random_draws(5, 40, 2, seed=9, scale=1)
    got = ood_auroc(probs_in, probs_out)
    for name, score in (("max_prob", lambda p: 1 - p.mean(0).max(-1).values),
                        ("entropy", predictive_entropy), ("mutual_information", mutual_information)):
        assert got[name] == pytest.approx(_tm_auroc(score(probs_in), score(probs_out)), abs=1e-6)


# ---- selective prediction -------------------------------------------------------------------------------------
# confidences 0.9 (right), 0.8 (right), 0.8 (wrong), 0.6 (wrong): the two 0.8s are tied
TIED_PROBS = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.6, 0.4]])
TIED_LABELS = torch.tensor([0, 0, 0, 1])


def test_risk_coverage_curve_spreads_the_errors_of_tied_confidences():
    coverage, risk = risk_coverage_curve(TIED_PROBS, TIED_LABELS)
    torch.testing.assert_close(coverage, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    # cumulative errors 0, 0.5 (half of the tie's one error), 1, 2 over 1..4 answered
    torch.testing.assert_close(risk, torch.tensor([0.0, 0.25, 1 / 3, 0.5], dtype=torch.float64))
    assert float(risk[-1]) == 1 - accuracy(TIED_PROBS, TIED_LABELS)


def test_aurc_by_hand_with_ties_is_the_mean_over_the_tie_orders():
    assert aurc(TIED_PROBS, TIED_LABELS) == pytest.approx((0 + 0.25 + 1 / 3 + 0.5) / 4)
    right_first = aurc(TIED_PROBS, TIED_LABELS, confidence=torch.tensor([0.9, 0.81, 0.8, 0.6]))
    wrong_first = aurc(TIED_PROBS, TIED_LABELS, confidence=torch.tensor([0.9, 0.8, 0.81, 0.6]))
    assert right_first == pytest.approx((0 + 0 + 1 / 3 + 0.5) / 4)
    assert wrong_first == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    assert aurc(TIED_PROBS, TIED_LABELS) == pytest.approx((right_first + wrong_first) / 2)


def test_aurc_does_not_depend_on_the_order_of_the_examples():
    g = torch.Generator().manual_seed(10)
    probs = torch.softmax(torch.randint(0, 3, (40, 3), generator=g).double(), -1)  # many tied confidences
    labels = torch.randint(0, 3, (40,), generator=g)
    perm = torch.randperm(40, generator=g)
    assert aurc(probs, labels) == pytest.approx(aurc(probs[perm], labels[perm]), abs=1e-12)
    assert selective_accuracy(probs, labels) == pytest.approx(selective_accuracy(probs[perm], labels[perm]), abs=1e-12)


def test_aurc_of_a_perfect_and_of_a_backwards_ranking():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    right_first = torch.tensor([0, 0, 1, 1])  # errors at the two least confident
    assert aurc(probs, right_first) == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4)
    wrong_first = torch.tensor([1, 1, 0, 0])
    assert aurc(probs, wrong_first) == pytest.approx((1 + 1 + 2 / 3 + 2 / 4) / 4)


def test_selective_accuracy_by_hand():
    assert selective_accuracy(TIED_PROBS, TIED_LABELS, coverage=0.25) == 1.0
    assert selective_accuracy(TIED_PROBS, TIED_LABELS, coverage=0.5) == pytest.approx(0.75)  # half the tie is right
    assert selective_accuracy(TIED_PROBS, TIED_LABELS, coverage=0.75) == pytest.approx(2 / 3)
    assert selective_accuracy(TIED_PROBS, TIED_LABELS, coverage=1.0) == accuracy(TIED_PROBS, TIED_LABELS)
    # ten examples, no ties, the 2 least confident wrong: the 8 answered at 80 % coverage are all right
    conf = torch.linspace(0.95, 0.55, 10)
    probs = torch.stack([conf, 1 - conf], -1)
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert selective_accuracy(probs, labels, 0.8) == 1.0 and selective_accuracy(probs, labels, 0.9) == 8 / 9


def test_uncertainty_metrics_of_draws():
    draws = _random_draws(4, 30, 3, seed=11)
    labels = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(12))
    m = uncertainty_metrics(draws, labels)
    assert tuple(m) == UNCERTAINTY_METRICS
    mean = draws.double().mean(0)
    assert m["entropy"] == pytest.approx(float(predictive_entropy(draws).mean()))
    assert m["expected_entropy"] == pytest.approx(float(expected_entropy(draws).mean()))
    assert m["mutual_information"] == pytest.approx(m["entropy"] - m["expected_entropy"])
    assert m["aurc"] == pytest.approx(aurc(mean, labels)) and m["accuracy_at_80"] == selective_accuracy(mean, labels)
    assert m["confidence"] == pytest.approx(float(mean.max(-1).values.mean()))  # of the average, not of each draw
