"""blob_pyro.compiled: the network part through torch.compile computes what the eager network computes.

Each test compiles the tiny network (a few seconds on one thread), so the cases are few and each checks much.
"""

import pyro
import pytest
import torch

from blob_pyro.config import FitConfig, RunConfig
from blob_pyro.errors import ConfigError, ModelError
from blob_pyro.guides import make_guide
from blob_pyro.infer import fit
from blob_pyro.lora import tap_layers
from blob_pyro.poutine import flipout
from blob_pyro.poutine.flipout import SignPool, flipout_apply, sign_bytes
from blob_pyro.predictive import posterior_logits

from .tiny import store_snapshot, tiny_examples, tiny_model, tiny_run


@pytest.fixture(autouse=True, scope="module")
def _room_for_every_graph():
    """Every test compiles anew; at Dynamo's cap a call would fall back to eager without a word."""
    before = torch._dynamo.config.cache_size_limit
    torch._dynamo.config.cache_size_limit = 64
    yield
    torch._dynamo.config.cache_size_limit = before


def _counted(fn, calls: list):
    def counted(*args):
        calls.append(1)
        return fn(*args)
    return counted


def _train(compiled: bool, *, factor="B", flipout_per="token", guide="blob", lora_dropout=0.0, steps=5, n=16,
           **compile_kwargs):
    pyro.clear_param_store()
    model = tiny_model(factor, num_data=n, flipout=flipout_per, lora_dropout=lora_dropout)
    net = model.compile_network(**compile_kwargs) if compiled else None
    if net is not None:  # the ELBO step takes the latent densities and the logged KL from the compiled kernel
        net.kernel_calls = {"log_densities": []}
        for name, calls in net.kernel_calls.items():
            setattr(net, name, _counted(getattr(net, name), calls))
    g = make_guide(guide, model)
    log = fit(model, g, tiny_examples(n), FitConfig(max_steps=steps, batch_size=4, lr=1e-2, seed=3,
                                                    kl_schedule="standard"), progress=False)
    return model, g, net, [r["loss"] for r in log], store_snapshot()


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("factor, per, dropout", [("B", "token", 0.0), ("A", "sequence", 0.1), ("both", "token", 0.0)])
def test_training_compiled_matches_eager(factor, per, dropout):
    torch._dynamo.reset()
    *_, eager_losses, eager_params = _train(False, factor=factor, flipout_per=per, lora_dropout=dropout)
    graphs = _graphs()
    model, _, net, losses, params = _train(True, factor=factor, flipout_per=per, lora_dropout=dropout)
    # the first call of the batch shape ran eagerly and counted its signs; every later step ran one graph; the
    # densities of the unvalidated steps (all but the first) another, which also gives their logged KL (the
    # validated first step logs its KL eagerly)
    assert net.calls == {"eager": 1, "compiled": 4}
    assert {k: len(v) for k, v in net.kernel_calls.items()} == {"log_densities": 4}
    assert _graphs() - graphs == 2
    (nbytes,) = net.sign_bytes.values()
    per_token = {"token": 4 * 3, "sequence": 4}[per]  # signs per input row: B x T tokens or B sequences
    widths = {"A": [(6, 2), (8, 2)], "B": [(2, 8), (2, 8)], "both": [(6, 2), (2, 8), (8, 2), (2, 8)]}[factor]
    assert nbytes == sum(sign_bytes(per_token * i) + sign_bytes(per_token * o) for i, o in widths)
    # the same draws and signs; only Inductor's rounding may differ
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-6, atol=1e-6)
    assert params.keys() == eager_params.keys()
    for name in params:
        torch.testing.assert_close(params[name], eager_params[name], rtol=1e-5, atol=1e-6)


