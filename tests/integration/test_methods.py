"""Each baseline's training and prediction path does what its name promises (mle, map, mcdropout, ensemble,
bbb, blob N=0 vs N=10), on a tiny random Llama with toy examples (no benchmark data needed) unless noted."""

import json
import math

import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, AutoNormal

from blob_pyro import bench
from blob_pyro.config import BBB_INIT_SCALE, TrainConfig
from blob_pyro.guides import BlobGuide, guide_std
from blob_pyro.infer import fit
from blob_pyro.predictive import predict
from blob_pyro.runs import build, train_run
from helpers import toy_examples


def _cfg(path, **kw):
    base = dict(model=str(path), dataset="winogrande_s", max_steps=2, batch_size=4, max_length=32, num_samples=2,
                eval_batch_size=8, lr=1e-2, train_limit=8, eval_limit=6)
    base.update(kw)
    return TrainConfig(**base)


def _trained(path, method, steps=3, **kw):
    """A run of ``method`` fitted for a few steps on toy examples (so LoRA B is no longer zero)."""
    run = build(_cfg(path, method=method, **kw), with_data=False)
    examples = toy_examples(8, 2, seed=3)
    run.model.num_data = len(examples)
    cfg = run.config
    log = fit(run.model, run.guide, examples, max_steps=steps, batch_size=4, lr=1e-2, kl_schedule=cfg.kl_schedule,
              kl_multiplier=cfg.kl_multiplier, progress=False, seed=0)
    return run, examples, log


def _pred(run, examples, n, seed):
    torch.manual_seed(seed)
    return predict(run.model, run.guide, examples, num_samples=n, keep_draws=True, progress=False)


@pytest.mark.parametrize("method, guide, factor, kl, samples, dropout", [
    ("mle", "auto_delta", "B", ("fixed", 0.0), 0, 0.0),
    ("map", "auto_delta", "both", ("standard", 1.0), 0, 0.0),
    ("mcdropout", "auto_delta", "B", ("fixed", 0.0), 10, 0.1),
    ("bbb", "auto_normal", "both", ("standard", 1.0), 10, 0.0),
    ("blob", "blob", "B", ("blob", 1.0), 10, 0.0),
])
def test_effective_settings_of_each_method(method, guide, factor, kl, samples, dropout):
    cfg = TrainConfig(method=method).effective().validate()
    assert (cfg.guide, cfg.bayesian_factor, (cfg.kl_schedule, cfg.kl_multiplier)) == (guide, factor, kl)
    assert (cfg.num_samples, cfg.lora_dropout) == (samples, dropout)
    assert cfg.effective() == cfg  # idempotent: a saved effective config reloads unchanged
    if method == "bbb":
        assert cfg.eps ** 2 == pytest.approx(BBB_INIT_SCALE)


def test_mle_prediction_is_deterministic_and_has_no_prior(tiny_llama_dir):
    run, examples, log = _trained(tiny_llama_dir, "mle")
    assert isinstance(run.guide, AutoDelta) and all(r["kl_weight"] == 0.0 for r in log)
    a, b = _pred(run, examples, 0, 1), _pred(run, examples, 0, 2)
    assert torch.equal(a.probs, b.probs)


def test_map_puts_the_prior_on_both_factors_at_weight_one_over_n(tiny_llama_dir):
    run, examples, log = _trained(tiny_llama_dir, "map", steps=1)
    names = [s.name for s in run.model.sites]
    assert any(n.endswith("lora_A") for n in names) and any(n.endswith("lora_B") for n in names)
    assert isinstance(run.guide, AutoDelta)
    assert log[0]["kl_weight"] == pytest.approx(1 / len(examples))
    assert math.isfinite(log[0]["kl"]) and log[0]["loss"] != pytest.approx(log[0]["nll"])  # the prior counts


def test_mcdropout_keeps_lora_dropout_on_at_prediction(tiny_llama_dir):
    run, examples, _ = _trained(tiny_llama_dir, "mcdropout")
    drops = [m for n, m in run.model.network.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == pytest.approx(0.1) for m in drops)
    one, two = _pred(run, examples, 1, 1), _pred(run, examples, 1, 2)
    assert not torch.allclose(one.probs, two.probs)  # two single-pass predictions differ
    draws = _pred(run, examples, 2, 3).logits
    assert draws.shape[0] == 2 and not torch.allclose(draws[0], draws[1])  # and so do two draws of one prediction
    assert all(m.training for m in drops)  # predict left the dropout modules on


