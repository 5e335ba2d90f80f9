"""The probabilistic program: sites, priors, guides, KL, Flipout, schedules, Predictive."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from blob_pyro.config import TrainConfig
from blob_pyro.guides import GUIDES, BlobGuide, make_guide
from blob_pyro.infer import fit, kl_terms
from blob_pyro.kl import BlobKLSchedule, FixedKL, StandardKL, scale_latents
from blob_pyro.lora import bind_values
from blob_pyro.reparam import flipout, flipout_linear
from blob_pyro.runs import build_model
from helpers import toy_examples


def _minilm(factor="B", **kw):
    cfg = TrainConfig(model="minilm", dataset="winogrande_s", bayesian_factor=factor, max_length=32, **kw)
    return build_model(cfg, num_data=64)


def _llama(path, factor="A", **kw):
    cfg = TrainConfig(model=str(path), dataset="winogrande_s", bayesian_factor=factor, max_length=64, **kw)
    return build_model(cfg, num_data=32)


@pytest.mark.parametrize("factor,count,shape", [("B", 12, (384, 8)), ("A", 12, (8, 384)), ("both", 24, None)])
def test_minilm_sites_named_after_module_and_factor(factor, count, shape):
    model = _minilm(factor)
    names = [s.name for s in model.sites]
    assert len(names) == count
    assert "bert.encoder.layer.3.attention.self.query.lora_" + ("A" if factor == "A" else "B") in names
    for site in model.sites:
        assert site.name.endswith(f".lora_{site.factor}")
        expected = shape or ((8, 384) if site.factor == "A" else (384, 8))
        assert tuple(site.shape) == expected
    trace = poutine.trace(model).get_trace(model.example_batch())
    latent = [n for n, s in trace.nodes.items()
              if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]
    assert latent == names


def test_causal_lm_sites_include_lm_head(tiny_llama_dir):
    model = _llama(tiny_llama_dir, "B")
    names = {s.name: s.shape for s in model.sites}
    assert names["model.layers.0.self_attn.q_proj.lora_B"] == (32, 8)
    assert names["model.layers.1.self_attn.v_proj.lora_B"] == (16, 8)  # 2 kv heads x 8 dims
    assert names["lm_head.lora_B"] == (30522, 8)
    assert len(names) == 5


def test_prior_and_guide_distributions():
    model = _minilm("A", prior_scale=0.2)
    guide = make_guide("blob", model, eps=0.05)
    batch = model.example_batch()
    guide_trace = poutine.trace(guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    for site in model.sites:
        prior = model_trace.nodes[site.name]["fn"]
        assert isinstance(prior, dist.Independent) and isinstance(prior.base_dist, dist.Normal)
        assert prior.event_shape == site.shape and prior.batch_shape == ()
        assert torch.all(prior.base_dist.scale == 0.2) and torch.all(prior.base_dist.loc == 0)
        q = guide_trace.nodes[site.name]["fn"]
        assert isinstance(q.base_dist, dist.Normal) and q.event_shape == site.shape
        # mean starts at PEFT's kaiming init of lora_A, std = rho^2 in [eps^2/2, eps^2]
        assert torch.equal(q.base_dist.loc.detach(), model.init_loc_fn({"name": site.name}))
        assert q.base_dist.loc.abs().max() <= 1 / math.sqrt(384) + 1e-6
        std = q.base_dist.scale.detach()
        assert std.min() >= 0.05**2 / 2 - 1e-7 and std.max() <= 0.05**2 + 1e-7


def test_b_factor_guide_starts_at_zero_mean():
    model = _minilm("B")
    guide = make_guide("blob", model)
    for loc in guide.median().values():
        assert torch.count_nonzero(loc) == 0


def test_softplus_std_starts_in_same_range():
    model = _minilm("B")
    guide = BlobGuide(model, std_param="softplus")
    for std in guide.std().values():
        assert std.min() >= 0.05**2 / 2 - 1e-6 and std.max() <= 0.05**2 + 1e-6


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    model = _minilm("B")
    guide = make_guide("blob", model)
    guide(model.example_batch())  # registers the guide's parameters in the param store
    with torch.no_grad():  # move the guide away from its init so the KL has a non-trivial mean term
        for name in guide.site_names:
            pyro.param(f"BlobGuide.loc.{name}").unconstrained().add_(0.1 * torch.randn(384, 8))
            pyro.param(f"BlobGuide.rho.{name}").unconstrained().mul_(3.0)
    priors = model.prior_distributions()
    name = model.sites[0].name
    q, p = guide.site_distribution(name), priors[name]
    closed = kl_divergence(q, p).item()
    draws = q.sample((4000,))
    mc = q.log_prob(draws) - p.log_prob(draws)
    err = mc.std().item() / math.sqrt(len(mc))
    assert abs(mc.mean().item() - closed) < 4 * err
    # the analytic form BLoB writes out
    loc, std = q.base_dist.loc.detach(), q.base_dist.scale.detach()
    by_hand = (torch.log(0.2 / std) + (std**2 + loc**2) / (2 * 0.2**2) - 0.5).sum().item()
    assert closed == pytest.approx(by_hand, rel=1e-5)


def test_trace_meanfield_elbo_uses_closed_form_kl():
    model = _minilm("B")
    guide = make_guide("blob", model)
    batch = model.example_batch()
    batch["labels"] = torch.tensor([0])
    loss = TraceMeanField_ELBO().loss(model, guide, batch)
    guide_trace = poutine.trace(guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    kl = kl_terms(model_trace, guide_trace).item()
    nll = -model_trace.nodes["obs"]["fn"].log_prob(batch["labels"]).sum().item() * 64  # plate scale N/B
    assert loss == pytest.approx(kl + nll, rel=1e-3)


def test_logged_kl_of_a_point_estimate_is_the_map_penalty():
    """AutoDelta (mle/map): the `kl` of the train log is -log p(theta) at the point, the term MAP minimises."""
    model = _minilm("B")
    guide = make_guide("auto_delta", model)
    batch = model.example_batch()
    batch["labels"] = torch.tensor([0])
    guide_trace = poutine.trace(guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    priors = model.prior_distributions()
    by_hand = -sum(priors[s.name].log_prob(guide_trace.nodes[s.name]["value"]).sum().item() for s in model.sites)
    assert kl_terms(model_trace, guide_trace).item() == pytest.approx(by_hand, rel=1e-6)
    assert by_hand < 0  # B starts at 0, where the N(0, 0.2) density is 2.0 > 1: a penalty, not a KL


def test_flipout_matches_reparameterisation_mean_and_variance():
    torch.manual_seed(0)
    out_dim, in_dim, n = 3, 5, 6000
    loc = torch.randn(out_dim, in_dim)
    scale = torch.rand(out_dim, in_dim) * 0.5 + 0.1
    x = torch.randn(2, 4, in_dim)

    def guide():
        return pyro.sample("w", dist.Normal(loc, scale).to_event(2))

    flip, plain = [], []
    for _ in range(n):
        with flipout():
            flip.append(flipout_linear(x, guide()))
        plain.append(flipout_linear(x, guide()))  # no handler: one weight for the batch
    flip, plain = torch.stack(flip), torch.stack(plain)
    exact_mean = x @ loc.T
    exact_var = (x**2) @ (scale**2).T
    for y in (flip, plain):
        assert torch.allclose(y.mean(0), exact_mean, atol=5 * (exact_var.sqrt().max() / math.sqrt(n)).item())
        assert torch.allclose(y.var(0), exact_var, rtol=0.12)
    # Flipout decorrelates two positions with the same input; a shared weight draw does not
    same = x[:1, :1].expand(1, 2, in_dim)
    with flipout():
        w = guide()
        y = flipout_linear(same, w)
    assert not torch.allclose(y[0, 0], y[0, 1])
    y_plain = flipout_linear(same, guide())
    assert torch.allclose(y_plain[0, 0], y_plain[0, 1])


def test_flipout_per_sequence_shares_signs_within_a_sequence():
    torch.manual_seed(1)
    loc, scale = torch.zeros(2, 3), torch.ones(2, 3)
    x = torch.ones(1, 4, 3)
    with flipout(per="sequence"):
        w = pyro.sample("w", dist.Normal(loc, scale).to_event(2))
        y = flipout_linear(x, w)
    assert torch.allclose(y[0, 0], y[0, 3])


def test_unbound_variant_is_plain_lora_and_binding_changes_output(tiny_llama_dir):
    model = _llama(tiny_llama_dir, "B")
    batch = model.head.collate(toy_examples(2))
    net = model.network
    with torch.no_grad():
        for site in model.sites:  # non-zero B so the adapter matters
            site.peft_weight().normal_(0, 0.5)
        ours = model.head.logits(net, batch)
        for layer in {id(s.layer): s.layer for s in model.sites}.values():
            layer.lora_variant.pop("default")
        vanilla = model.head.logits(net, batch)
    assert torch.allclose(ours, vanilla, atol=1e-5)
    from blob_pyro.lora import attach_variants

    attach_variants(net)
    with torch.no_grad(), bind_values(model.sites, {s.name: torch.zeros(s.shape) for s in model.sites}):
        zeroed = model.head.logits(net, batch)
    assert not torch.allclose(zeroed, ours)


def test_blob_kl_schedule_matches_official_cycle_lengths():
    table = {640: 316, 1119: 393, 2251: 517, 2558: 544, 4957: 706, 9427: 909}
    for n, m in table.items():
        assert BlobKLSchedule(n, 4).cycle == m
    assert BlobKLSchedule(640, 4, world_size=2).cycle == 158
    s = BlobKLSchedule(640, 4)
    m = s.cycle
    assert s.weight(m) == pytest.approx(0.5, rel=1e-9)
    assert s.weight(m - 1) == pytest.approx(0.25, rel=1e-9)
    assert s.weight(m + 1) == s.weight(1) and s.weight(1) < 1e-90
    assert sum(s.weight(t) for t in range(1, m + 1)) == pytest.approx(1.0, rel=1e-9)
    assert all(s.weight(t) < s.weight(t + 1) for t in range(1, m))
    assert BlobKLSchedule(640, 4, dataset_rescaling=False).cycle == 160
    assert StandardKL(640).weight(7) == 1 / 640
    assert FixedKL(640, 0.5).weight(3) == 0.5 / 640


def test_scale_latents_scales_latent_sites_not_the_likelihood():
    model = _minilm("B")
    batch = model.example_batch()
    batch["labels"] = torch.tensor([1])
    with scale_latents(3.0):
        trace = poutine.trace(model).get_trace(batch)
    for site in model.sites:
        assert trace.nodes[site.name]["scale"] == 3.0
    assert trace.nodes["obs"]["scale"] == pytest.approx(64.0)  # plate N / B only


@pytest.mark.parametrize("guide_name", GUIDES)
@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_every_guide_with_every_elbo_takes_a_step(tiny_llama_dir, guide_name, elbo):
    model = _llama(tiny_llama_dir, "B")
    guide = make_guide(guide_name, model)
    batch = model.head.collate(toy_examples(4))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo())
    with flipout():
        loss0 = svi.step(batch)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with flipout():
        loss1 = svi.step(batch)
    assert math.isfinite(loss0) and math.isfinite(loss1)
    changed = [k for k, v in pyro.get_param_store().items() if not torch.equal(v.detach(), before[k])]
    assert any("lora_B" in k for k in changed)


def test_predictive_with_explicit_return_sites(tiny_llama_dir):
    model = _llama(tiny_llama_dir, "both")
    guide = make_guide("blob", model)
    batch = model.head.collate(toy_examples(3))
    out = Predictive(model, guide=guide, num_samples=4, return_sites=["logits", "obs"])(batch)
    assert set(out) == {"logits", "obs"}
    assert out["logits"].shape == (4, 3, 2) and out["obs"].shape == (4, 3)
    assert not torch.allclose(out["logits"][0], out["logits"][1])  # different posterior draws


def test_paper_preset_steps_rho_and_deterministic_factor(tiny_llama_dir):
    model = _llama(tiny_llama_dir, "A")
    guide = make_guide("blob", model)
    examples = toy_examples(16)
    guide(model.example_batch())
    log = fit(model, guide, examples, max_steps=4, batch_size=4, lr=1e-3, preset="paper", kl_schedule="blob",
              progress=False)
    assert len(log) == 4 and all(math.isfinite(r["loss"]) for r in log)
    store = pyro.get_param_store()
    rho = store["BlobGuide.rho.lm_head.lora_A"]
    assert set(log[-1]["lr"]) == {"adamw", "sgd"}
    b = [v for k, v in store.items() if k.endswith("lm_head.lora_B.default.weight")][0]
    assert torch.count_nonzero(b) > 0  # B (deterministic, zero-init) was trained by AdamW on the NLL
    assert rho.requires_grad


def test_warmup_then_linear_decay():
    from blob_pyro.infer import warmup_linear

    f = warmup_linear(100, 0.06)
    values = [f(s) for s in range(101)]
    assert values[0] == pytest.approx(1 / 7) and values[5] == pytest.approx(6 / 7) and values[6] == 1.0
    assert all(a < b for a, b in zip(values[:6], values[1:7]))
    assert all(a >= b for a, b in zip(values[6:], values[7:]))
    assert values[100] == 0.0 and values[53] == pytest.approx(47 / 94)


def test_predict_keeps_the_data_order(tiny_llama_dir):
    from blob_pyro.predictive import predict

    model = _llama(tiny_llama_dir, "B")
    guide = make_guide("blob", model)
    examples = toy_examples(9)
    # make lengths differ so that length-sorted batching reorders them internally
    examples = [e.__class__(e.index, e.prompt + " x" * (9 - i), e.choices, e.mc_texts, e.label)
                for i, e in enumerate(examples)]
    out = predict(model, guide, examples, num_samples=0, batch_size=4, progress=False)
    single = torch.cat([predict(model, guide, [e], num_samples=0, progress=False).probs for e in examples])
    assert torch.equal(out.labels, torch.tensor([e.label for e in examples]))
    assert torch.allclose(out.probs, single, atol=1e-5)


def test_multiple_choice_head_encodes_only_present_options():
    """Packing the present options gives the full (B, K) layout's scores, -inf where an option is absent."""
    from blob_pyro.data import Example

    cfg = TrainConfig(model="minilm", dataset="arc_easy", max_length=32)  # K = 5 slots
    model = build_model(cfg, num_data=8)
    words = ["red", "blue", "green", "black", "white"]
    examples = [Example(index=i, prompt="", choices=tuple(words[:n]),
                        mc_texts=tuple((f"question {i} about colour", w) for w in words[:n]), label=0)
                for i, n in enumerate([4, 5, 3, 4])]
    batch = model.head.collate(examples)
    with torch.no_grad():
        packed = model.head.logits(model.network, batch)
        full = model.network(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    mask = batch["choice_mask"]
    assert packed.shape == (4, 5) and mask.sum() == 16
    assert torch.isinf(packed[~mask]).all() and (packed[~mask] < 0).all()
    torch.testing.assert_close(packed[mask], full[mask], rtol=1e-5, atol=1e-5)
    # gradients reach the trained classifier through the scatter (lora_A's are 0 while B = 0 at init)
    trained = [p for n, p in model.network.named_parameters() if p.requires_grad and "classifier" in n]
    model.head.logits(model.network, batch)[mask].sum().backward()
    assert len(trained) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_lowrank_guide_density_stays_exact_when_stds_collapse(tiny_llama_dir):
    # Training drives some diagonal stds to ~1e-7 while the correlations stay O(1). When the guide
    # stored the covariance factor itself, float32 Woodbury algebra then lost all precision: the
    # capacitance Cholesky failed on every OpenBookQA seed after ~30 steps. With the factor scaled by
    # the stds (capacitance I + UᵀU) the float32 density must match a dense float64 reference.
    torch.manual_seed(0)
    model = _llama(tiny_llama_dir, "B")
    guide = make_guide("lowrank", model, rank=2)
    name = "model.layers.0.self_attn.q_proj.lora_B"
    with torch.no_grad():
        guide(model.example_batch())
        store = pyro.get_param_store()
        store[f"BlobGuide.loc.{name}"].unconstrained().copy_(0.02 * torch.randn(32, 8))
        rho = store[f"BlobGuide.rho.{name}"].unconstrained()
        rho.copy_(torch.rand_like(rho) * 1e-3)  # std = rho² in [0, 1e-6]
        rho[:3, 0] = 1e-12  # std 1e-24: its square underflows in float32; the guide floors std at 1e-10
        q = guide.site_distribution(name)
        base = q.base_dist
        dense = dist.MultivariateNormal(base.loc.double(), base.covariance_matrix.double())
        for _ in range(5):
            z = q.rsample()
            got = q.log_prob(z)
            want = dense.log_prob(z.double().reshape(-1))
            assert torch.isfinite(got)
            assert got.item() == pytest.approx(want.item(), rel=1e-4)
    marginal = guide.std()[name].double()
    assert torch.allclose(marginal.reshape(-1), base.covariance_matrix.double().diagonal().sqrt(), rtol=1e-5)
    # and the reparameterised gradient of the log-density stays finite (a NaN here ended a real run)
    q = guide.site_distribution(name)
    q.log_prob(q.rsample()).backward()
    for key in (f"BlobGuide.loc.{name}", f"BlobGuide.rho.{name}", f"BlobGuide.corr_factor.{name}"):
        grad = store[key].unconstrained().grad
        assert grad is not None and torch.isfinite(grad).all(), key


def test_logged_kl_is_the_kl_before_the_optimiser_step(tiny_llama_dir):
    # The optimiser updates the guide's means in place; a KL read from the trace after the step mixed
    # new means with the old draw and stds (for the low-rank guide: Monte Carlo KLs of ±1e12).
    from blob_pyro.infer import make_stepper

    torch.manual_seed(0)
    model = _llama(tiny_llama_dir, "B")
    guide = make_guide("blob", model)
    batch = model.head.collate(toy_examples(4))
    stepper = make_stepper(model, guide, max_steps=10, lr=0.1, warmup_ratio=0.0, device="cpu")
    priors = model.prior_distributions()

    def closed_form_kl():
        with torch.no_grad():
            return sum(kl_divergence(guide.site_distribution(n), p).sum().item() for n, p in priors.items())

    stepper.step(batch, 1e-3, 32)  # sets up the parameters
    before = closed_form_kl()
    record = stepper.step(batch, 1e-3, 32)
    after = closed_form_kl()
    assert record["kl"] == pytest.approx(before, rel=1e-6)
    assert after != pytest.approx(before, rel=1e-6)  # the step moved the guide: the check can fail


def test_float32_step_stays_finite_when_a_std_underflows(tiny_llama_dir):
    # std = rho**2 = 1e-24: in float32 its variance (1e-48) and the draw's squared offset underflow to 0 and the
    # Normal log-density is 0/0 = NaN. A 2 000-step float32 OpenBookQA run died so at step 556 (Adam can land a
    # rho within 1e-11 of 0). The latent densities are float64 in every SVI step now.
    from blob_pyro.infer import make_stepper

    torch.manual_seed(0)
    model = _llama(tiny_llama_dir, "B")
    guide = make_guide("blob", model)
    batch = model.head.collate(toy_examples(4))
    name = model.sites[0].name
    with torch.no_grad():
        guide(batch)
        pyro.param(f"BlobGuide.rho.{name}").unconstrained()[0, 0] = 1e-12
    q = guide.site_distribution(name)
    draw = q.sample()
    assert torch.isnan(q.log_prob(draw))  # the float32 density itself: the failure this guards against
    stepper = make_stepper(model, guide, max_steps=10, lr=1e-2, warmup_ratio=0.0, device="cpu")
    for _ in range(2):
        record = stepper.step(batch, 0.5, 32)
        assert all(math.isfinite(record[k]) for k in ("loss", "nll", "kl")), record
    store = pyro.get_param_store()
    assert all(torch.isfinite(store[n]).all() for n in store.keys())
