"""blob_pyro.poutine.scale: the KL weight multiplies the latent sites of model and guide, never the likelihood."""

import pytest
from pyro import poutine

from blob_pyro.guides import make_guide
from blob_pyro.poutine import LatentScaleMessenger, scale_latents

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
    from pyro.infer import Trace_ELBO

    model = tiny_model("B")
    guide = make_guide("blob", model, eps=0.05)  # stds ~2e-3: the two draws below nearly agree
    batch = model.head.collate(tiny_examples(4))
    with scale_latents(0.0):
        loss = Trace_ELBO().loss(model, guide, batch)
        trace = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(batch))).get_trace(batch)
    nll = -trace.nodes["obs"]["fn"].log_prob(batch["labels"]).sum().item() * 16 / 4
    assert loss == pytest.approx(nll, rel=1e-2)  # another draw of the factors: B's std is ~2e-3
