"""blob_pyro.ppc, the statistics: p-values on right and wrong toy predictives, mid-p ties, agreement with metrics.

(``run_ppc``, ``scripts/ppc.py`` and ``blob-pyro ppc`` on a trained run: tests/integration/test_ppc.py.)"""

import numpy as np
import pytest
import torch

from blob_pyro.metrics import accuracy, expected_calibration_error
from blob_pyro.ppc import check_predictive, format_table


def _toy(n=400, k=3, s=200, seed=0):
    """True class probabilities p_i and labels y_i ~ p_i."""
    g = torch.Generator().manual_seed(seed)
    true_logits = 2.0 * torch.randn(n, k, generator=g)
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g).squeeze(1)
    return true_logits, labels, g


def _replicate(logits, g):
    s, n, k = logits.shape
    probs = torch.softmax(logits, -1).reshape(-1, k)
    return torch.multinomial(probs, 1, generator=g).reshape(s, n)


def _draws(base, s, g, jitter=0.1):
    return base[None] + jitter * torch.randn(s, *base.shape, generator=g)


def test_right_model_gives_no_extreme_p_values():
    true_logits, labels, g = _toy()
    logits = _draws(true_logits, 200, g)
    res = check_predictive(logits, labels, _replicate(logits, g))
    assert not any(st["extreme"] for st in res.statistics.values()), format_table(res)
    # over many data sets drawn from the model, p-values spread over (0, 1) instead of piling up at 0 or 1
    p_acc, p_ece = [], []
    for seed in range(1, 21):
        true_logits, labels, g = _toy(n=200, seed=seed)
        logits = _draws(true_logits, 100, g)
        st = check_predictive(logits, labels, _replicate(logits, g)).statistics
        p_acc.append(st["accuracy"]["p_value"])
        p_ece.append(st["ece"]["p_value"])
    for ps in (np.array(p_acc), np.array(p_ece)):
        assert 0.3 < ps.mean() < 0.7 and np.mean((ps < 0.025) | (ps > 0.975)) <= 0.2, ps


def test_wrong_models_give_extreme_p_values():
    true_logits, labels, g = _toy()
    over = _draws(4.0 * true_logits, 200, g)  # far too confident
    res = check_predictive(over, labels, _replicate(over, g))
    st = res.statistics
    assert st["confidence_gap"]["p_value"] < 0.025 and st["confidence_gap"]["observed"] > 0.05
    assert st["ece"]["p_value"] < 0.025 and st["ece"]["extreme"]
    assert st["accuracy"]["p_value"] > 0.975  # replicated accuracy (= confidence) exceeds the observed one
    shifted = _draws(true_logits + torch.tensor([2.5, 0.0, 0.0]), 200, g)  # class 0 far too frequent
    st = check_predictive(shifted, labels, _replicate(shifted, g)).statistics
    assert st["class_frequency[0]"]["p_value"] > 0.975 and st["class_frequency[0]"]["extreme"]
    assert st["class_frequency[0]"]["replicated"]["q05"] > st["class_frequency[0]"]["observed"]


def test_observed_statistics_agree_with_metrics_and_band():
    true_logits, labels, g = _toy(n=120, s=50)
    logits = _draws(true_logits, 50, g, jitter=0.5)
    res = check_predictive(logits, labels, _replicate(logits, g))
    probs = torch.softmax(logits.double(), -1).mean(0)
    assert res.statistics["accuracy"]["observed"] == pytest.approx(accuracy(probs, labels))
    assert res.statistics["ece"]["observed"] == pytest.approx(expected_calibration_error(probs, labels), abs=1e-6)
    conf = probs.max(-1).values
    assert res.statistics["confidence_gap"]["replicated"]["mean"] == pytest.approx(
        float(conf.mean()) - float(np.mean(res.replicated["accuracy"])))
    for c in range(3):
        is_c = labels == c
        err = float((probs.argmax(-1)[is_c] != c).double().mean())
        assert res.statistics[f"per_class_error[{c}]"]["observed"] == pytest.approx(err)
    lo, hi = res.band["lower"], res.band["upper"]
    assert lo.shape == (15,) and hi.shape == (15,)
    ok = np.isfinite(lo)
    assert ok.any() and np.all(lo[ok] <= hi[ok]) and np.all((lo[ok] >= 0) & (hi[ok] <= 1))
    assert all(len(v) == 50 for v in res.replicated.values())
    assert "accuracy" in format_table(res) and f"ECE bins={len(res.band['lower'])};" in format_table(res)


def test_p_value_is_mid_p_for_ties():
    logits = torch.zeros(10, 4, 2)
    logits[..., 0] = 5.0
    labels = torch.zeros(4, dtype=torch.long)
    y_rep = torch.zeros(10, 4, dtype=torch.long)  # every replicate equals the data
    st = check_predictive(logits, labels, y_rep).statistics
    assert st["accuracy"]["p_value"] == 0.5 and st["class_frequency[0]"]["p_value"] == 0.5
    assert np.isnan(st["per_class_error[1]"]["p_value"])  # no example of class 1: undefined, not extreme
    assert not st["per_class_error[1]"]["extreme"]


def test_report_is_json_safe():
    import json

    true_logits, labels, g = _toy(n=50, s=20)
    logits = _draws(true_logits, 20, g)
    res = check_predictive(logits, labels, _replicate(logits, g))
    back = json.loads(json.dumps(res.to_dict()))
    assert set(back["statistics"]) == set(res.statistics)
    assert back["statistics"]["ece"]["p_value"] == pytest.approx(res.statistics["ece"]["p_value"])


@pytest.mark.parametrize("kwargs, needle", [({"num_samples": 0}, "--num-samples must be >= 1"),
                                            ({"limit": 0}, "--limit must be >= 1")])
def test_run_ppc_refuses_bad_arguments_before_reading_anything(tmp_path, kwargs, needle):
    from blob_pyro.errors import ConfigError
    from blob_pyro.ppc import run_ppc

    with pytest.raises(ConfigError, match=needle):
        run_ppc(tmp_path / "no_run", out_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_run_ppc_refuses_an_output_that_is_a_file(tmp_path):
    from blob_pyro.errors import RunError
    from blob_pyro.ppc import run_ppc

    (tmp_path / "out").write_text("x")
    with pytest.raises(RunError, match="not a folder"):
        run_ppc(tmp_path / "no_run", out_dir=tmp_path / "out")
    with pytest.raises(RunError, match="does not exist"):  # a missing run folder: before any model loads
        run_ppc(tmp_path / "no_run", out_dir=tmp_path / "fresh")
