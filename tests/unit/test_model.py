"""blob_pyro.model: one sample site per Bayesian factor, the prior part alone, the likelihood in a data plate."""

import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from blob_pyro.model import BlobModel
from blob_pyro.priors import LaplacePrior, NormalPrior

from .tiny import SITE_SHAPES, TinyHead, TinyNet, tiny_examples, tiny_model


def _latent_names(trace):
    return [n for n, s in trace.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]


@pytest.mark.parametrize("factor", ["A", "B", "both"])
def test_sites_are_named_after_module_and_factor(factor):
    model = tiny_model(factor)
    factors = ("A", "B") if factor == "both" else (factor,)
    expected = {f"{path}.lora_{f}": shape for path in ("layers.0.proj", "layers.1.proj") for f in factors
                for shape in [SITE_SHAPES[f][path]]}
    assert {s.name: s.shape for s in model.sites} == expected
    for site in model.sites:
        assert site.name == f"{site.module_path}.lora_{site.factor}"
        assert tuple(site.peft_weight().shape) == site.shape and not site.peft_weight().requires_grad
    batch = model.head.collate(tiny_examples(3))
    assert _latent_names(poutine.trace(model).get_trace(batch)) == [s.name for s in model.sites]


def test_latents_are_the_prior_part_and_need_no_data():
    model = tiny_model("both", prior=NormalPrior(0.3))
    trace = poutine.trace(model.latents).get_trace()
    assert _latent_names(trace) == [s.name for s in model.sites]
    assert "obs" not in trace.nodes and "logits" not in trace.nodes
    for site in model.sites:
        fn = trace.nodes[site.name]["fn"]
        assert isinstance(fn, dist.Independent) and isinstance(fn.base_dist, dist.Normal)
        assert fn.event_shape == site.shape and fn.batch_shape == ()
        assert torch.all(fn.base_dist.loc == 0) and torch.all(fn.base_dist.scale == 0.3)
    assert set(model.prior_distributions()) == {s.name for s in model.sites}


def test_likelihood_is_categorical_in_a_data_plate_of_size_n():
    model = tiny_model("B", num_data=40)
    batch = model.head.collate(tiny_examples(4))
    trace = poutine.trace(model).get_trace(batch)
    obs = trace.nodes["obs"]
    assert obs["is_observed"] and torch.equal(obs["value"], batch["labels"])
    assert isinstance(obs["fn"], dist.Categorical) and obs["fn"].logits.shape == (4, 2)
    assert obs["scale"] == pytest.approx(40 / 4)  # N / B
    assert trace.nodes["data"]["fn"].size == 40
    assert trace.nodes["logits"]["value"].shape == (4, 2)
    # a batch larger than N (prediction on many examples) still works: the plate grows to the batch
    big = model.head.collate(tiny_examples(50))
    assert poutine.trace(model).get_trace(big).nodes["obs"]["scale"] == pytest.approx(1.0)


def test_prior_is_swapped_by_one_argument():
    model = tiny_model("A", prior=LaplacePrior(0.1))
    p = model.prior_distributions()[model.sites[0].name]
    assert isinstance(p.base_dist, dist.Laplace) and float(p.base_dist.scale.max()) == pytest.approx(0.1)
    assert isinstance(tiny_model("A").prior, NormalPrior) and tiny_model("A").prior.scale == 0.2  # the paper's


def test_init_loc_is_pefts_init_and_write_factors_copies_values():
    model = tiny_model("both")
    for site in model.sites:
        init = model.init_loc_fn({"name": site.name})
        assert torch.equal(init, site.peft_weight().detach())
        if site.factor == "B":
            assert torch.count_nonzero(init) == 0  # PEFT starts B at zero
        else:
            assert init.abs().sum() > 0
    values = {s.name: torch.full(s.shape, 0.5) for s in model.sites}
    model.write_factors(values)
    assert all(torch.equal(s.peft_weight().detach(), values[s.name]) for s in model.sites)


def test_parameter_counts():
    model = tiny_model("B")
    counts = model.parameter_counts()
    bayes = sum(8 * 2 for _ in range(2))  # two (8, 2) lora_B factors
    assert counts["bayesian_entries"] == bayes
    trainable = sum(p.numel() for p in model.network.parameters() if p.requires_grad)
    assert counts["deterministic"] == trainable > 0  # lora_A and the classifier copy
    assert counts["frozen"] + bayes + trainable == sum(p.numel() for p in model.network.parameters())


def test_bad_arguments_are_refused():
    from blob_pyro.lora import inject_lora

    net = inject_lora(TinyNet(), ["proj"], r=2)
    with pytest.raises(ValueError, match="bayesian_factor"):
        BlobModel(net, TinyHead(), bayesian_factor="C")
    with pytest.raises(ValueError, match="flipout"):
        BlobModel(net, TinyHead(), flipout="layer")
    with pytest.raises(ValueError, match="inject_lora"):
        BlobModel(TinyNet(), TinyHead())


# ---- the network's registration: pyro.module's statements, the walk cached ---------------------------
def _param_sites(fn):
    trace = poutine.trace(fn).get_trace()
    return [(n, s["value"]) for n, s in trace.nodes.items() if s["type"] == "param"]


def test_module_registration_makes_pyro_modules_param_statements():
    import pyro

    from blob_pyro.model import ModuleRegistration

    model = tiny_model("B")
    register = ModuleRegistration("network", model.network)
    expected = _param_sites(lambda: pyro.module("network", model.network, update_module_params=True))
    for _ in range(2):  # the first call walks the tree, the second reads the walk it kept
        got = _param_sites(register)
        assert [n for n, _ in got] == [n for n, _ in expected] and all(a is b for (_, a), (_, b) in zip(got, expected))
    assert any(n.endswith("classifier.modules_to_save.default.weight") for n, _ in got)


def test_module_registration_sees_a_changed_tree_and_the_param_stores_tensors():
    import pyro

    from blob_pyro.model import ModuleRegistration

    model = tiny_model("B")
    net = model.network
    register = ModuleRegistration("network", net)
    register()
    names = lambda: [n for n, _ in _param_sites(register)]  # noqa: E731
    frozen = next(p for n, p in net.named_parameters() if n.endswith("layers.0.proj.base_layer.bias"))
    frozen.requires_grad_(True)  # unfrozen after the walk: registered from the next call on
    assert any(n.endswith("layers.0.proj.base_layer.bias") for n in names())
    frozen.requires_grad_(False)
    assert not any(n.endswith("layers.0.proj.base_layer.bias") for n in names())
    head = next(m for n, m in net.named_modules() if n.endswith("classifier.modules_to_save"))
    head["default"] = torch.nn.Linear(8, 2)  # a new head module: its parameters are the ones registered
    sites = dict(_param_sites(register))
    new_weight = next(v for n, v in sites.items() if n.endswith("classifier.modules_to_save.default.weight"))
    assert new_weight is head["default"].weight
    # a param store holding another tensor under a name: the module takes it, as pyro.module does
    name = next(n for n in sites if n.endswith("classifier.modules_to_save.default.bias"))
    with pyro.get_param_store().scope():
        other = torch.nn.Parameter(torch.full((2,), 7.0))
        pyro.param(name, other)
        register()
        assert head["default"].bias is other
    pyro.module("network", net, update_module_params=True)  # back to the outer store's tensor, as before
    assert register() is net and head["default"].bias is not other
