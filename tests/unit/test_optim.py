"""blob_pyro.optim: registering parameters without data, the two learning-rate groups the guide names, warm-up."""

import random

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal

from blob_pyro.config import FitConfig
from blob_pyro.errors import ConfigError
from blob_pyro.guides import GUIDES, make_guide
from blob_pyro.infer import make_step
from blob_pyro.optim import param_groups, register_parameters, scale_parameters, set_lora_dropout, warmup_linear

from .tiny import tiny_examples, tiny_model


def test_warmup_then_linear_decay():
    f = warmup_linear(100, 0.06)
    values = [f(s) for s in range(101)]
    assert values[0] == pytest.approx(1 / 7) and values[5] == pytest.approx(6 / 7) and values[6] == 1.0
    assert all(a < b for a, b in zip(values[:6], values[1:7]))
    assert all(a >= b for a, b in zip(values[6:], values[7:]))
    assert values[100] == 0.0 and values[53] == pytest.approx(47 / 94)
    assert warmup_linear(10, 0.0)(0) == 1.0


def _rng_state():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


@pytest.mark.parametrize("guide_name", GUIDES)
def test_register_parameters_needs_no_data_and_leaves_the_rngs_alone(guide_name):
    model = tiny_model("both")
    guide = make_guide(guide_name, model)
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    before = _rng_state()
    params = register_parameters(model, guide)
    after = _rng_state()
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
    assert before[2][0] == after[2][0] and np.array_equal(before[2][1], after[2][1]) and before[2][2:] == after[2][2:]
    assert list(params) == sorted(params) and params == dict(pyro.get_param_store().named_parameters())
    network = [k for k in params if k.startswith("network$$$")]
    assert any("classifier" in k for k in network)  # the deterministic head copy (modules_to_save)
    assert not any("lora_" in k for k in network)  # both factors are Bayesian: the guide owns them
    guide_params = [k for k in params if not k.startswith("network$$$")]
    for site in model.sites:
        assert any(site.name in k for k in guide_params), site.name
    assert register_parameters(model, guide).keys() == params.keys()  # registering twice changes nothing


def test_register_parameters_includes_the_deterministic_factor():
    model = tiny_model("B")
    params = register_parameters(model, make_guide("blob", model))
    assert {k for k in params if k.endswith("lora_A.default.weight")} == {
        f"network$$$base_model.model.layers.{i}.proj.lora_A.default.weight" for i in (0, 1)}
    assert not any(k.endswith("lora_B.default.weight") for k in params)  # frozen: the guide owns lora_B


def _groups(guide_name, **kwargs):
    model = tiny_model("B")
    guide = make_guide(guide_name, model)
    params = register_parameters(model, guide)
    return guide, params, param_groups(params, guide, lr=1e-3, scale_lr=kwargs.pop("scale_lr", 1e-2), **kwargs)


@pytest.mark.parametrize("guide_name, scale_names", [
    ("blob", (".rho.",)), ("lowrank", (".rho.", ".corr_factor.")), ("auto_normal", (".scales.",)), ("auto_delta", ())])
def test_scale_parameters_go_to_the_scale_group(guide_name, scale_names):
    guide, params, (loc, scale) = _groups(guide_name, weight_decay=0.1)
    assert (loc["lr"], scale["lr"]) == (1e-3, 1e-2) and loc["weight_decay"] == scale["weight_decay"] == 0.1
    assert sorted(loc["names"] + scale["names"]) == sorted(params)
    assert [id(p) for p in loc["params"]] == [id(params[n]) for n in loc["names"]]
    for name in scale["names"]:
        assert any(s in name for s in scale_names), name
    for name in loc["names"]:
        assert not any(s in name for s in scale_names), name
    if scale_names:
        for s in scale_names:
            assert any(s in n for n in scale["names"])
    else:
        assert scale["names"] == [] and scale_parameters(guide) == []


def test_a_guide_that_does_not_name_its_scales_cannot_have_its_own_scale_lr():
    model = tiny_model("B")
    guide = AutoDiagonalNormal(model.latents)
    params = register_parameters(model, guide)
    assert scale_parameters(guide) is None
    with pytest.raises(ConfigError) as err:
        param_groups(params, guide, lr=1e-3, scale_lr=1e-2)
    assert "scale_parameters()" in str(err.value) and "AutoDiagonalNormal" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        make_step(model, guide, FitConfig(lr=1e-3, scale_lr=1e-2))
    for scale_lr in (None, 1e-3):  # one rate for everything: nothing to tell apart
        loc, scale = param_groups(params, guide, lr=1e-3, scale_lr=scale_lr)
        assert sorted(loc["names"]) == sorted(params) and scale["names"] == []


