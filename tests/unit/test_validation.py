"""blob_pyro.validation: the first step validated, later ones not, and a diverging step fails as a validated one."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from blob_pyro.config import FitConfig
from blob_pyro.errors import TrainingError
from blob_pyro.guides import make_guide
from blob_pyro.infer import fit
from blob_pyro.validation import ValidateOnce, check_args, validation_off, validation_on

from .tiny import tiny_examples, tiny_model


def _fit(model, guide, **cfg):
    settings = dict(max_steps=5, batch_size=4, lr=1e-2, kl_schedule="standard")
    settings.update(cfg)
    return fit(model, guide, tiny_examples(16), FitConfig(**settings), progress=False)


def _always_validated(monkeypatch):
    """The reference: every step validated as the caller's setting says (what fit did before)."""
    monkeypatch.setattr(ValidateOnce, "run", lambda self, fn, ok, diagnose=None: fn())


def _probe_logits(model, on_call=None):
    """Record validation_on() at every network call; ``on_call(n, logits)`` may change the logits of call n."""
    real, seen = model.head.logits, []

    def logits(network, batch):
        seen.append(validation_on())
        out = real(network, batch)
        return on_call(len(seen), out) if on_call else out

    model.head.logits = logits
    return seen


def _switches():
    from pyro.infer.util import is_validation_enabled as infer_on
    from pyro.poutine.util import is_validation_enabled as poutine_on

    return dist.is_validation_enabled(), infer_on(), poutine_on(), torch.distributions.Distribution._validate_args


@pytest.mark.parametrize("objective", ["elbo", "paper"])
def test_only_the_first_step_is_validated_and_the_callers_setting_is_restored(objective):
    model = tiny_model("B")
    seen = _probe_logits(model)
    before = _switches()
    _fit(model, make_guide("blob", model), objective=objective)
    assert seen == [True, False, False, False, False]
    assert _switches() == before == (True, True, True, True)


def test_a_caller_with_validation_off_is_never_validated():
    pyro.enable_validation(False)
    model = tiny_model("B")
    seen = _probe_logits(model)
    _fit(model, make_guide("blob", model))
    assert seen == [False] * 5 and _switches() == (False, False, False, False)


def test_validation_off_restores_torchs_own_default_too():
    pyro.enable_validation(False)
    torch.distributions.Distribution.set_default_validate_args(True)  # set apart from Pyro's switches
    try:
        with validation_off():
            assert not validation_on()
        assert _switches() == (False, False, False, True)
    finally:
        torch.distributions.Distribution.set_default_validate_args(False)


@pytest.mark.parametrize("objective,guide_name", [("elbo", "blob"), ("elbo", "auto_delta"), ("paper", "blob"),
                                                  ("elbo", "lowrank")])
def test_nan_logits_at_step_5_fail_as_a_validated_step_fails(monkeypatch, objective, guide_name):
    def failing_fit():
        model = tiny_model("B")
        _probe_logits(model, lambda n, out: out * float("nan") if n == 5 else out)
        with pytest.raises(TrainingError) as err:
            _fit(model, make_guide(guide_name, model), objective=objective)
        return str(err.value)

    fast = failing_fit()
    _always_validated(monkeypatch)
    assert fast == failing_fit()
    assert fast.startswith("non-finite loss at step 5 (NaN/inf in logits of a Categorical)") and "\n" not in fast


@pytest.mark.parametrize("guide_name,culprit", [("blob", "loc of a Normal"), ("lowrank", "loc of a LowRankMultivariateNormal")])
def test_a_nan_parameter_is_named_as_a_validated_step_names_it(monkeypatch, guide_name, culprit):
    def failing_fit():
        pyro.clear_param_store()
        model = tiny_model("B")
        guide = make_guide(guide_name, model)

        def spoil(record, state):  # after step 3 one mean goes NaN (as a too-large lr would make it)
            if state["step"] == 3:
                with torch.no_grad():
                    guide._param("loc", model.sites[0].name)[0, 0] = float("nan")

        with pytest.raises(TrainingError) as err:
            fit(model, guide, tiny_examples(16), FitConfig(max_steps=6, batch_size=4, kl_schedule="standard"),
                progress=False, callback=spoil)
        return str(err.value)

    fast = failing_fit()
    _always_validated(monkeypatch)
    assert fast == failing_fit()
    assert fast.startswith(f"non-finite loss at step 4 (NaN/inf in {culprit})")


def test_a_step_that_raises_unvalidated_is_run_again_from_the_same_rng_state(monkeypatch):
    def run(fail_once: bool):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = tiny_model("B")
        failed = []

        def on_call(n, out):
            if fail_once and not failed and not validation_on() and n == 3:
                failed.append(n)
                raise RuntimeError("a one-off failure of the unvalidated run")
            return out

        _probe_logits(model, on_call)
        log = _fit(model, make_guide("blob", model))
        assert failed == ([3] if fail_once else [])
        return [{k: v for k, v in r.items() if k != "seconds"} for r in log]

    assert run(fail_once=True) == run(fail_once=False)  # the repeated step drew what the first attempt drew


def test_check_args_raises_torchs_own_message():
    loc, scale = torch.tensor([0.0, float("nan")]), torch.ones(2)
    with pytest.raises(ValueError) as validated:
        dist.Normal(loc, scale, validate_args=True)
    with pytest.raises(ValueError) as after:
        check_args(dist.Normal(loc, scale, validate_args=False).to_event(1))
    assert str(after.value) == str(validated.value) and "invalid values" in str(after.value)
    check_args(dist.Normal(torch.zeros(2), scale, validate_args=False))  # valid: nothing raised
    check_args(dist.Categorical(logits=torch.zeros(3), validate_args=False))  # lazy probs not checked


def test_validated_and_unvalidated_steps_give_the_same_numbers(monkeypatch):
    def run():
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = tiny_model("B")
        log = _fit(model, make_guide("blob", model), max_steps=6)
        assert all(math.isfinite(r["loss"]) for r in log)
        return [{k: v for k, v in r.items() if k != "seconds"} for r in log]

    fast = run()
    _always_validated(monkeypatch)
    assert fast == run()
