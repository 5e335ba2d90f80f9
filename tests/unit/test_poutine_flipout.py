"""blob_pyro.poutine.flipout: Flipout's moments, its autograd function against autograd of the explicit formula,
packed signs, seeding, and what it leaves alone."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from blob_pyro.guides import make_guide
from blob_pyro.optim import register_parameters
from blob_pyro.poutine.flipout import (
    FlipoutLinearFunction,
    FlipoutMessenger,
    FlipoutReplay,
    active_flipout,
    apply_signs,
    flipout,
    flipout_linear,
    sign_bytes,
)

from .tiny import tiny_examples, tiny_model


def _bits(numel, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (sign_bytes(numel),), dtype=torch.uint8, generator=g)


def _signs(bits, shape, dtype=torch.float64):
    return apply_signs(torch.ones(shape, dtype=dtype), bits, shape)


def test_sign_bytes_is_a_multiple_of_eight():
    assert [sign_bytes(n) for n in (1, 64, 65, 640)] == [8, 8, 16, 80]


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("numel", [1, 17, 63, 64, 192, 200, 1024])
def test_sign_of_element_k_is_packed_bit_k_whatever_the_size(dtype, numel):
    """The map from packed bits to elements, computed by hand: element k takes bit (width - 1 - k % width) of word
    k // width, the words being the bits read as integers of the tensor's width (sizes that fill the words
    exactly and sizes that do not)."""
    width = torch.finfo(dtype).bits
    bits = _bits(numel, seed=numel)
    words = bits.view({16: torch.int16, 32: torch.int32, 64: torch.int64}[width]).tolist()
    expected = [-1.0 if (words[k // width] >> (width - 1 - k % width)) & 1 else 1.0 for k in range(numel)]
    assert _signs(bits, (numel,), dtype).float().tolist() == expected


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
    r, s = _signs(ib, in_shape), _signs(ob, out_shape)

    def fn(x, loc, delta):
        return FlipoutLinearFunction.apply(x, loc, delta, ib, ob, in_shape, out_shape)

    def formula(x, loc, delta):
        return x @ loc.T + ((x * r) @ delta.T) * s

    assert torch.allclose(fn(x, loc, delta), formula(x, loc, delta))
    g = torch.randn(b, t, o, dtype=torch.float64)
    ours = torch.autograd.grad(fn(x, loc, delta), (x, loc, delta), g)
    theirs = torch.autograd.grad(formula(x, loc, delta), (x, loc, delta), g)
    for a, c in zip(ours, theirs):
        assert torch.allclose(a, c, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, (x, loc, delta))


@pytest.mark.parametrize("per", ["token", "sequence"])
def test_flipout_linear_gradients_match_the_explicit_formula(per):
    """Through the handler: y = x locᵀ + s ⊙ ((r ⊙ x)(w − loc)ᵀ); gradients of x, loc and the draw w."""
    torch.manual_seed(3)
    x = torch.randn(2, 4, 5, requires_grad=True)
    loc = torch.randn(3, 5, requires_grad=True)
    noise = 0.3 * torch.randn(3, 5)
    tape = []
    with flipout(per, seed=7) as handler:
        handler.tapes.append(tape)
        w = loc + noise  # a reparameterised draw around loc
        handler.register(w, loc)
        y = flipout_linear(x, w)
    in_shape = (2, 4, 5) if per == "token" else (2, 1, 5)
    out_shape = (2, 4, 3) if per == "token" else (2, 1, 3)
    r, s = _signs(tape[0], in_shape, torch.float32), _signs(tape[1], out_shape, torch.float32)
    g = torch.randn(2, 4, 3)
    ours = torch.autograd.grad(y, (x, loc), g)
    formula = x @ loc.T + ((x * r) @ (loc + noise - loc).T) * s
    assert torch.allclose(y, formula, atol=1e-6)
    theirs = torch.autograd.grad(formula, (x, loc), g)
    for a, c in zip(ours, theirs):
        assert torch.allclose(a, c, atol=1e-5)


def test_flipout_matches_reparameterisation_mean_and_variance():
    torch.manual_seed(0)
    out_dim, in_dim, n = 3, 5, 4000
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
        assert torch.allclose(y.var(0), exact_var, rtol=0.15)
    # Flipout decorrelates two positions with the same input; a shared weight draw does not
    same = x[:1, :1].expand(1, 2, in_dim)
    with flipout():
        y = flipout_linear(same, guide())
    assert not torch.allclose(y[0, 0], y[0, 1])
    y_plain = flipout_linear(same, guide())
    assert torch.allclose(y_plain[0, 0], y_plain[0, 1])
    # and across draws the two positions are uncorrelated under Flipout, fully correlated without
    pairs = []
    for _ in range(400):
        with flipout():
            pairs.append(flipout_linear(same, guide())[0, :, 0] - exact_mean[0, 0, 0])
    pairs = torch.stack(pairs)
    assert abs(torch.corrcoef(pairs.T)[0, 1].item()) < 0.2


def test_flipout_per_sequence_shares_signs_within_a_sequence():
    torch.manual_seed(1)
    loc, scale = torch.zeros(2, 3), torch.ones(2, 3)
    x = torch.ones(1, 4, 3)
    with flipout(per="sequence"):
        w = pyro.sample("w", dist.Normal(loc, scale).to_event(2))
        y = flipout_linear(x, w)
    assert torch.allclose(y[0, 0], y[0, 3])
    with pytest.raises(ValueError, match="token"):
        FlipoutMessenger("batch")


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


def test_outside_the_handler_and_for_unknown_values_the_weight_is_plain():
    x, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    assert active_flipout() is None
    assert torch.equal(flipout_linear(x, w), torch.nn.functional.linear(x, w))
    with flipout() as handler:
        assert active_flipout() is handler
        assert torch.equal(flipout_linear(x, w), torch.nn.functional.linear(x, w))  # no recorded mean
    assert active_flipout() is None


def test_flipout_leaves_point_estimates_alone():
    """AutoDelta (mle/map) draws have no mean: the replayed prior's mean (0) must not be used for Flipout."""
    model = tiny_model("B")
    guide = make_guide("auto_delta", model)
    batch = model.head.collate(tiny_examples(4))
    register_parameters(model, guide)
    with torch.no_grad():
        for name, p in pyro.get_param_store().items():
            if name.startswith("AutoDelta"):
                p.unconstrained().normal_(0, 0.5)
        gt = poutine.trace(guide).get_trace(batch)
        plain = poutine.trace(poutine.replay(model, trace=gt)).get_trace(batch).nodes["logits"]["value"]
        for _ in range(3):
            with flipout():
                flipped = poutine.trace(poutine.replay(model, trace=gt)).get_trace(batch).nodes["logits"]["value"]
            assert torch.allclose(flipped, plain, atol=1e-6)