def test_compiled_density_kernel_computes_the_eager_numbers_and_gradients():
    """The latent sites' float64 densities and closed-form KL as a compiled graph: Inductor's fused loops may sum in
    another order, so the numbers and gradients agree to float64 rounding, not bit for bit."""
    from blob_pyro.poutine.float64 import normal_kl_sums, normal_log_densities

    torch._dynamo.reset()
    net = tiny_model("both").compile_network()
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 2), (2, 6), (8, 2), (2, 6), (3, 3)]  # runs of equal sizes, and a lone site
    sizes = tuple(a * b for a, b in shapes)

    def inputs():
        gen.manual_seed(0)
        locs = [(0.1 * torch.randn(s, generator=gen)).requires_grad_() for s in shapes]
        scales = [(0.05 + 0.1 * torch.rand(s, generator=gen)).requires_grad_() for s in shapes]
        values = [loc + scale * torch.randn(s, generator=gen) for loc, scale, s in zip(locs, scales, shapes)]
        p_loc = torch.zeros(sum(sizes), dtype=torch.float64)
        p_scale = torch.full((sum(sizes),), 0.2, dtype=torch.float64)
        return locs, scales, values, p_loc, p_scale

    out = {}
    for name, densities in (("eager", normal_log_densities), ("compiled", net.log_densities)):
        locs, scales, values, p_loc, p_scale = inputs()
        log_q, log_p, kl = densities(values, p_loc, p_scale, locs, scales, sizes)
        assert log_q.shape == log_p.shape == kl.shape == (len(shapes),) and log_q.dtype == torch.float64
        assert not kl.requires_grad
        (log_q.sum() - 2 * log_p.sum()).backward()
        with torch.no_grad():
            kl_alone = normal_kl_sums(locs, scales, p_loc, p_scale, sizes)  # what a step without the densities logs
        torch.testing.assert_close(kl, kl_alone, rtol=1e-12, atol=1e-12)
        out[name] = (log_q.detach(), log_p.detach(), kl, [t.grad for t in locs + scales])
    assert torch.equal(out["eager"][2], normal_kl_sums(*inputs()[:2], *inputs()[3:], sizes))  # eager: the same casts
    for eager, compiled in zip(out["eager"][:3], out["compiled"][:3]):
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    for eager, compiled in zip(out["eager"][3], out["compiled"][3]):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)  # float32 parameters' gradients


def test_the_cpp_wrapper_computes_what_the_python_wrapper_computes():
    """compile_cpp_wrapper: the same kernels called from C++ instead of Python: the same numbers, bit for bit."""
    torch._dynamo.reset()
    *_, py_losses, py_params = _train(True)
    _, _, net, losses, params = _train(True, options={"cpp_wrapper": True})
    assert net.compile_kwargs["options"] == {"fallback_random": True, "cpp_wrapper": True}
    assert net.calls == {"eager": 1, "compiled": 4}
    assert losses == py_losses
    assert params.keys() == py_params.keys() and all(torch.equal(params[k], py_params[k]) for k in params)


def test_the_elbo_step_of_a_compiled_network_takes_fused_adamw():
    """One kernel for all parameters where the numbers already differ from the eager CPU step's (they do here by
    float32 rounding: the training test above bounds the parameters with it); the eager step keeps the
    multi-tensor kernels, bit-identical to torch's per-tensor loop."""
    from blob_pyro.infer import make_step

    for compiled in (False, True):
        pyro.clear_param_store()
        model = tiny_model("B")
        if compiled:
            model.compile_network()  # lazy: nothing compiles until the network is called
        step = make_step(model, make_guide("blob", model), FitConfig(max_steps=3))
        defaults = step.optimizer.defaults
        assert (defaults["fused"], defaults["foreach"]) == ((True, None) if compiled else (None, True))


def test_paper_preset_compiled_matches_eager():
    """The paper's step (factor A, AdamW on the NLL, SGD on the closed-form KL) runs backward after its handlers
    exit: the graph keeps what backward needs."""
    torch._dynamo.reset()
    out = {}
    for compiled in (False, True):
        run = tiny_run(RunConfig.from_dict({"preset": "paper", "max_steps": 5, "batch_size": 4, "seed": 3}), num_data=16)
        net = run.model.compile_network() if compiled else None
        log = fit(run.model, run.guide, tiny_examples(16), run.config.fit, progress=False)
        out[compiled] = ([r["loss"] for r in log], store_snapshot(), net)
    assert out[True][2].calls == {"eager": 1, "compiled": 4}
    torch.testing.assert_close(torch.tensor(out[True][0]), torch.tensor(out[False][0]), rtol=1e-6, atol=1e-6)
    for name, value in out[True][1].items():
        torch.testing.assert_close(value, out[False][1][name], rtol=1e-5, atol=1e-6)


