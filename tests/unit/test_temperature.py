"""blob_pyro.temperature and method=temperature on the tiny network: the held-out slice is a function of the seed,
disjoint from what fit trains on; T minimises the NLL on that slice (a known answer, and never worse than T = 1);
the model divides its logits by T at prediction; temperature.json round-trips T."""

import json

import pytest
import torch

from blob_pyro.config import RunConfig
from blob_pyro.errors import ConfigError, RunError
from blob_pyro.infer import fit
from blob_pyro.predictive import predict
from blob_pyro.temperature import TEMPERATURE_FILE, calibrate, calibration_split, fit_temperature, nll_at
from blob_pyro.training import _read_temperature, post_fit, save_run

from .tiny import tiny_examples, tiny_run


def test_the_held_out_slice_is_the_seeds_and_disjoint_from_the_rest():
    examples = tiny_examples(20)
    train, held = calibration_split(examples, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert {e.index for e in train}.isdisjoint({e.index for e in held})
    assert sorted(e.index for e in train + held) == list(range(20))
    again = calibration_split(examples, 0.25, seed=3)
    assert [e.index for e in again[1]] == [e.index for e in held]  # deterministic in the seed
    assert [e.index for e in calibration_split(examples, 0.25, seed=4)[1]] != [e.index for e in held]
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    calibration_split(examples, 0.25, seed=3)
    assert torch.equal(torch.rand(1), before)  # the global RNG is not drawn


def test_an_empty_held_out_slice_or_an_empty_remainder_is_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        calibration_split(tiny_examples(8), 0.01, seed=0)
    assert "holds out none" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="leaves none to train on"):
        calibration_split(tiny_examples(2), 0.9, seed=0)


def test_fit_temperature_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    z = 2.0 * torch.randn(4000, 4, generator=g)
    labels = torch.distributions.Categorical(logits=z).sample()  # labels drawn at T = 1 ...
    t = fit_temperature(3.0 * z, labels)  # ... scored with logits 3x too sharp: T = 3 undoes it
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll_at(3.0 * z, labels, t) < nll_at(3.0 * z, labels, 1.0)
    # the minimum: the NLL is higher a little either side of T
    assert nll_at(3.0 * z, labels, t) <= min(nll_at(3.0 * z, labels, t * 1.01), nll_at(3.0 * z, labels, t / 1.01))


def test_fit_temperature_never_ends_worse_than_one():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.4], [-1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    t = fit_temperature(logits, labels)
    assert t > 0 and nll_at(logits, labels, t) <= nll_at(logits, labels, 1.0) + 1e-12


def test_absent_options_do_not_stop_the_fit():
    # ARC-style logits: the fifth slot is -inf for 4-option questions; it must not turn T's gradient into NaN
    g = torch.Generator().manual_seed(1)
    z = 2.0 * torch.randn(2000, 4, generator=g)
    labels = torch.distributions.Categorical(logits=z).sample()
    padded = torch.cat([3.0 * z, torch.full((2000, 1), float("-inf"))], dim=1)
    t = fit_temperature(padded, labels)
    assert t == pytest.approx(fit_temperature(3.0 * z, labels), rel=1e-6)
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll_at(padded, labels, t) == pytest.approx(nll_at(3.0 * z, labels, t).item(), rel=1e-12)


def test_nan_or_positive_infinite_logits_are_refused():
    labels = torch.tensor([0, 1])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite logits"):
            fit_temperature(torch.tensor([[1.0, bad], [0.0, 1.0]]), labels)


def test_method_temperature_resolves_to_mle_plus_a_held_out_share():
    cfg = RunConfig.from_dict({"method": "temperature"}).resolve()
    assert (cfg.bayes.guide, cfg.fit.kl_schedule, cfg.fit.kl_multiplier, cfg.predict.num_samples) == \
        ("auto_delta", "fixed", 0.0, 0)
    assert cfg.calibration_fraction == 0.1 and cfg.ensemble_size is None
    assert RunConfig.from_dict({"method": "temperature", "calibration_fraction": 0.3}).resolve() \
        .calibration_fraction == 0.3
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="0 < calibration_fraction < 1"):
            RunConfig.from_dict({"method": "temperature", "calibration_fraction": bad}).resolve()
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"method": "mle", "calibration_fraction": 0.2}).resolve()
    assert str(err.value) == "calibration_fraction is a setting of method=temperature; got method=mle"


