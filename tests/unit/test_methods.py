"""blob_pyro.methods: every method and preset resolves to the settings it requires, refuses each explicit conflicting
setting with one line naming both, lets its defaults be overridden; and each method does what its name promises
on the tiny network (point estimates, dropout at prediction, random factors)."""

import math

import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, AutoNormal

from blob_pyro.config import ConfigError, RunConfig
from blob_pyro.guides import BlobGuide, guide_std
from blob_pyro.infer import fit
from blob_pyro.methods import BBB_INIT_SCALE, METHODS, PRESETS, apply_method
from blob_pyro.predictive import predict

from .tiny import tiny_examples, tiny_run

ALTERNATIVE = {"guide": {"auto_delta": "lowrank", "auto_normal": "blob", "blob": "lowrank"},
               "kl_schedule": {"fixed": "blob", "standard": "blob", "blob": "standard"},
               "kl_multiplier": {0.0: 0.5}, "bayesian_factor": {"both": "B", "A": "B"},
               "objective": {"paper": "elbo"}, "prior": {"normal": "laplace"}}
"""A valid value other than the required one, for every setting a method or preset requires."""


def _requirements():
    out = []
    for kind, table in (("method", METHODS), ("preset", PRESETS)):
        for name, spec in table.items():
            for key, value in spec.requires.items():
                out.append(pytest.param(kind, name, key, value, ALTERNATIVE[key][value], id=f"{kind}={name}-{key}"))
    return out


def _resolve(**settings):
    return RunConfig.from_dict(settings).resolve()


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("method, guide, factor, kl, samples, dropout, eps", [
    ("mle", "auto_delta", "B", ("fixed", 0.0), 0, 0.0, 0.2),
    ("map", "auto_delta", "both", ("standard", 1.0), 0, 0.0, 0.2),
    ("mcdropout", "auto_delta", "B", ("fixed", 0.0), 10, 0.1, 0.2),
    ("bbb", "auto_normal", "both", ("standard", 1.0), 10, 0.0, math.sqrt(BBB_INIT_SCALE)),
    ("blob", "blob", "B", ("blob", 1.0), 10, 0.0, 0.2),
    ("ensemble", "auto_delta", "B", ("fixed", 0.0), 0, 0.0, 0.2),
    ("temperature", "auto_delta", "B", ("fixed", 0.0), 0, 0.0, 0.2),
    ("tfb", "auto_delta", "A", ("fixed", 0.0), 10, 0.0, 0.2),
    ("laplace", "auto_delta", "both", ("standard", 1.0), 1000, 0.0, 0.2),
])
def test_every_method_resolves_to_its_settings(method, guide, factor, kl, samples, dropout, eps):
    cfg = _resolve(method=method)
    b = cfg.bayes
    assert (b.guide, b.bayesian_factor, (cfg.fit.kl_schedule, cfg.fit.kl_multiplier)) == (guide, factor, kl)
    assert (cfg.predict.num_samples, cfg.adapter.lora_dropout, b.eps) == (samples, dropout, pytest.approx(eps))
    assert (cfg.fit.objective, b.prior) == ("elbo", "normal")
    assert cfg.resolve() == cfg  # idempotent: a saved resolved config reloads unchanged
    assert set(METHODS) == {"blob", "mle", "map", "mcdropout", "bbb", "ensemble", "temperature", "tfb", "laplace"}


def test_the_paper_preset_resolves_to_the_official_optimisation():
    cfg = _resolve(preset="paper")
    assert (cfg.method, cfg.bayes.bayesian_factor, cfg.bayes.guide, cfg.fit.kl_schedule, cfg.fit.objective,
            cfg.bayes.prior) == ("blob", "A", "blob", "blob", "paper", "normal")
    assert cfg.resolve() == cfg


@pytest.mark.parametrize("kind, name, key, required, other", _requirements())
def test_an_explicit_setting_that_conflicts_with_a_requirement_is_refused(kind, name, key, required, other):
    with pytest.raises(ConfigError) as err:
        _resolve(**{kind: name, key: other})
    msg = _one_line(err)
    assert msg == f"{kind}={name} implies {key}={required}; got {key}={other} (drop one of them)"
    assert _resolve(**{kind: name, key: required}).get(key) == required  # the required value itself is fine


@pytest.mark.parametrize("method", [m for m in METHODS if m != "blob"])
def test_the_paper_preset_refuses_every_other_method(method):
    with pytest.raises(ConfigError) as err:
        _resolve(preset="paper", method=method)
    msg = _one_line(err)
    assert "preset=paper" in msg and f"method={method}" in msg


@pytest.mark.parametrize("settings, needles", [
    ({"objective": "paper", "guide": "lowrank"}, ("objective=paper", "guide=lowrank")),
    ({"objective": "paper", "guide": "auto_normal"}, ("objective=paper", "guide=auto_normal")),
    ({"objective": "paper", "prior": "student_t"}, ("objective=paper", "prior=student_t")),
    ({"method": "mle", "objective": "paper"}, ("objective=paper", "guide=auto_delta")),
    ({"preset": "paper", "prior": "student_t"}, ("objective=paper", "prior=student_t")),
    ({"preset": "paper", "method": "mle"}, ("preset=paper", "method=mle")),
    ({"method": "mle", "guide": "lowrank"}, ("method=mle", "guide=lowrank")),
])
def test_conflicts_name_both_settings(settings, needles):
    with pytest.raises(ConfigError) as err:
        _resolve(**settings)
    msg = _one_line(err)
    assert all(n in msg for n in needles), msg