def test_bbb_samples_both_factors_with_standard_init_scales(tiny_llama_dir):
    run = build(_cfg(tiny_llama_dir, method="bbb"), with_data=False)
    assert isinstance(run.guide, AutoNormal)
    batch = run.model.head.collate(toy_examples(4, 2))
    tr1 = poutine.trace(run.guide).get_trace(batch)
    tr2 = poutine.trace(run.guide).get_trace(batch)
    sites = [n for n, s in tr1.nodes.items() if s["type"] == "sample" and not s["infer"].get("is_auxiliary")]
    layers = {n.rsplit(".", 1)[0] for n in sites}
    assert layers and all(f"{layer}.lora_A" in sites and f"{layer}.lora_B" in sites for layer in layers)
    for name in sites:  # every factor is random: two guide draws differ
        assert not torch.allclose(tr1.nodes[name]["value"], tr2.nodes[name]["value"]), name
    stds = guide_std(run.guide)
    assert set(stds) == set(sites)
    for name, std in stds.items():
        assert torch.allclose(std, torch.full_like(std, BBB_INIT_SCALE), rtol=1e-4), name
    medians = run.guide.median()  # means start at PEFT's init: A random, B zero
    assert any(medians[n].abs().sum() > 0 for n in sites if n.endswith("lora_A"))
    assert all(torch.count_nonzero(medians[n]) == 0 for n in sites if n.endswith("lora_B"))


def test_blob_mean_prediction_is_deterministic_and_sampling_is_not(tiny_llama_dir):
    run, examples, _ = _trained(tiny_llama_dir, "blob")
    assert isinstance(run.guide, BlobGuide)
    mean1, mean2 = _pred(run, examples, 0, 1), _pred(run, examples, 0, 2)
    assert torch.equal(mean1.probs, mean2.probs) and mean1.logits.shape[0] == 1
    s1, s2 = _pred(run, examples, 10, 1), _pred(run, examples, 10, 2)
    assert s1.logits.shape[0] == 10
    assert not torch.allclose(s1.probs, s2.probs)
    assert not torch.allclose(s1.logits[0], s1.logits[1])
    assert torch.allclose(s1.probs, torch.softmax(s1.logits, -1).mean(0), atol=1e-6)  # softmax, then average


def test_ensemble_average_rules():
    probs = [torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([[0.5, 0.5], [0.4, 0.6]])]
    logits = [torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])]
    p, q = bench.ensemble_average(probs, logits)
    assert torch.allclose(p, (probs[0] + probs[1]) / 2)
    assert torch.allclose(q, torch.softmax(torch.tensor([[1.0, 0.0], [0.5, 1.0]]), -1))


@pytest.mark.data
def test_ensemble_cell_trains_k_members_and_averages_their_probabilities(tiny_llama_dir, data_dir, tmp_path):
    from safetensors.torch import load_file

    entry = bench.Entry("ensemble", "ensemble", {}, {"ensemble": "probs", "ensemble_logitavg": "logits"}, members=3)
    base = dict(model=str(tiny_llama_dir), data_dir=str(data_dir), max_steps=2, batch_size=4, max_length=32,
                eval_batch_size=8, lr=1e-2, train_limit=8, eval_limit=6)
    grid = bench.Grid("g", tmp_path, base, [entry], ["winogrande_s"], [7])
    cell = bench.cells_of(grid)[0]
    metrics = bench.run_cell(cell, grid, progress=False)
    members = cell.member_dirs()
    assert [m.name for m in members] == ["member0", "member1", "member2"]
    seeds = [json.loads((m / "config.json").read_text())["config"]["seed"] for m in members]
    assert seeds == [7, 1007, 2007]
    member_preds = [load_file(str(m / bench.PREDICTIONS)) for m in members]
    ours = load_file(str(cell.dir / bench.PREDICTIONS))
    mean = torch.stack([p["member.probs"] for p in member_preds]).mean(0)
    assert torch.allclose(ours["ensemble.probs"], mean, atol=1e-6)
    logit_mean = torch.stack([p["member.logits"].mean(0) for p in member_preds]).mean(0)
    assert torch.allclose(ours["ensemble_logitavg.probs"], torch.softmax(logit_mean, -1), atol=1e-6)
    assert not torch.allclose(member_preds[0]["member.probs"], member_preds[1]["member.probs"])  # seeds differ
    assert set(metrics["bench"]["rows"]) == {"ensemble", "ensemble_logitavg"}


@pytest.mark.data
def test_bench_training_gives_what_train_run_gives(tiny_llama_dir, data_dir, tmp_path):
    """The runner trains with its own loop (to keep every prediction); it must match train_run exactly."""
    cfg = _cfg(tiny_llama_dir, method="blob", data_dir=str(data_dir), seed=3).effective().validate()
    ref = train_run(cfg, tmp_path / "ref", progress=False)
    ours = bench.train_member(cfg, tmp_path / "ours", {"blob": cfg.num_samples, "blob_mean": 0}, progress=False)
    for key in ("accuracy", "ece", "nll", "brier"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    assert ours["bench"]["rows"]["blob"]["nll"] == pytest.approx(ref["nll"], abs=1e-6)
    ref_log = (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()
    our_log = (tmp_path / "ours" / "train_log.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
    assert [strip(x) for x in our_log] == [strip(x) for x in ref_log]
