"""blob_pyro.poutine.scale: the KL weight multiplies the latent sites of model and guide, never the likelihood."""

import contextlib

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from blob_pyro.guides import make_guide
from blob_pyro.infer import KeepTrace_ELBO
from blob_pyro.optim import register_parameters
from blob_pyro.poutine import Float64Density, LatentScaleMessenger, float64_latents, scale_latents
from blob_pyro.poutine import scale as scale_module

from .tiny import tiny_examples, tiny_model


def test_scale_latents_scales_latent_sites_not_the_likelihood():
    model = tiny_model("both", num_data=64)
    guide = make_guide("blob", model)
    batch = model.head.collate(tiny_examples(4))
    with scale_latents(3.0):
        mt = poutine.trace(model).get_trace(batch)
        gt = poutine.trace(guide).get_trace(batch)
    for site in model.sites:
        assert mt.nodes[site.name]["scale"] == 3.0 and gt.nodes[site.name]["scale"] == 3.0
    assert mt.nodes["obs"]["scale"] == pytest.approx(64 / 4)  # plate N / B only


def test_nested_scales_multiply_and_leave_no_trace_outside():
    model = tiny_model("B")
    batch = model.head.collate(tiny_examples(2))
    with scale_latents(2.0), scale_latents(0.25):
        inner = poutine.trace(model).get_trace(batch)
    after = poutine.trace(model).get_trace(batch)
    name = model.sites[0].name
    assert inner.nodes[name]["scale"] == pytest.approx(0.5)
    assert after.nodes[name]["scale"] == 1.0
    assert isinstance(scale_latents(1.0), LatentScaleMessenger)


def test_zero_weight_removes_the_kl_term():
    """mle: kl_multiplier 0 scales the latent sites to 0, so the ELBO is the likelihood alone."""
    model = tiny_model("B")
    guide = make_guide("blob", model, eps=0.05)  # stds ~2e-3: the two draws below nearly agree
    batch = model.head.collate(tiny_examples(4))
    with scale_latents(0.0):
        loss = Trace_ELBO().loss(model, guide, batch)
        trace = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(batch))).get_trace(batch)
    nll = -trace.nodes["obs"]["fn"].log_prob(batch["labels"]).sum().item() * 16 / 4
    assert loss == pytest.approx(nll, rel=1e-2)  # another draw of the factors: B's std is ~2e-3


def _elbo_and_grads(elbo, model, guide, batch, scale, *, record_zeros=True, monkeypatch=None):
    """(loss, {param: grad}, how many latent log-densities were computed) of one ``loss_and_grads`` at ``scale``."""
    params = register_parameters(model, guide)
    for p in params.values():
        p.grad = None
    calls, log_prob = [], Float64Density.log_prob
    pyro.set_rng_seed(7)
    with contextlib.ExitStack() as stack:
        stack.enter_context(scale_latents(scale))
        stack.enter_context(float64_latents())
        m = stack.enter_context(monkeypatch.context())
        m.setattr(Float64Density, "log_prob", lambda self, v: calls.append(1) or log_prob(self, v))
        if not record_zeros:
            m.setattr(scale_module, "_record_zero_density", lambda msg: None)
        loss = elbo.loss_and_grads(model, guide, batch)
    return loss, {k: None if p.grad is None else p.grad.clone() for k, p in params.items()}, len(calls)


@pytest.mark.parametrize("guide_name", ["auto_delta", "blob", "lowrank"])
@pytest.mark.parametrize("elbo_name", ["keep", "trace", "meanfield"])
def test_zero_weight_computes_no_latent_density_and_changes_no_number(guide_name, elbo_name, monkeypatch):
    """At weight 0 the handler records the zero each latent site adds: loss and every gradient are those of the
    densities computed and multiplied by 0, bit for bit, and no latent density is computed."""
    elbo = {"keep": KeepTrace_ELBO, "trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}[elbo_name]()
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = tiny_model("both", num_data=16)
    guide = make_guide(guide_name, model)
    batch = model.head.collate(tiny_examples(4))
    loss, grads, computed = _elbo_and_grads(elbo, model, guide, batch, 0.0, monkeypatch=monkeypatch)
    ref_loss, ref_grads, ref_computed = _elbo_and_grads(elbo, model, guide, batch, 0.0, record_zeros=False,
                                                        monkeypatch=monkeypatch)
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert (g is None) == (ref_grads[name] is None) and (g is None or torch.equal(g, ref_grads[name])), name
    assert ref_computed >= 2 * len(model.sites)  # the reference computes them: the count can tell
    if elbo_name != "meanfield":  # TraceMeanField_ELBO takes the closed-form KL instead, scaled by 0 as before
        assert computed == 0
    # a non-zero weight computes them all as before
    _, _, weighted = _elbo_and_grads(elbo, model, guide, batch, 1e-3, monkeypatch=monkeypatch)
    assert weighted == ref_computed


def test_zero_weight_keeps_the_score_function_of_a_draw_without_rsample(monkeypatch):
    """A latent draw that is not reparameterised gets its gradient through its score function, which the weight
    does not scale: at weight 0 that term must stay."""
    def model(y):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("y", dist.Normal(3.0 * z, 1.0), obs=y)

    def guide(y):
        p = pyro.param("p", torch.tensor(0.3), constraint=dist.constraints.unit_interval)
        pyro.sample("z", dist.Bernoulli(p))

    def grad_of_p(record_zeros=True):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        with scale_latents(0.0), monkeypatch.context() as m:
            if not record_zeros:
                m.setattr(scale_module, "_record_zero_density", lambda msg: None)
            Trace_ELBO(num_particles=50, vectorize_particles=False).loss_and_grads(model, guide, torch.tensor(2.5))
        return pyro.param("p").unconstrained().grad

    g = grad_of_p()
    assert g is not None and g.abs().item() > 0  # the likelihood pulls p towards z = 1 through the score function
    assert torch.equal(g, grad_of_p(record_zeros=False))