def _temperature_run(tmp_path=None):
    """method=temperature on TinyNet as training.build + _train_and_save do it; the head records what it collates."""
    cfg = RunConfig.from_dict({"method": "temperature", "calibration_fraction": 0.25, "lr": 5e-2, "max_steps": 30,
                               "batch_size": 4, "seed": 1, "eval_batch_size": 8})
    examples = tiny_examples(32, seed=5)
    train, held = calibration_split(examples, cfg.resolve().calibration_fraction, cfg.resolve().fit.seed)
    run = tiny_run(cfg, num_data=len(train))
    run.train, run.held_out = train, held
    seen = []
    collate = run.model.head.collate

    def recording(batch, device=None):
        out = collate(batch, device)
        seen.extend(out["index"].tolist())
        return out

    run.model.head.collate = recording
    fit(run.model, run.guide, run.train, run.config.fit, progress=False)
    trained_on = set(seen)
    post_fit(run)
    run.model.head.collate = collate
    return run, trained_on


def test_temperature_is_fitted_on_the_held_out_training_slice_only():
    run, trained_on = _temperature_run()
    held = {e.index for e in run.held_out}
    assert trained_on and trained_on.isdisjoint(held)  # the held-out examples are never trained on
    record = run.calibration
    assert record["indices"] == [e.index for e in run.held_out] and record["num_examples"] == len(held) == 8
    assert run.model.temperature == record["temperature"] > 0
    assert record["nll"] <= record["nll_at_1"] + 1e-12  # not worse than T = 1 on the slice
    # the model's logits are divided by T: probabilities at T equal softmax(logits at 1 / T)
    t = run.model.temperature
    at_t = predict(run.model, run.guide, run.held_out, num_samples=0, keep_draws=True, progress=False)
    run.model.temperature = 1.0
    at_1 = predict(run.model, run.guide, run.held_out, num_samples=0, keep_draws=True, progress=False)
    assert torch.allclose(at_t.logits, at_1.logits / t, atol=1e-6)
    assert nll_at(at_1.logits[0], at_1.labels, t) == pytest.approx(record["nll"], rel=1e-6)
    # refit from scratch: the same T (the fit is a deterministic function of the slice)
    assert calibrate(run.model, run.guide, run.held_out)["temperature"] == pytest.approx(t, rel=1e-9)


def test_temperature_json_round_trips_t_and_the_predictions(tmp_path):
    run, _ = _temperature_run()
    data = tiny_examples(12, seed=9)
    before = predict(run.model, run.guide, data, num_samples=0, progress=False).probs
    save_run(tmp_path, run)
    record = json.loads((tmp_path / TEMPERATURE_FILE).read_text())
    assert record == run.calibration and record["split"] is None  # a list of examples has no split name
    t = run.model.temperature
    run.model.temperature = 1.0
    assert not torch.allclose(predict(run.model, run.guide, data, num_samples=0, progress=False).probs, before)
    run.model.temperature = _read_temperature(tmp_path)["temperature"]  # what load_run does
    assert run.model.temperature == t
    assert torch.equal(predict(run.model, run.guide, data, num_samples=0, progress=False).probs, before)


def test_a_missing_or_broken_temperature_json_is_one_line(tmp_path):
    with pytest.raises(RunError, match="is missing"):
        _read_temperature(tmp_path)
    (tmp_path / TEMPERATURE_FILE).write_text('{"temperature": -1}')
    with pytest.raises(RunError, match="finite number > 0"):
        _read_temperature(tmp_path)
    (tmp_path / TEMPERATURE_FILE).write_text("{")
    with pytest.raises(RunError, match="does not hold a temperature"):
        _read_temperature(tmp_path)


def test_post_fit_is_a_no_op_for_other_methods():
    run = tiny_run(RunConfig.from_dict({"method": "mle"}))
    post_fit(run)
    assert run.model.temperature == 1.0 and run.calibration is None
