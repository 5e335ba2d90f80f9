"""The cloze head on the tiny random Llama: its scores are the model's own log-probabilities of each option's tokens,
training moves them, Flipout and sample-batched prediction treat every (example, option) sequence as its own row,
and a cloze run goes through ArviZ export, the posterior predictive checks and the run folder like the other heads.

(Batching, padding, normalisation and refusals on a stand-in network: tests/unit/test_heads.py.)"""

import math

import pytest
import torch
from helpers import toy_examples

from blob_pyro.arviz_io import to_inference_data
from blob_pyro.config import FitConfig, RunConfig
from blob_pyro.data import Example
from blob_pyro.guides import make_guide
from blob_pyro.infer import fit
from blob_pyro.metrics import compute_metrics
from blob_pyro.optim import register_parameters
from blob_pyro.ppc import check_idata
from blob_pyro.predictive import posterior_logits, predict
from blob_pyro.training import Run, build_model, load_run, train_run

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(path, **kw):
    return RunConfig.from_dict({"model": str(path), "dataset": "arc_easy", "head": "cloze", "max_length": 48,
                                "bayesian_factor": "B", **kw}).resolve()


def _examples():
    """Two toy questions with 2 of the 5 ARC slots filled, and one whose first option is two tokens."""
    two = Example(2, "", ("dark green", "red", "blue"),
                  tuple(("which colour is the grass?", t) for t in ("dark green", "red", "blue")), label=0)
    return [*toy_examples(2), two]


@torch.no_grad()
def _by_hand(llama, tok, question, text):
    """Σ_t log p(option token t | [CLS] Question: q\\nAnswer: <tokens before t>) from the plain Llama."""
    ctx = tok(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]
    option = tok(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tok.cls_token_id] + ctx + option])
    logp = torch.log_softmax(llama(input_ids=ids).logits[0].float(), -1)
    n = ids.shape[1]
    return float(sum(logp[n - len(option) - 1 + t, option[t]] for t in range(len(option))))


def test_cloze_scores_are_the_llamas_log_probabilities_of_the_option_tokens(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    examples = _examples()
    for norm in ("none", "chars"):
        model = build_model(_cfg(tiny_llama_dir, cloze_norm=norm))
        assert model.head.kind == "cloze" and model.head.norm == norm
        tok = model.head.tokenizer
        batch = model.head.collate(examples)
        with torch.no_grad():
            scores = model.head.logits(model.network, batch)  # fresh LoRA (B = 0): the plain Llama's scores
        assert scores.shape == (3, 5)
        for b, e in enumerate(examples):
            expected = [_by_hand(llama, tok, q, t) / (len(t) if norm == "chars" else 1) for q, t in e.mc_texts]
            torch.testing.assert_close(scores[b, :len(expected)], torch.tensor(expected), rtol=1e-4, atol=1e-4)
            assert torch.isinf(scores[b, len(expected):]).all() and (scores[b, len(expected):] < 0).all()
        assert len(tok("dark green", add_special_tokens=False)["input_ids"]) == 2  # a two-token option was summed


def test_training_a_few_steps_moves_the_cloze_scores_towards_the_labels(tiny_llama_dir):
    model = build_model(_cfg(tiny_llama_dir), num_data=16)
    guide = make_guide("blob", model)
    register_parameters(model, guide)
    train = toy_examples(16)
    before = predict(model, guide, train, num_samples=0, progress=False)
    fit(model, guide, train, FitConfig(max_steps=12, batch_size=4, lr=1e-2), progress=False)
    after = predict(model, guide, train, num_samples=0, progress=False)
    assert not torch.allclose(before.probs, after.probs)
    nll = [compute_metrics(p.probs, p.labels)["nll"] for p in (before, after)]
    assert nll[1] < nll[0], nll


def test_flipout_and_sample_batched_prediction_give_each_option_sequence_its_own_signs(tiny_llama_dir):
    model = build_model(_cfg(tiny_llama_dir), num_data=16)
    guide = make_guide("blob", model)
    register_parameters(model, guide)
    with torch.no_grad():  # a wide posterior (std ~0.5 of the B factors), so draws differ visibly
        import pyro

        for name, p in pyro.get_param_store().items():
            if ".rho." in name:
                p.unconstrained().fill_(0.5)
    e, two = toy_examples(1)[0], _examples()[2]
    batch = model.head.collate([e, e, two])
    # at the posterior mean a row's scores do not depend on what it is batched (and padded) with
    mean = posterior_logits(model, guide, batch, num_samples=0)[0]
    for row, alone in ((0, e), (2, two)):
        torch.testing.assert_close(mean[row], posterior_logits(model, guide, model.head.collate([alone]),
                                                               num_samples=0)[0, 0], rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    batched = posterior_logits(model, guide, batch, num_samples=24, sample_batched=True)
    torch.manual_seed(0)
    sequential = posterior_logits(model, guide, batch, num_samples=24)
    assert batched.shape == sequential.shape == (24, 3, 5)
    for draws in (batched, sequential):
        assert torch.isinf(draws[:, :2, 2:]).all() and torch.isfinite(draws[:, :2, :2]).all()
        assert not torch.allclose(draws[:, 0], draws[:, 1])  # the two copies of one example get their own signs
    present = batched[:, :, :2]
    se = (present.std(0) ** 2 / 24 + sequential[:, :, :2].std(0) ** 2 / 24).sqrt()
    assert torch.all((present.mean(0) - sequential[:, :, :2].mean(0)).abs() < 5 * se + 1e-6)
    shared = posterior_logits(model, guide, batch, num_samples=3, use_flipout=False)
    torch.testing.assert_close(shared[:, 0], shared[:, 1])  # without Flipout one draw serves the whole batch


def test_a_cloze_run_exports_to_arviz_and_passes_through_the_ppc(tiny_llama_dir):
    cfg = _cfg(tiny_llama_dir)
    model = build_model(cfg, num_data=16)
    guide = make_guide("blob", model)
    register_parameters(model, guide)
    examples = _examples()
    idata = to_inference_data(Run(cfg, model, guide), data=examples, num_samples=4, batch_size=2)
    logits = idata.posterior_predictive["logits"]
    assert logits.shape[-2:] == (3, 5) and idata.log_likelihood["y"].shape[-1] == 3
    assert math.isfinite(float(idata.log_likelihood["y"].sum()))
    result = check_idata(idata)
    assert result.probs.shape == (3, 5) and torch.allclose(result.probs[:, 3:], torch.zeros(3, 2))
    assert all(0 <= s["p_value"] <= 1 for s in result.statistics.values() if not math.isnan(s["p_value"]))


def test_train_run_with_the_cloze_head_round_trips(tiny_llama_dir, data_dir, tmp_path):
    cfg = RunConfig.from_dict(dict(model=str(tiny_llama_dir), dataset="arc_easy", data_dir=str(data_dir), head="cloze",
                                   cloze_norm="chars", max_steps=2, batch_size=2, max_length=64, num_samples=2,
                                   eval_batch_size=4, train_limit=4, eval_limit=4))
    metrics = train_run(cfg, tmp_path / "run", progress=False)
    assert all(math.isfinite(metrics[k]) for k in ("accuracy", "ece", "nll", "brier"))
    run = load_run(tmp_path / "run")
    assert run.model.head.kind == "cloze" and run.model.head.norm == "chars"