def test_flipout_perturbs_a_blob_guides_draw_per_example():
    """The same example twice in a batch: one Gaussian draw per layer, different signs, different logits."""
    model = tiny_model("B")
    guide = make_guide("blob", model, eps=0.7)  # std ~ 0.3: visible
    example = tiny_examples(1)[0]
    batch = model.head.collate([example, example])
    with torch.no_grad():
        gt = poutine.trace(guide).get_trace(batch)
        plain = poutine.trace(poutine.replay(model, trace=gt)).get_trace(batch).nodes["logits"]["value"]
        with flipout():  # the guide draws inside the handler (as in an ELBO), which records each draw's mean
            gt = poutine.trace(guide).get_trace(batch)
            flipped = poutine.trace(poutine.replay(model, trace=gt)).get_trace(batch).nodes["logits"]["value"]
        with flipout():  # a draw replayed from outside the handler is applied as the plain matrix it is
            replayed = poutine.trace(poutine.replay(model, trace=gt)).get_trace(batch).nodes["logits"]["value"]
    assert torch.allclose(plain[0], plain[1]) and torch.allclose(replayed[0], replayed[1])
    assert not torch.allclose(flipped[0], flipped[1])


def test_replay_hands_out_the_recorded_bits_in_order():
    loc, value = torch.zeros(3, 4), torch.randn(3, 4)
    x = torch.randn(2, 5, 4)
    tape = []
    with flipout(seed=1) as handler:
        handler.tapes.append(tape)
        handler.register(value, loc)
        y = flipout_linear(x, value)
    with FlipoutReplay(handler.frozen_copy(), tape) as replay:
        replay.register(value, loc)
        assert torch.equal(flipout_linear(x, value), y)
        with pytest.raises(RuntimeError, match="more Flipout layers"):
            flipout_linear(x, value)
    with FlipoutReplay(handler.frozen_copy(), tape) as replay:
        replay.register(value, loc)
        with pytest.raises(RuntimeError, match="another input shape"):
            flipout_linear(torch.randn(4, 9, 4), value)
