"""blob_pyro.diagnostics: Pareto k̂ of a variational fit (exact vs far too narrow q, and on the tiny BLoB model),
PSIS-LOO, held-out elpd, compare."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from blob_pyro import arviz_io
from blob_pyro.diagnostics import (
    compare,
    heldout_elpd,
    khat_reading,
    khat_threshold,
    log_importance_ratios,
    loo_summary,
    pareto_k,
    vi_pareto_k,
)
from blob_pyro.guides import make_guide

from .tiny import tiny_examples, tiny_model

D, N = 2, 40


def _toy(seed=0):
    """θ ~ N(0, I_D), y_i ~ N(θ, I_D): the posterior is N(Σy / (N+1), I / (N+1)) exactly."""
    y = torch.randn(N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5

    def model(y):
        theta = pyro.sample("theta", dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("obs", dist.Normal(theta, 1.0).to_event(1), obs=y)

    post_loc = y.sum(0) / (N + 1)

    def guide_for(factor):
        def guide(batch):
            pyro.sample("theta", dist.Normal(post_loc, factor / (N + 1) ** 0.5).to_event(1))
        return guide

    return y, model, guide_for


@pytest.mark.parametrize("seed", [0, 1])
def test_khat_low_for_exact_q_and_high_for_far_too_narrow_q(seed):
    y, model, guide_for = _toy(seed)
    exact = log_importance_ratios(model, guide_for(1.0), [y], num_samples=200, seed=seed)
    k_exact, lw = pareto_k(exact["log_ratio"])
    assert k_exact < 0.5 and np.allclose(np.exp(lw).sum(), 1.0)  # ratios are log p(y): constant
    near = log_importance_ratios(model, guide_for(1.1), [y], num_samples=400, seed=seed)
    assert pareto_k(near["log_ratio"])[0] < 0.5
    # 1000 draws: k̂ of the narrow q is 0.76..1.26 over seeds 0..7 (0.62 at seed 4 with 400 draws)
    narrow = log_importance_ratios(model, guide_for(0.1), [y], num_samples=1000, seed=seed)
    k_narrow = pareto_k(narrow["log_ratio"])[0]
    assert k_narrow > 0.7, k_narrow
    assert khat_reading(k_narrow).startswith("do not trust") and khat_reading(k_exact).startswith("good")


def test_ratios_are_prior_plus_scaled_likelihood_minus_q():
    y, model, guide_for = _toy()
    batches = [y[:10], y[10:20]]  # n = 20 observations scored
    out = log_importance_ratios(model, guide_for(1.0), batches, num_samples=5, num_data=N, seed=3)
    np.testing.assert_allclose(out["log_ratio"], out["log_prior"] + (N / 20) * out["log_lik"] - out["log_q"])
    again = log_importance_ratios(model, guide_for(1.0), batches, num_samples=5, num_data=N, seed=3)
    np.testing.assert_array_equal(out["log_ratio"], again["log_ratio"])
    # same draw on every batch: the likelihood of the two halves adds up to that of the 20 together
    whole = log_importance_ratios(model, guide_for(1.0), [y[:20]], num_samples=5, seed=3)
    np.testing.assert_allclose(out["log_lik"], whole["log_lik"], rtol=1e-10)
    assert int(out["num_observed"]) == 20  # observations, not scalars (each y_i has D entries)


def test_khat_reading_and_threshold():
    assert khat_reading(0.3).startswith("good")
    assert khat_reading(0.6).startswith("usable")
    assert khat_reading(0.7).startswith("do not trust")
    assert khat_reading(float("inf")).startswith("do not trust")
    assert khat_threshold(100) == pytest.approx(0.5) and khat_threshold(10_000) == 0.7


def test_vi_pareto_k_on_a_blob_model():
    model = tiny_model("B", num_data=12)
    guide = make_guide("blob", model)
    data = tiny_examples(12, seed=4)
    a = vi_pareto_k(model, guide, data, num_samples=6, subsample_size=5, batch_size=2, seed=1)
    b = vi_pareto_k(model, guide, data, num_samples=6, subsample_size=5, batch_size=2, seed=1)
    assert a.log_ratios.shape == (6,) and np.isfinite(a.log_ratios).all()
    np.testing.assert_array_equal(a.subsample, b.subsample)  # the documented, seeded subsample
    np.testing.assert_allclose(a.log_ratios, b.log_ratios)
    assert len(a.subsample) == 5 and a.num_data == 12 and a.scale == "full"
    np.testing.assert_allclose(a.log_ratios, a.log_prior + 12 / 5 * a.log_lik - a.log_q)
    sub = vi_pareto_k(model, guide, data, num_samples=6, subsample_size=5, batch_size=2, seed=1, scale="subsample")
    np.testing.assert_allclose(sub.log_ratios, a.log_prior + a.log_lik - a.log_q)
    assert 1.0 <= a.ess <= 6.0 and set(a.to_dict()) >= {"khat", "reading", "subsample_size", "scale"}
    with pytest.raises(ValueError, match="point estimate"):
        vi_pareto_k(model, make_guide("auto_delta", model), data, num_samples=2)
    with pytest.raises(ValueError, match="scale"):
        vi_pareto_k(model, guide, data, num_samples=2, scale="half")


def _idata(log_lik, labels):
    s, n = log_lik.shape
    return arviz_io.from_dict({"posterior": {"a": np.zeros((1, s))}, "log_likelihood": {"y": log_lik[None]},
                               "observed_data": {"y": labels}}, dims={"y": ["example"]})


def test_loo_heldout_and_compare_rank_the_better_predictive_first():
    rng = np.random.default_rng(0)
    n, s = 30, 200
    labels = rng.integers(0, 2, n)
    good = np.log(np.clip(rng.normal(0.8, 0.05, (s, n)), 0.01, 0.99))
    bad = np.log(np.clip(rng.normal(0.4, 0.05, (s, n)), 0.01, 0.99))
    g, b = _idata(good, labels), _idata(bad, labels)
    held = heldout_elpd(g)
    direct = np.log(np.exp(good).mean(0)).sum()
    assert held["elpd"] == pytest.approx(direct) and held["n"] == n
    summ = loo_summary(g)
    assert summ["n"] == n and summ["elpd_loo"] <= held["elpd"] + 1e-9  # LOO never beats the in-sample lppd
    table = compare({"good": g, "bad": b})
    assert list(table.index) == ["good", "bad"]
    with pytest.raises(ValueError, match="different"):
        compare({"good": g, "short": _idata(good[:, :10], labels[:10])})


def test_ratios_stay_finite_for_a_collapsed_float32_std():
    # A long BLoB run drives stds to 1e-18..1e-22; at 1e-24 the float32 Normal log-density is 0/0 = NaN.
    def model(y):
        theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("obs", dist.Normal(theta.sum(), 1.0), obs=y)

    def guide(y):
        pyro.sample("theta", dist.Normal(torch.zeros(2), torch.tensor([1e-24, 0.1])).to_event(1))

    assert torch.isnan(dist.Normal(torch.zeros(1), 1e-24).log_prob(torch.zeros(1))).all()  # the float32 trap
    out = log_importance_ratios(model, guide, [torch.zeros(5)], num_samples=3, seed=0)
    assert np.isfinite(out["log_q"]).all() and np.isfinite(out["log_ratio"]).all()
    assert out["log_q"][0] > 50  # -log(1e-24) dominates: the density of the collapsed coordinate, in float64
