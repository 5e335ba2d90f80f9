"""blob_pyro.checkpoint: one atomic safetensors file with params, optimiser state, step and every RNG; exact resume;
damaged or foreign checkpoints are one-line errors; signals become a flag."""

import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

from blob_pyro.checkpoint import (
    CHECKPOINT,
    Checkpoint,
    CheckpointError,
    GracefulInterrupt,
    capture,
    get_rng_state,
    load_checkpoint,
    restore_params,
    save_checkpoint,
    set_rng_state,
)
from blob_pyro.config import FitConfig
from blob_pyro.guides import make_guide
from blob_pyro.infer import fit
from blob_pyro.optim import register_parameters

from .tiny import store_snapshot, tiny_examples, tiny_model


def _toy_state():
    pyro.clear_param_store()
    pyro.param("a", torch.randn(3, 2))
    pyro.param("b", torch.rand(4) + 0.1, constraint=torch.distributions.constraints.positive)
    return {"w": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 2)}},
                  "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0], "foreach": None}]},
            "names": ["a", "b"], "tiny": 1e-300, "nan": float("nan")}


def test_checkpoint_round_trip_restores_params_optimiser_and_every_rng(tmp_path):
    optim = _toy_state()
    ckpt = capture(7, optim)
    before = {k: v.clone() for k, v in pyro.get_param_store().named_parameters()}
    draws = (torch.rand(3), random.random(), np.random.rand())
    save_checkpoint(tmp_path / CHECKPOINT, ckpt)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary file left behind

    with torch.no_grad():  # change everything, then restore
        for p in pyro.get_param_store().values():
            p.add_(1.0)
    loaded = load_checkpoint(tmp_path / CHECKPOINT)
    restore_params(loaded)
    set_rng_state(loaded.rng)
    assert loaded.step == 7
    for name, p in pyro.get_param_store().named_parameters():
        assert torch.equal(p.detach(), before[name])
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (draws[0].tolist(), draws[1], draws[2])
    w = loaded.optimizer["w"]
    assert torch.equal(w["state"][0]["exp_avg"], optim["w"]["state"][0]["exp_avg"])
    assert w["param_groups"][0]["betas"] == (0.9, 0.999) and w["param_groups"][0]["foreach"] is None
    assert loaded.optimizer["tiny"] == 1e-300 and math.isnan(loaded.optimizer["nan"])


def test_rng_state_round_trip():
    state = get_rng_state()
    a = (torch.rand(2), random.random(), np.random.rand())
    set_rng_state(state)
    b = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    _toy_state()
    save_checkpoint(tmp_path / CHECKPOINT, capture(2, {}))
    good = (tmp_path / CHECKPOINT).read_bytes()

    import safetensors.torch

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / CHECKPOINT, capture(4, {}))
    assert (tmp_path / CHECKPOINT).read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]


def test_checkpoint_refuses_objects_it_cannot_store_as_json(tmp_path):
    _toy_state()
    with pytest.raises(TypeError, match="function"):
        save_checkpoint(tmp_path / CHECKPOINT, capture(1, {"lr_lambda": lambda step: 1.0}))
    assert not (tmp_path / CHECKPOINT).exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "missing"])
def test_damaged_checkpoint_is_a_one_line_error(tmp_path, damage):
    from safetensors.torch import save_file

    _toy_state()
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, capture(1, {}))
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "foreign":
        save_file({"x": torch.zeros(2)}, str(path))
    else:
        path.unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_checkpoint_of_another_format_version_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / CHECKPOINT
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "blob_pyro.checkpoint", "version": "0"})
    with pytest.raises(CheckpointError, match="version 0"):
        load_checkpoint(path)


def test_checkpoint_that_does_not_fit_the_model_is_refused():
    _toy_state()
    ckpt = capture(1, {})
    pyro.clear_param_store()
    pyro.param("a", torch.randn(3, 5))
    pyro.param("b", torch.rand(4), constraint=torch.distributions.constraints.positive)
    with pytest.raises(CheckpointError, match="shape"):
        restore_params(ckpt)
    pyro.param("c", torch.zeros(1))
    with pytest.raises(CheckpointError, match="only in the model"):
        restore_params(ckpt)
    pyro.clear_param_store()
    pyro.param("a", torch.randn(3, 2))
    pyro.param("b", torch.rand(4))  # unconstrained now
    with pytest.raises(CheckpointError, match="constraint"):
        restore_params(ckpt)


def test_nonfinite_values_are_detected():
    ckpt = Checkpoint(1, {"a": torch.tensor([1.0, float("nan")])}, {"a": "Real"}, {}, {})
    assert ckpt.nonfinite() == "a"
    ckpt = Checkpoint(1, {"a": torch.ones(2)}, {"a": "Real"}, {"s": {"exp_avg_sq": torch.tensor([math.inf])}}, {})
    assert ckpt.nonfinite() is not None
    assert Checkpoint(1, {"a": torch.ones(2)}, {"a": "Real"}, {"step": 3}, {}).nonfinite() is None


def test_graceful_interrupt_turns_signals_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulInterrupt() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM  # the process is still alive: the flag was set instead
        with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) == before


# ---- exact resume ------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _train(cfg, flipout, *, stop_after=None, ckpt_path=None, resume_from=None):
    """What training._train_and_save does, on the tiny model: fit (from a checkpoint), checkpoint, stop."""
    pyro.clear_param_store()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = tiny_model("B", num_data=12, seed=cfg.seed, flipout=flipout)
    guide = make_guide("lowrank" if cfg.objective != "paper" else "blob", model)
    start, state = 0, None
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        register_parameters(model, guide)
        restore_params(ckpt)
        start, state = ckpt.step, {"optimizer_state": ckpt.optimizer, "rng_state": ckpt.rng}

    def callback(record, fit_state):
        if fit_state["step"] == stop_after:
            save_checkpoint(ckpt_path, capture(fit_state["step"], fit_state["optimizer_state"]()))
            raise _Stop

    try:
        log = fit(model, guide, tiny_examples(12), cfg, progress=False, start_step=start, state=state,
                  callback=callback)
    except _Stop:
        return None, None
    return log, store_snapshot()


@pytest.mark.parametrize("objective, flipout", [("elbo", "token"), ("paper", "sequence")])
def test_interrupted_and_resumed_training_equals_uninterrupted_training(tmp_path, objective, flipout):
    """Stopped after step 3 (checkpoint written), rebuilt from scratch and resumed: bit-identical to 7 straight
    steps: parameters, optimiser moments, the data order, the Gaussian draws and the Flipout signs."""
    cfg = FitConfig(max_steps=7, batch_size=4, lr=1e-2, scale_lr=5e-2 if objective == "elbo" else None,
                    warmup_ratio=0.3, objective=objective, kl_schedule="blob", seed=4)
    full_log, full = _train(cfg, flipout)
    path = tmp_path / CHECKPOINT
    assert _train(cfg, flipout, stop_after=3, ckpt_path=path) == (None, None)
    assert load_checkpoint(path).step == 3
    torch.manual_seed(123)  # whatever ran in between must not matter
    rest_log, resumed = _train(cfg, flipout, resume_from=path)
    assert [r["step"] for r in rest_log] == [4, 5, 6, 7]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full_log[3:]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in rest_log]
    assert full.keys() == resumed.keys()
    differ = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not differ, differ
