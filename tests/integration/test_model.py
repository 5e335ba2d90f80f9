"""The Pyro model on real backbones: MiniLM's and the tiny Llama's sample sites, the multiple-choice head on MiniLM,
bf16 prediction on MiniLM, gradient checkpointing through Hugging Face's Llama blocks.

(The model's contracts on the tiny in-file network: tests/unit/test_model.py, test_guides.py, test_kl.py,
test_poutine_*.py, test_infer.py.)"""

import math

import pytest
import torch
from helpers import checkpointing_gradients, toy_examples
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from blob_pyro.config import FitConfig, RunConfig
from blob_pyro.guides import make_guide
from blob_pyro.infer import make_step
from blob_pyro.predictive import predict
from blob_pyro.training import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _minilm(factor="B", dataset="winogrande_s", **kw):
    cfg = RunConfig.from_dict({"model": "minilm", "dataset": dataset, "bayesian_factor": factor, "max_length": 32,
                               **kw})
    return build_model(cfg.resolve(), num_data=64)


def _llama(path, factor="A", **kw):
    cfg = RunConfig.from_dict({"model": str(path), "dataset": "winogrande_s", "bayesian_factor": factor,
                               "max_length": 48, **kw})
    return build_model(cfg.resolve(), num_data=16)


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
    batch = model.head.collate(toy_examples(2))
    trace = poutine.trace(model).get_trace(batch)
    latent = [n for n, s in trace.nodes.items()
              if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]
    assert latent == names
    assert model.head.kind == "multiple_choice" and trace.nodes["logits"]["value"].shape == (2, 2)


def test_causal_lm_sites_include_lm_head(tiny_llama_dir):
    model = _llama(tiny_llama_dir, "B")
    names = {s.name: s.shape for s in model.sites}
    assert names["model.layers.0.self_attn.q_proj.lora_B"] == (32, 8)
    assert names["model.layers.1.self_attn.v_proj.lora_B"] == (16, 8)  # 2 kv heads x 8 dims
    assert names["lm_head.lora_B"] == (30522, 8)
    assert len(names) == 5
    assert model.head.kind == "causal_lm"


def test_multiple_choice_head_encodes_only_present_options():
    """Packing the present options gives the full (B, K) layout's scores, -inf where an option is absent."""
    from blob_pyro.data import Example

    model = _minilm(dataset="arc_easy")  # K = 5 slots
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


def test_bf16_cpu_prediction_stays_close_to_float32():
    """The CPU benchmark runs under bf16 autocast: its probabilities must stay close to float32's."""
    model = _minilm(dataset="arc_easy", max_length=48)
    guide = make_guide("blob", model)
    examples = toy_examples(12, num_classes=4, seed=3)
    full = predict(model, guide, examples, num_samples=0, batch_size=6, progress=False)
    half = predict(model, guide, examples, num_samples=0, batch_size=6, progress=False, autocast_dtype=torch.bfloat16)
    assert full.probs.shape == half.probs.shape == (12, 5)
    assert half.probs.dtype == torch.float32
    assert torch.allclose(half.probs.sum(-1), torch.ones(12))
    assert (half.probs - full.probs).abs().max() < 0.02


@pytest.mark.parametrize("factor", ["A", "B"])
def test_gradient_checkpointing_replays_draws_and_signs_through_llama_blocks(tiny_llama_dir, factor):
    """Hugging Face's decoder blocks take keyword arguments and caches; the recomputation must see the forward's
    LoRA draws and Flipout signs (the tiny in-file network checks the mechanism: tests/unit/test_backbone.py)."""
    grads, saved = checkpointing_gradients(
        lambda ckpt: _llama(tiny_llama_dir, factor, gradient_checkpointing=ckpt), toy_examples(4))
    assert saved[True] < saved[False]  # the blocks' activations were not kept
    for where in ("inside", "outside"):
        plain, ckpt = grads[False, where], grads[True, where]
        assert plain.keys() == ckpt.keys() and any("rho" in k for k in plain)
        for name in plain:
            assert torch.allclose(plain[name], ckpt[name], rtol=1e-4, atol=1e-7), (where, name)


@pytest.mark.parametrize("guide_name", ["blob", "lowrank"])
def test_bf16_step_on_the_tiny_llama(tiny_llama_dir, guide_name):
    model = _llama(tiny_llama_dir, "B")
    guide = make_guide(guide_name, model)
    step = make_step(model, guide, FitConfig(max_steps=4, lr=1e-2), autocast_dtype=torch.bfloat16, device="cpu")
    batch = model.head.collate(toy_examples(4))
    records = [step.step(batch, 1 / 16, 16) for _ in range(3)]
    assert all(math.isfinite(r[k]) for r in records for k in ("loss", "nll", "kl"))
    assert guide.median()["lm_head.lora_B"].abs().sum() > 0  # the means moved, lm_head's too