def test_point_estimate_runs_compiled_from_the_first_step():
    torch._dynamo.reset()
    *_, eager_losses, eager_params = _train(False, guide="auto_delta")
    model, _, net, losses, params = _train(True, guide="auto_delta")
    assert net.calls == {"eager": 0, "compiled": 5} and net.sign_bytes == {}  # no Flipout: no signs to count
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-6, atol=1e-6)
    for name in params:
        torch.testing.assert_close(params[name], eager_params[name], rtol=1e-5, atol=1e-6)


def test_prediction_new_shapes_and_taps():
    torch._dynamo.reset()
    model = tiny_model("B", num_data=16)
    guide = make_guide("blob", model)
    net = model.compile_network()
    with torch.no_grad():
        guide(model.head.collate(tiny_examples(2)))  # the guide's parameters exist
    for n in (4, 4, 6, 6):  # every shape: first call eager, the next compiled
        batch = model.head.collate(tiny_examples(n))
        torch.manual_seed(7)
        compiled = posterior_logits(model, guide, batch, num_samples=3)
        model.compiled = None
        torch.manual_seed(7)
        eager = posterior_logits(model, guide, batch, num_samples=3)
        model.compiled = net
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    # per shape: the first of its three draws eager, then 2 + 3 compiled
    assert net.calls == {"eager": 2, "compiled": 10} and len(net.sign_bytes) == 2
    # a tap's hooks need the eager tensors: tapped calls do not enter the graph
    seen = []
    from blob_pyro.lora import lora_layers

    with tap_layers(lora_layers(model.network), lambda path, x, h, y: seen.append(path)), torch.no_grad():
        posterior_logits(model, guide, model.head.collate(tiny_examples(4)), num_samples=1)
    assert len(seen) == 2 and net.calls["eager"] == 3


def test_sign_pool_is_the_handlers_draws_and_checks_its_use():
    torch.manual_seed(0)
    sizes = [36, 96, 8, 200]
    with flipout("token", seed=11) as handler:
        one_by_one = [handler.random_bits(n, "cpu") for n in sizes]
    assert handler.bytes_drawn == sum(sign_bytes(n) for n in sizes)
    with flipout("token", seed=11) as handler:
        pool = SignPool(handler.draw_bytes(sum(sign_bytes(n) for n in sizes), "cpu"), handler.per)
        pooled = [pool.random_bits(n, "cpu") for n in sizes]
    pool.check_used()
    for a, b in zip(one_by_one, pooled):
        assert torch.equal(a, b)
    # the same signs give the same Flipout output as the handler's own path
    x, w, loc = torch.randn(2, 3, 6), torch.randn(4, 6), torch.randn(4, 6)
    with flipout("token", seed=5) as h:
        ref = flipout_apply(x, w, loc, h)
    with flipout("token", seed=5) as h:
        assert torch.equal(flipout_apply(x, w, loc, SignPool(h.draw_bytes(sign_bytes(36) + sign_bytes(24), "cpu"),
                                                               "token")), ref)
    short = SignPool(torch.zeros(16, dtype=torch.uint8), "token")
    short.random_bits(8, "cpu")
    with pytest.raises(RuntimeError, match="took 8 bytes of Flipout signs where 16 were drawn"):
        short.check_used()


def test_compile_refuses_gradient_checkpointing():
    from blob_pyro.backbone import enable_gradient_checkpointing

    model = tiny_model("B")
    enable_gradient_checkpointing(model.network)
    with pytest.raises(ModelError, match="gradient-checkpointed"):
        model.compile_network()
    with pytest.raises(ConfigError, match="compile and gradient_checkpointing exclude each other"):
        RunConfig.from_dict({"method": "blob", "compile": True, "gradient_checkpointing": True}).validate()
    with pytest.raises(ConfigError, match="compile is not supported with load_in_8bit"):
        RunConfig.from_dict({"method": "blob", "compile": True, "load_in_4bit": True}).validate()
