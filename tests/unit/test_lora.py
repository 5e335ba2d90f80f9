"""blob_pyro.lora: PEFT injects the adapter; the BLoB variant is plain LoRA until a draw is bound, then uses it."""

import pytest
import torch

from blob_pyro.errors import TargetModuleError
from blob_pyro.lora import ADAPTER, BlobLoraVariant, attach_variants, bind_values, inject_lora, linear_module_names, lora_layers

from .tiny import TinyNet, tiny_examples, tiny_model, tiny_network


def test_inject_lora_freezes_the_base_and_routes_every_layer_through_the_variant():
    net = tiny_network(r=2)
    layers = lora_layers(net)
    assert list(layers) == ["layers.0.proj", "layers.1.proj"]
    for layer in layers.values():
        assert isinstance(layer.lora_variant[ADAPTER], BlobLoraVariant)
        assert layer.lora_A[ADAPTER].weight.shape[0] == 2 and layer.scaling[ADAPTER] == 2.0  # alpha 4 / r 2
        assert not layer.base_layer.weight.requires_grad
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)


def test_unknown_targets_name_the_linear_layers():
    assert linear_module_names(TinyNet()) == ["classifier", "proj"]
    with pytest.raises(TargetModuleError) as err:
        inject_lora(TinyNet(), ["q_proj", "proj"])
    msg = str(err.value)
    assert "['q_proj']" in msg and "classifier, proj" in msg and "\n" not in msg
    assert isinstance(err.value, ValueError)
    assert list(lora_layers(inject_lora(TinyNet(), ["layers.1.proj"]))) == ["layers.1.proj"]  # a full path works


def _nonzero_b(model):
    with torch.no_grad():
        for site in model.sites:
            site.peft_weight().normal_(0, 0.5)


def test_unbound_variant_is_plain_peft_lora():
    model = tiny_model("B")
    _nonzero_b(model)
    batch = model.head.collate(tiny_examples(3))
    with torch.no_grad():
        ours = model.head.logits(model.network, batch)
        for layer in lora_layers(model.network).values():
            layer.lora_variant.pop(ADAPTER)  # PEFT's own LoRA forward
        vanilla = model.head.logits(model.network, batch)
        with model.network.disable_adapter():
            without = model.head.logits(model.network, batch)
    assert torch.allclose(ours, vanilla, atol=1e-6)
    assert not torch.allclose(ours, without)  # the adapter matters: the check can fail
    attach_variants(model.network)
    assert all(isinstance(layer.lora_variant[ADAPTER], BlobLoraVariant)
               for layer in lora_layers(model.network).values())


def test_bound_values_replace_the_factor_for_one_forward_only():
    model = tiny_model("both")
    batch = model.head.collate(tiny_examples(3))
    with torch.no_grad():
        plain = model.head.logits(model.network, batch)
        values = {s.name: torch.full(s.shape, 0.3) for s in model.sites}
        with bind_values(model.sites, values):
            bound = model.head.logits(model.network, batch)
            variants = {id(s.layer.lora_variant[ADAPTER]): s.layer.lora_variant[ADAPTER] for s in model.sites}
            assert all(set(v.values) == {"A", "B"} for v in variants.values())
        model.write_factors(values)  # the same values as PEFT weights: the same output
        written = model.head.logits(model.network, batch)
    assert not torch.allclose(bound, plain)
    assert torch.allclose(bound, written, atol=1e-6)
    assert all(not v.values for v in variants.values())  # unbound after the block


def test_values_are_unbound_even_when_the_forward_fails():
    model = tiny_model("B")
    with pytest.raises(RuntimeError):
        with bind_values(model.sites, {s.name: torch.zeros(s.shape) for s in model.sites}):
            raise RuntimeError("forward failed")
    assert all(not s.layer.lora_variant[ADAPTER].values for s in model.sites)


def test_merging_the_adapter_gives_the_same_function():
    model = tiny_model("B")
    _nonzero_b(model)
    batch = model.head.collate(tiny_examples(3))
    with torch.no_grad():
        before = model.head.logits(model.network, batch)
        merged = model.network.merge_and_unload()  # BlobLoraVariant.merge_safe / merge_unsafe
        after = merged(batch["x"])
    assert torch.allclose(before, after, atol=1e-5)