def test_defaults_are_overridable():
    assert _resolve(method="mcdropout", lora_dropout=0.2).adapter.lora_dropout == 0.2
    assert _resolve(method="mle", num_samples=5).predict.num_samples == 5
    assert _resolve(method="map", num_samples=3).predict.num_samples == 3
    assert _resolve(method="bbb", eps=0.05).bayes.eps == 0.05
    assert _resolve(method="blob", guide="lowrank", bayesian_factor="both", kl_schedule="standard").bayes.guide == \
        "lowrank"  # blob is the settings as given


def test_mcdropout_refuses_zero_dropout():
    with pytest.raises(ConfigError) as err:
        _resolve(method="mcdropout", lora_dropout=0.0)
    assert _one_line(err) == "method=mcdropout needs lora_dropout > 0; got lora_dropout=0"


def test_unknown_method_or_preset_names_the_choices():
    with pytest.raises(ConfigError, match="blob, mle, map, mcdropout, bbb, ensemble, temperature, tfb, laplace"):
        apply_method({}, "swag")
    with pytest.raises(ConfigError, match="choose one of paper"):
        apply_method({}, "blob", "fast")
    with pytest.raises(ConfigError, match="method must be one of"):
        _resolve(method="swag")


def test_apply_method_returns_a_new_dict():
    flat = {"guide": None}
    out = apply_method(flat, "mle")
    assert flat == {"guide": None} and out["guide"] == "auto_delta" and out["num_samples"] == 0


# ---- what each method does, on the tiny network ------------------------------------------------------------
def _trained(method, steps=3, **settings):
    cfg = RunConfig.from_dict({"method": method, "lr": 1e-2, "max_steps": steps, "batch_size": 4, **settings})
    run = tiny_run(cfg, num_data=8)
    log = fit(run.model, run.guide, tiny_examples(8, seed=3), run.config.fit, progress=False)
    return run, tiny_examples(8, seed=3), log


def _pred(run, examples, n, seed):
    torch.manual_seed(seed)
    return predict(run.model, run.guide, examples, num_samples=n, keep_draws=True, progress=False)


def test_mle_prediction_is_deterministic_and_has_no_prior():
    run, examples, log = _trained("mle")
    assert isinstance(run.guide, AutoDelta) and all(r["kl_weight"] == 0.0 for r in log)
    assert all(r["loss"] == pytest.approx(r["nll"]) for r in log)
    a, b = _pred(run, examples, 0, 1), _pred(run, examples, 0, 2)
    assert torch.equal(a.probs, b.probs)


def test_map_puts_the_prior_on_both_factors_at_weight_one_over_n():
    run, examples, log = _trained("map", steps=1)
    factors = {s.factor for s in run.model.sites}
    assert factors == {"A", "B"} and isinstance(run.guide, AutoDelta)
    assert log[0]["kl_weight"] == pytest.approx(1 / len(examples))
    assert math.isfinite(log[0]["kl"]) and log[0]["loss"] != pytest.approx(log[0]["nll"])  # the prior counts


def test_mcdropout_keeps_lora_dropout_on_at_prediction():
    run, examples, _ = _trained("mcdropout", lora_dropout=0.3)
    drops = [m for n, m in run.model.network.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == pytest.approx(0.3) for m in drops)
    one, two = _pred(run, examples, 1, 1), _pred(run, examples, 1, 2)
    assert not torch.allclose(one.probs, two.probs)  # two single-pass predictions differ
    draws = _pred(run, examples, 2, 3).logits
    assert draws.shape[0] == 2 and not torch.allclose(draws[0], draws[1])  # and so do two draws of one prediction
    assert all(m.training for m in drops)  # predict left the dropout modules on


def test_bbb_samples_both_factors_with_standard_init_scales():
    run = tiny_run(RunConfig.from_dict({"method": "bbb"}))
    assert isinstance(run.guide, AutoNormal)
    tr1, tr2 = poutine.trace(run.guide).get_trace(), poutine.trace(run.guide).get_trace()
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


def test_blob_mean_prediction_is_deterministic_and_sampling_is_not():
    run, examples, _ = _trained("blob", eps=0.5)
    assert isinstance(run.guide, BlobGuide)
    mean1, mean2 = _pred(run, examples, 0, 1), _pred(run, examples, 0, 2)
    assert torch.equal(mean1.probs, mean2.probs) and mean1.logits.shape[0] == 1
    s1, s2 = _pred(run, examples, 10, 1), _pred(run, examples, 10, 2)
    assert s1.logits.shape[0] == 10
    assert not torch.allclose(s1.probs, s2.probs)
    assert not torch.allclose(s1.logits[0], s1.logits[1])


def test_the_paper_preset_trains_with_the_paper_step():
    run, _, log = _trained("blob", preset="paper")
    assert {s.factor for s in run.model.sites} == {"A"}
    assert set(log[0]["lr"]) == {"adamw", "sgd"}