def test_a_custom_guide_names_its_scales_with_scale_parameters():
    model = tiny_model("B")

    class Named(AutoDiagonalNormal):
        def scale_parameters(self):
            return [self.scale_unconstrained]  # AutoDiagonalNormal's std (a PyroParam)

    guide = Named(model.latents)
    params = register_parameters(model, guide)
    loc, scale = param_groups(params, guide, lr=1e-3, scale_lr=1e-2)
    assert scale["names"] == ["Named.scale"] and "Named.loc" in loc["names"]


def test_elbo_step_trains_each_group_at_its_rate():
    """One AdamW step moves a parameter by ~lr (Adam's first step is lr · sign(grad)): the means by lr, rho by
    scale_lr."""
    model = tiny_model("B")
    guide = make_guide("blob", model)
    step = make_step(model, guide, FitConfig(max_steps=100, lr=1e-4, scale_lr=1e-2, warmup_ratio=0.0))
    store = pyro.get_param_store()
    before = {k: v.detach().clone() for k, v in store.named_parameters()}
    step.step(model.head.collate(tiny_examples(4)), 1 / 16, 16)
    moved = {k: (v.detach() - before[k]).abs().max().item() for k, v in store.named_parameters()}
    rho = [v for k, v in moved.items() if ".rho." in k]
    locs = [v for k, v in moved.items() if ".loc." in k or k.startswith("network$$$")]
    assert rho and locs
    assert all(v == pytest.approx(1e-2, rel=1e-3) for v in rho)
    assert all(v <= 1e-4 * 1.001 for v in locs) and max(locs) == pytest.approx(1e-4, rel=1e-3)


def test_set_lora_dropout_turns_on_only_lora_dropout():
    model = tiny_model("B", lora_dropout=0.2)
    net = model.network
    net.train()
    set_lora_dropout(net)
    drops = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert drops and all("lora_dropout" in n and m.training and m.p == 0.2 for n, m in drops.items())
    assert not any(m.training for n, m in net.named_modules() if not isinstance(m, torch.nn.Dropout) and
                   "lora_dropout" not in n)
    plain = tiny_model("B").network
    set_lora_dropout(plain)
    assert not any(m.training for m in plain.modules())


def test_a_plain_pyro_guide_without_scales_registers_too():
    def model_fn():
        pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    class Wrapped:
        network = torch.nn.Linear(2, 2)

    guide = make_guide("auto_delta", model_fn)
    params = register_parameters(Wrapped, guide)
    assert "AutoDelta.w" in params and "network$$$weight" in params


def _own_run(seed: int):
    """A model and guide with their own values: network from ``seed``, guide means set to ``seed``-dependent
    numbers; the param store is cleared afterwards, as load_run leaves it."""
    from blob_pyro.guides import make_guide

    from .tiny import tiny_model

    pyro.clear_param_store()
    model = tiny_model("B", seed=seed)
    guide = make_guide("blob", model)
    with torch.no_grad():
        guide()
        for name, p in guide.named_parameters():
            if "loc" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    pyro.clear_param_store()
    return model, guide


def test_two_runs_in_one_process_never_predict_with_each_others_values():
    """Both runs name their parameters alike; a call used to take the param store's (the other run's) values and
    write them into its modules. Prediction and diagnostics now run each on its own."""
    from blob_pyro.arviz_io import joint_draws
    from blob_pyro.diagnostics import log_importance_ratios
    from blob_pyro.predictive import predict

    from .tiny import tiny_examples

    examples = tiny_examples(6)
    a, b = _own_run(1), _own_run(2)

    def probs(run):
        return predict(*run, examples, num_samples=0, progress=False).probs

    def draws(run):
        return torch.stack([logits for _, logits in joint_draws(*run, examples, num_samples=2, seed=0)])

    def ratios(run):
        return log_importance_ratios(*run, [run[0].head.collate(examples)], num_samples=3, seed=0)["log_ratio"]

    alone = {}
    for name, run in (("a", a), ("b", b)):  # each on its own, in an empty store
        pyro.clear_param_store()
        alone[name] = (probs(run), draws(run), ratios(run))
    assert not torch.allclose(alone["a"][0], alone["b"][0])  # the check can fail: the runs differ
    pyro.clear_param_store()
    for first, second in (("a", "b"), ("b", "a"), ("a", "b")):  # interleaved in one store, both orders
        for name in (first, second):
            run = {"a": a, "b": b}[name]
            assert torch.equal(probs(run), alone[name][0])
            assert torch.equal(draws(run), alone[name][1])
            assert (ratios(run) == alone[name][2]).all()
