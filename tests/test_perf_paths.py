# Moved to tests/integration/test_perf.py (ported to the new API there): test_gpu_check_script_logic_on_cpu and
# test_perf_memory_child_keeps_the_callers_pythonpath, the tests of benchmarks/perf.py and scripts/gpu_check.sh.
# The library-internal tests below are being ported to tests/unit/ separately.
"""The fast paths behind BLoB's cost: packed Flipout signs, the Flipout autograd function, gradient
checkpointing with replayed draws, the grouped optimiser, float64 latent densities under autocast,
and sample-batched prediction."""

import copy
import math
import os
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch.distributions import kl_divergence

from blob_pyro.config import TrainConfig
from blob_pyro.guides import make_guide
from blob_pyro.infer import Float64Density, Float64Latents, GroupedAdamW, make_stepper, warmup_linear
from blob_pyro.reparam import FlipoutLinearFunction, apply_signs, flipout, flipout_linear, sign_bytes
from blob_pyro.runs import build_model
from helpers import toy_examples

REPO = Path(__file__).resolve().parents[1]


def _bits(numel, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (sign_bytes(numel),), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_apply_signs_is_an_exact_sign_flip(dtype):
    x = torch.randn(3, 50, 17).to(dtype)
    bits = _bits(x.numel())
    y = apply_signs(x, bits, x.shape)
    assert y.dtype == dtype and torch.equal(y.abs(), x.abs())
    flipped = (torch.signbit(y) != torch.signbit(x)).float()
    assert 0.45 < flipped.mean().item() < 0.55  # fair coin over 2550 signs
    assert torch.equal(apply_signs(y, bits, x.shape), x)  # the same bits undo the flip
    # a broadcast sign shape (one sign vector per sequence) flips every position of a sequence alike
    z = apply_signs(x, bits, (3, 1, 17))
    assert torch.equal(torch.signbit(z) != torch.signbit(x), (torch.signbit(z) != torch.signbit(x))[:, :1].expand_as(x))


@pytest.mark.parametrize("per", ["token", "sequence"])
def test_flipout_function_is_the_flipout_formula_and_its_gradient(per):
    torch.manual_seed(0)
    b, t, i, o = 2, 3, 5, 4
    x = torch.randn(b, t, i, dtype=torch.float64, requires_grad=True)
    loc = torch.randn(o, i, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(o, i, dtype=torch.float64, requires_grad=True)
    in_shape = (b, t, i) if per == "token" else (b, 1, i)
    out_shape = (b, t, o) if per == "token" else (b, 1, o)
    ib, ob = _bits(math.prod(in_shape), 1), _bits(math.prod(out_shape), 2)
    r = apply_signs(torch.ones(in_shape, dtype=torch.float64), ib, in_shape)
    s = apply_signs(torch.ones(out_shape, dtype=torch.float64), ob, out_shape)

    def fn(x, loc, delta):
        return FlipoutLinearFunction.apply(x, loc, delta, ib, ob, in_shape, out_shape)

    assert torch.allclose(fn(x, loc, delta), x @ loc.T + ((x * r) @ delta.T) * s)
    assert torch.autograd.gradcheck(fn, (x, loc, delta))


def test_flipout_keeps_only_packed_bits_for_backward():
    """A Bayesian lora_A sees the layer input x (B×T×in): backward must not need a flipped copy of it.

    The earlier ``torch.where`` version kept a 1-byte mask per sign and a float copy of x*r per layer
    (≥ 5 bytes per input element on top of x); now it is x itself plus 1 bit per sign.
    """
    torch.manual_seed(0)
    x = torch.randn(4, 64, 96, requires_grad=True)
    loc = torch.randn(8, 96, requires_grad=True)
    value = (loc.detach() + 0.1 * torch.randn(8, 96)).requires_grad_()
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with flipout(seed=0) as handler, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        handler.register(value, loc)
        y = flipout_linear(x, value)
    y.sum().backward()
    x_bytes = x.numel() * 4
    extra = sum(seen.values()) - x_bytes
    assert extra < 0.2 * x_bytes, extra  # loc, delta and bits: 1 bit per sign is 1/32 of x
    assert x.grad is not None and loc.grad is not None and value.grad is not None


def test_flipout_signs_follow_the_global_seed_and_streams_differ():
    loc, value = torch.zeros(4, 6), torch.randn(4, 6)
    x = torch.randn(2, 5, 6)

    def draw(stream=None, shape=x.shape):
        with flipout(stream=stream) as handler:
            handler.register(value, loc)
            out = flipout_linear(torch.ones(shape), value)
        return out, torch.rand(())  # what the global RNG gives next

    torch.manual_seed(7)
    a, after_a = draw()
    torch.manual_seed(7)
    b, after_b = draw()
    torch.manual_seed(7)
    c, after_c = draw(stream=1)
    torch.manual_seed(7)
    _, after_big = draw(shape=(8, 40, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the global RNG advances by one seed draw whatever the batch shape (processes sharing a seed stay in step)
    assert after_a == after_c == after_big


def test_flipout_leaves_point_estimates_alone(tiny_llama_dir):
    """AutoDelta (mle/map) draws have no mean: the replayed prior's mean (0) must not be used for Flipout."""
    cfg = TrainConfig(model=str(tiny_llama_dir), dataset="winogrande_s", method="mle", max_length=32)
    model = build_model(cfg.effective(), num_data=8)
    guide = make_guide("auto_delta", model)
    batch = model.head.collate(toy_examples(2))
    with torch.no_grad():
        guide(batch)
        for name, p in pyro.get_param_store().items():
            if name.startswith("AutoDelta"):
                p.unconstrained().normal_(0, 0.5)
        gt = poutine.trace(guide).get_trace(batch)
        plain = poutine.trace(poutine.replay(model, trace=gt)).get_trace(batch).nodes["logits"]["value"]
        for _ in range(3):
            with flipout():
                flipped = poutine.trace(poutine.replay(model, trace=gt)).get_trace(batch).nodes["logits"]["value"]
            assert torch.allclose(flipped, plain, atol=1e-6)


def _llama(path, factor, checkpointing):
    cfg = TrainConfig(model=str(path), dataset="winogrande_s", bayesian_factor=factor, max_length=48,
                      gradient_checkpointing=checkpointing)
    return build_model(cfg, num_data=16)


def _grads(model, guide, batch, *, backward_inside: bool):
    """Gradients of every param-store parameter for one ELBO-like loss, with fixed draws and signs."""
    pyro.set_rng_seed(3)
    with flipout(seed=11):
        gt = poutine.trace(guide).get_trace(batch)
        mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(batch)
        loss = -mt.nodes["obs"]["fn"].log_prob(batch["labels"]).mean()
        if backward_inside:  # SVI: backward inside the handler
            loss.backward()
    if not backward_inside:  # the paper's step: backward after the handler exited
        loss.backward()
    store = pyro.get_param_store()
    out = {name: p.unconstrained().grad.clone() for name, p in store.items() if p.unconstrained().grad is not None}
    for p in store.values():
        p.unconstrained().grad = None
    return out


@pytest.mark.parametrize("factor", ["A", "B"])
def test_gradient_checkpointing_replays_draws_and_signs(tiny_llama_dir, factor):
    batch_examples = toy_examples(4)
    grads = {}
    saved = {}
    for ckpt in (False, True):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = _llama(tiny_llama_dir, factor, ckpt)
        guide = make_guide("blob", model)
        with torch.no_grad():  # move every parameter off its init so both LoRA factors matter
            probe = model.example_batch()
            poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(probe))).get_trace(probe)
            for name, p in pyro.get_param_store().items():
                p.unconstrained().add_(0.05 * torch.randn_like(p))
        batch = model.head.collate(batch_examples)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            grads[ckpt, "inside"] = _grads(model, guide, batch, backward_inside=True)
        saved[ckpt] = sum(sizes)
        grads[ckpt, "outside"] = _grads(model, guide, batch, backward_inside=False)
    assert saved[True] < saved[False]  # the blocks' activations were not kept
    for where in ("inside", "outside"):
        plain, ckpt = grads[False, where], grads[True, where]
        assert plain.keys() == ckpt.keys() and any("rho" in k for k in plain)
        for name in plain:
            assert torch.allclose(plain[name], ckpt[name], rtol=1e-4, atol=1e-7), (where, name)


def test_grouped_adamw_takes_the_per_parameter_adamw_steps_and_reads_their_state():
    def model(x):
        w = pyro.param("net$$$w", torch.tensor([0.5, -1.0, 2.0]))
        rho = pyro.param("BlobGuide.rho.s", torch.tensor([0.3, 0.4]))
        with pyro.plate("d", 4):
            pyro.sample("obs", dist.Normal((w.sum() + rho.square().sum()) * x, 1.0), obs=2 * x + 1)

    def guide(x):
        pass

    lam = warmup_linear(12, 0.25)
    x = torch.arange(4.0)

    def run(optim, steps):
        svi = SVI(model, guide, optim, Trace_ELBO())
        for _ in range(steps):
            svi.step(x)
            optim.step()
        return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    def per_param():
        return pyro.optim.LambdaLR({"optimizer": torch.optim.AdamW, "lr_lambda": lam,
                                    "optim_args": lambda m, n: {"lr": 0.05 if "rho" in n else 0.1, "weight_decay": 0.01}})

    def grouped():
        return GroupedAdamW(lr=0.1, scale_lr=0.05, weight_decay=0.01, lr_lambda=lam)

    pyro.clear_param_store()
    old = per_param()
    ref = run(old, 6)
    pyro.clear_param_store()
    new = grouped()
    ours = run(new, 6)
    for k in ref:
        assert torch.allclose(ref[k], ours[k], atol=1e-6), k
    assert new.current_lr() == pytest.approx({"loc": 0.1 * lam(6), "scale": 0.05 * lam(6)})
    # an earlier checkpoint's per-parameter state resumes into the grouped optimiser
    pyro.clear_param_store()
    old = per_param()
    run(old, 3)
    state = copy.deepcopy(old.get_state())  # the live state is updated in place by later steps
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    expected = run(old, 3)
    pyro.clear_param_store()
    for k, v in params.items():
        pyro.param(k, v.clone())
    resumed = grouped()
    resumed.set_state(state)
    got = run(resumed, 3)
    for k in expected:
        assert torch.allclose(expected[k], got[k], atol=1e-6), k
    assert resumed.get_state()["format"] == GroupedAdamW.FORMAT


def test_latent_densities_are_float64_under_autocast(tiny_llama_dir):
    model = _llama(tiny_llama_dir, "B", False)
    guide = make_guide("blob", model)
    batch = model.head.collate(toy_examples(4))
    with Float64Latents(), torch.autocast("cpu", dtype=torch.bfloat16):
        gt = poutine.trace(guide).get_trace(batch)
        mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(batch)
    mt.compute_log_prob()
    gt.compute_log_prob()
    for site in model.sites:
        assert gt.nodes[site.name]["value"].dtype == torch.float32  # draws stay float32
        assert gt.nodes[site.name]["log_prob"].dtype == torch.float64
        assert mt.nodes[site.name]["log_prob"].dtype == torch.float64
    assert mt.nodes["obs"]["log_prob"].dtype == torch.float32
    # the closed-form KL is still used (TraceMeanField_ELBO) and is float64
    name = model.sites[0].name
    q, p = gt.nodes[name]["fn"], mt.nodes[name]["fn"]
    assert isinstance(q, Float64Density)
    kl = kl_divergence(q, p)
    assert kl.dtype == torch.float64
    assert kl.item() == pytest.approx(kl_divergence(q.base_dist, p.base_dist).item(), rel=1e-5)


@pytest.mark.parametrize("guide_name", ["blob", "lowrank"])
def test_bf16_step_trains_and_logs_finite_values(tiny_llama_dir, guide_name):
    model = _llama(tiny_llama_dir, "B", False)
    guide = make_guide(guide_name, model)
    stepper = make_stepper(model, guide, max_steps=4, lr=1e-2, autocast_dtype=torch.bfloat16, device="cpu")
    batch = model.head.collate(toy_examples(4))
    records = [stepper.step(batch, 1 / 16, 16) for _ in range(3)]
    assert all(math.isfinite(r[k]) for r in records for k in ("loss", "nll", "kl"))
    assert guide.median()[model.sites[0].name].abs().sum() > 0  # the means moved


def test_sample_batched_prediction_draws_one_weight_per_layer_and_fresh_signs(tiny_llama_dir):
    from blob_pyro.predictive import posterior_logits

    model = _llama(tiny_llama_dir, "B", False)
    guide = make_guide("blob", model)
    with torch.no_grad():
        guide(model.example_batch())
        for name, p in pyro.get_param_store().items():
            if ".rho." in name:
                p.unconstrained().fill_(0.5)  # std 0.25: draws differ visibly
    example = toy_examples(1)[0]
    batch = model.head.collate([example, example])
    torch.manual_seed(0)
    batched = posterior_logits(model, guide, batch, num_samples=64, sample_batched=True)
    torch.manual_seed(0)
    sequential = posterior_logits(model, guide, batch, num_samples=64)
    assert batched.shape == sequential.shape == (64, 2, 2)
    assert not torch.allclose(batched[0, 0], batched[1, 0])  # the copies are different draws
    # same predictive distribution: the sample means agree within their standard errors
    for a, b in ((batched, sequential),):
        se = (a.std(0) ** 2 / 64 + b.std(0) ** 2 / 64).sqrt()
        assert torch.all((a.mean(0) - b.mean(0)).abs() < 5 * se + 1e-6)


def test_bf16_cpu_prediction_stays_close_to_float32(one_thread):
    """The CPU benchmark runs under bf16 autocast: its probabilities must stay close to float32's."""
    from blob_pyro.predictive import predict

    cfg = TrainConfig(model="minilm", dataset="arc_easy", max_length=48)
    model = build_model(cfg, num_data=8)
    guide = make_guide("blob", model)
    examples = toy_examples(12, num_classes=4, seed=3)
    full = predict(model, guide, examples, num_samples=0, batch_size=6, progress=False)
    half = predict(model, guide, examples, num_samples=0, batch_size=6, progress=False,
                   autocast_dtype=torch.bfloat16)
    assert full.probs.shape == half.probs.shape == (12, 5)
    assert half.probs.dtype == torch.float32
    assert torch.allclose(half.probs.sum(-1), torch.ones(12))
    assert (half.probs - full.probs).abs().max() < 0.02


def test_native_bf16_detection_matches_the_kernel_cpu_flags():
    import platform

    from blob_pyro.precision import cpu_has_native_bf16

    if platform.machine().lower() not in ("x86_64", "amd64") or not os.path.exists("/proc/cpuinfo"):
        pytest.skip("the check reads x86 CPU flags from /proc/cpuinfo (Linux on x86 only)")
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)


def test_emulated_bf16_warns_once_and_float32_or_native_bf16_do_not(tiny_llama_dir, monkeypatch, recwarn):
    """bf16 autocast on a CPU without bf16 instructions is several times slower: the run says so, once."""
    import blob_pyro.precision as precision

    model = _llama(tiny_llama_dir, "B", False)
    guide = make_guide("blob", model)
    monkeypatch.setattr(precision, "_warned", False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    make_stepper(model, guide, max_steps=2, autocast_dtype=torch.bfloat16, device="cpu")
    assert not [w for w in recwarn if "emulated" in str(w.message)]
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    make_stepper(model, guide, max_steps=2, device="cpu")  # float32: nothing to say
    assert not [w for w in recwarn if "emulated" in str(w.message)]
    for _ in range(2):
        make_stepper(model, guide, max_steps=2, autocast_dtype=torch.bfloat16, device="cpu")
    hits = [w for w in recwarn if "emulated" in str(w.message)]
    assert len(hits) == 1 and hits[0].category is RuntimeWarning
    assert "bf16=false" in str(hits[0].message) and "\n" not in str(hits[0].message)
