"""blob_pyro.poutine.float64: latent log-densities and KLs in float64, draws unchanged, whatever the autocast."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import kl_divergence

from blob_pyro.config import FitConfig
from blob_pyro.guides import make_guide
from blob_pyro.infer import make_step
from blob_pyro.optim import register_parameters
from blob_pyro.poutine import Float64Density, Float64Latents, float64_latents
from blob_pyro.poutine.float64 import as_float64

from .tiny import tiny_examples, tiny_model


@pytest.mark.parametrize("guide_name", ["blob", "lowrank"])
def test_latent_densities_are_float64_under_autocast(guide_name):
    model = tiny_model("B")
    guide = make_guide(guide_name, model)
    batch = model.head.collate(tiny_examples(4))
    with float64_latents(), torch.autocast("cpu", dtype=torch.bfloat16):
        gt = poutine.trace(guide).get_trace(batch)
        mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(batch)
    mt.compute_log_prob()
    gt.compute_log_prob()
    for site in model.sites:
        assert gt.nodes[site.name]["value"].dtype == torch.float32  # draws stay float32
        assert gt.nodes[site.name]["log_prob"].dtype == torch.float64
        assert mt.nodes[site.name]["log_prob"].dtype == torch.float64
    assert mt.nodes["obs"]["log_prob"].dtype == torch.float32  # the likelihood is left alone
    if guide_name == "blob":  # the closed-form KL (TraceMeanField_ELBO) is float64 too
        name = model.sites[0].name
        q, p = gt.nodes[name]["fn"], mt.nodes[name]["fn"]
        assert isinstance(q, Float64Density) and isinstance(p, Float64Density)
        kl = kl_divergence(q, p)
        assert kl.dtype == torch.float64
        assert kl.item() == pytest.approx(kl_divergence(q.base_dist, p.base_dist).item(), rel=1e-5)


def test_wrapper_samples_exactly_as_the_distribution():
    base = dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1)
    wrapped = Float64Density(base)
    torch.manual_seed(0)
    a = wrapped.rsample((2,))
    torch.manual_seed(0)
    b = base.rsample((2,))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert wrapped.event_shape == base.event_shape and wrapped.has_rsample
    assert torch.equal(wrapped.mean, base.mean) and torch.equal(wrapped.variance, base.variance)
    assert wrapped.log_prob(a).dtype == torch.float64
    assert torch.allclose(wrapped.log_prob(a), base.log_prob(a).double(), atol=1e-5)
    assert isinstance(wrapped.expand((4,)), Float64Density) and wrapped.expand((4,)).batch_shape == (4,)


@pytest.mark.parametrize("d", [
    dist.Normal(torch.zeros(2), torch.ones(2)), dist.Laplace(torch.zeros(2), torch.ones(2)),
    dist.StudentT(torch.tensor(3.0), torch.zeros(2), torch.ones(2)),
    dist.LowRankMultivariateNormal(torch.zeros(3), torch.ones(3, 1), torch.ones(3)),
    dist.Delta(torch.zeros(2), event_dim=1), dist.Normal(torch.zeros(2, 2), 1.0).to_event(2),
], ids=["normal", "laplace", "student_t", "lowrank", "delta", "independent"])
def test_as_float64_keeps_the_family(d):
    wide = as_float64(d)
    assert type(wide) is type(d)
    value = d.sample()
    assert wide.log_prob(value.double()).dtype == torch.float64
    assert torch.allclose(wide.log_prob(value.double()).float(), d.log_prob(value), atol=1e-5)
    assert as_float64(dist.Gamma(torch.ones(1), torch.ones(1))) is None  # not handled: keeps its dtype
    assert Float64Density(dist.Gamma(torch.ones(1), torch.ones(1))).log_prob(torch.ones(1)).dtype == torch.float32


def test_observed_and_subsample_sites_are_not_wrapped():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 10, subsample_size=2):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.zeros(2))

    with Float64Latents():
        trace = poutine.trace(model).get_trace()
    assert isinstance(trace.nodes["z"]["fn"], Float64Density)
    assert not isinstance(trace.nodes["y"]["fn"], Float64Density)


def test_float32_density_is_nan_but_the_step_stays_finite_when_a_std_underflows():
    # std = rho**2 = 1e-24: in float32 its variance (1e-48) and the draw's squared offset underflow to 0 and the
    # Normal log-density is 0/0 = NaN. A 2 000-step float32 OpenBookQA run died so at step 556 (Adam can land a
    # rho within 1e-11 of 0). The latent densities are float64 in every training step.
    torch.manual_seed(0)
    model = tiny_model("B")
    guide = make_guide("blob", model)
    batch = model.head.collate(tiny_examples(4))
    name = model.sites[0].name
    register_parameters(model, guide)
    with torch.no_grad():
        pyro.param(f"BlobGuide.rho.{name}").unconstrained()[0, 0] = 1e-12
    q = guide.site_distribution(name)
    assert torch.isnan(q.log_prob(q.sample()))  # the float32 density itself: the failure this guards against
    step = make_step(model, guide, FitConfig(max_steps=10, lr=1e-2, warmup_ratio=0.0))
    for _ in range(2):
        record = step.step(batch, 0.5, 16)
        assert all(math.isfinite(record[k]) for k in ("loss", "nll", "kl")), record
    assert all(torch.isfinite(p).all() for p in pyro.get_param_store().values())


def test_a_value_outside_the_support_is_refused_as_before_though_the_float64_copy_does_not_validate():
    pyro.enable_validation(True)
    positive = Float64Density(dist.LogNormal(torch.zeros(3), torch.ones(3)).to_event(1))
    assert Float64Density(dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1)).log_prob(torch.ones(3)).dtype == \
        torch.float64
    with pytest.raises(ValueError, match="support"):
        Float64Density(dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1)).log_prob(torch.tensor([0.0, math.nan, 1.0]))
    assert positive.log_prob(torch.ones(3)).dtype == torch.float32  # a family as_float64 does not know: its own
    wide = as_float64(dist.Normal(torch.zeros(2), torch.ones(2)))
    assert wide.loc.dtype == torch.float64 and not wide._validate_args


def test_float64_copy_of_a_constant_prior_is_made_once_and_again_after_an_in_place_change():
    from blob_pyro.poutine.float64 import float64_copy

    prior = dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1)
    first = float64_copy(prior)
    assert float64_copy(prior) is first and first.base_dist.loc.dtype == torch.float64
    with torch.no_grad():
        prior.base_dist.loc.add_(1.0)  # the same tensor, changed in place: a new copy
    again = float64_copy(prior)
    assert again is not first and torch.equal(again.base_dist.loc, torch.ones(3, dtype=torch.float64))


def test_float64_copy_of_trained_parameters_is_reused_only_without_gradients():
    from blob_pyro.poutine.float64 import float64_copy

    loc = torch.zeros(3, requires_grad=True)
    q = dist.Normal(loc, torch.ones(3))
    first = float64_copy(q)
    first.log_prob(torch.zeros(3, dtype=torch.float64)).sum().backward()  # the copy's graph is used up
    second = float64_copy(q)  # with gradients on: a fresh copy, so a second backward pass works
    assert second is not first
    second.log_prob(torch.zeros(3, dtype=torch.float64)).sum().backward()
    with torch.no_grad():
        assert float64_copy(q) is second  # the logged KL reuses the step's copy
