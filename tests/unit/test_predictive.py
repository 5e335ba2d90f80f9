"""blob_pyro.predictive: the posterior predictive (softmax of each draw, then the average), batched and in order."""

import pyro
import pytest
import torch
from pyro.infer import Predictive

from blob_pyro.guides import make_guide
from blob_pyro.optim import register_parameters
from blob_pyro.predictive import Prediction, posterior_logits, predict

from .tiny import tiny_examples, tiny_model


def _wide(model, guide_name="blob"):
    """A guide whose draws differ visibly (std 0.25)."""
    guide = make_guide(guide_name, model)
    register_parameters(model, guide)
    with torch.no_grad():
        for name, p in pyro.get_param_store().items():
            if ".rho." in name:
                p.unconstrained().fill_(0.5)
    return guide


def test_predict_keeps_the_data_order():
    model = tiny_model("B")
    guide = _wide(model)
    examples = tiny_examples(9)  # prompts of different lengths: length-sorted batching reorders them internally
    out = predict(model, guide, examples, num_samples=0, batch_size=4, progress=False)
    single = torch.cat([predict(model, guide, [e], num_samples=0, progress=False).probs for e in examples])
    assert isinstance(out, Prediction) and out.logits is None
    assert torch.equal(out.labels, torch.tensor([e.label for e in examples]))
    assert torch.allclose(out.probs, single, atol=1e-6)


def test_mean_prediction_is_deterministic_and_sampling_is_not():
    model = tiny_model("B")
    guide = _wide(model)
    examples = tiny_examples(6)
    m1 = predict(model, guide, examples, num_samples=0, keep_draws=True, progress=False)
    m2 = predict(model, guide, examples, num_samples=0, keep_draws=True, progress=False)
    assert torch.equal(m1.probs, m2.probs) and m1.logits.shape == (1, 6, 2)
    torch.manual_seed(1)
    s1 = predict(model, guide, examples, num_samples=5, keep_draws=True, progress=False)
    torch.manual_seed(2)
    s2 = predict(model, guide, examples, num_samples=5, keep_draws=True, progress=False)
    assert s1.logits.shape == (5, 6, 2) and not torch.allclose(s1.probs, s2.probs)
    assert not torch.allclose(s1.logits[0], s1.logits[1])
    assert torch.allclose(s1.probs, torch.softmax(s1.logits, -1).mean(0), atol=1e-6)  # softmax, then average
    assert torch.allclose(s1.probs.sum(-1), torch.ones(6))
    torch.manual_seed(1)
    again = predict(model, guide, examples, num_samples=5, keep_draws=True, progress=False)
    assert torch.equal(again.probs, s1.probs)  # seeded


def test_mean_prediction_uses_the_guides_median():
    model = tiny_model("B")
    guide = _wide(model)
    batch = model.head.collate(tiny_examples(4))
    from blob_pyro.lora import bind_values

    with torch.no_grad(), bind_values(model.sites, guide.median()):
        expected = model.head.logits(model.network, batch)
    assert torch.allclose(posterior_logits(model, guide, batch, num_samples=0)[0], expected)


def test_sample_batched_draws_one_weight_per_layer_and_fresh_signs():
    model = tiny_model("B")
    guide = _wide(model)
    example = tiny_examples(1)[0]
    batch = model.head.collate([example, example])
    torch.manual_seed(0)
    batched = posterior_logits(model, guide, batch, num_samples=64, sample_batched=True)
    torch.manual_seed(0)
    sequential = posterior_logits(model, guide, batch, num_samples=64)
    assert batched.shape == sequential.shape == (64, 2, 2)
    assert not torch.allclose(batched[0, 0], batched[1, 0])  # the copies are different draws
    # same predictive distribution: the sample means agree within their standard errors
    se = (batched.std(0) ** 2 / 64 + sequential.std(0) ** 2 / 64).sqrt()
    assert torch.all((batched.mean(0) - sequential.mean(0)).abs() < 5 * se + 1e-6)
    out = predict(model, guide, tiny_examples(5), num_samples=3, sample_batched=True, progress=False)
    assert out.probs.shape == (5, 2)


def test_without_flipout_one_draw_is_shared_by_the_batch():
    model = tiny_model("B", flipout=None)
    guide = _wide(model)
    example = tiny_examples(1)[0]
    batch = model.head.collate([example, example])
    logits = posterior_logits(model, guide, batch, num_samples=3)
    assert torch.allclose(logits[:, 0], logits[:, 1]) and not torch.allclose(logits[0], logits[1])
    with pytest.raises(ValueError, match="sample_batched needs Flipout"):
        posterior_logits(model, guide, batch, num_samples=3, sample_batched=True)
    flip = tiny_model("B")  # model.flipout = "token", switched off for one call
    guide = _wide(flip)
    logits = posterior_logits(flip, guide, batch, num_samples=2, use_flipout=False)
    assert torch.allclose(logits[:, 0], logits[:, 1])
    logits = posterior_logits(flip, guide, batch, num_samples=2)
    assert not torch.allclose(logits[:, 0], logits[:, 1])


def test_negative_num_samples_is_refused():
    model = tiny_model("B")
    guide = make_guide("blob", model)
    with pytest.raises(ValueError, match="num_samples"):
        predict(model, guide, tiny_examples(2), num_samples=-1, progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        posterior_logits(model, guide, model.head.collate(tiny_examples(2)), num_samples=-1)


def test_lora_dropout_stays_on_at_prediction():
    """mcdropout: with a point-estimate guide, two single passes differ because LoRA dropout is on."""
    model = tiny_model("B", lora_dropout=0.5)
    guide = make_guide("auto_delta", model)
    register_parameters(model, guide)
    with torch.no_grad():
        for name, p in pyro.get_param_store().items():
            if name.startswith("AutoDelta"):
                p.unconstrained().normal_(0, 1.0)  # B = 0 would hide the dropout
    examples = tiny_examples(6)
    torch.manual_seed(1)
    one = predict(model, guide, examples, num_samples=1, progress=False).probs
    torch.manual_seed(2)
    two = predict(model, guide, examples, num_samples=1, progress=False).probs
    assert not torch.allclose(one, two)
    drops = [m for n, m in model.network.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.training for m in drops)


def test_pyro_predictive_with_explicit_return_sites():
    model = tiny_model("both")
    guide = _wide(model)
    batch = model.head.collate(tiny_examples(3))
    out = Predictive(model, guide=guide, num_samples=4, return_sites=["logits", "obs"])(batch)
    assert set(out) == {"logits", "obs"}
    assert out["logits"].shape == (4, 3, 2) and out["obs"].shape == (4, 3)
    assert not torch.allclose(out["logits"][0], out["logits"][1])  # different posterior draws


def test_bf16_autocast_prediction_stays_close_to_float32():
    model = tiny_model("B")
    guide = _wide(model)
    examples = tiny_examples(8)
    full = predict(model, guide, examples, num_samples=0, progress=False).probs
    half = predict(model, guide, examples, num_samples=0, progress=False, autocast_dtype=torch.bfloat16).probs
    assert half.dtype == torch.float32 and (half - full).abs().max() < 0.02
