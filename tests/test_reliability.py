"""Reliability and safety of runs: atomic checkpoints, exact resume after SIGKILL or Ctrl-C, non-finite
losses, safe loading, reproducibility.

The resume tests drive the real CLI in subprocesses and compare with one uninterrupted run
(``reference``): on CPU with the same seed, the resumed run must end with bit-identical posterior
tensors and metrics.json.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pytest
import torch
from safetensors.torch import load_file

from blob_pyro.checkpoint import (CHECKPOINT, Checkpoint, CheckpointError, GracefulInterrupt, capture,
                                  load_checkpoint, restore_params, save_checkpoint)
from blob_pyro.cli import main
from blob_pyro.config import TrainConfig
from blob_pyro.infer import batches
from blob_pyro.runs import train_run

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 8
EVERY = 3


def train_args(data_dir, **over):
    settings = {"model": "minilm", "dataset": "winogrande_s", "data-dir": str(data_dir), "train-limit": 8,
                "eval-limit": 4, "max-length": 32, "batch-size": 4, "max-steps": MAX_STEPS, "num-samples": 2,
                "checkpoint-every": EVERY, "seed": 3}
    settings.update(over)
    return [a for k, v in settings.items() for a in (f"--{k}", str(v))] + ["--quiet"]


def config_of(data_dir, **over) -> TrainConfig:
    return TrainConfig(model="minilm", dataset="winogrande_s", data_dir=str(data_dir), train_limit=8, eval_limit=4,
                       max_length=32, batch_size=4, max_steps=MAX_STEPS, num_samples=2, checkpoint_every=EVERY,
                       seed=3, **over)


def start_cli(*args) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS=str(torch.get_num_threads()),  # same float reductions as this process
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "blob_pyro.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def log_steps(run_dir) -> list[int]:
    path = Path(run_dir) / "train_log.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            break
    return steps


def wait_for_steps(proc, run_dir, n, timeout=180):
    t0 = time.monotonic()
    while len(log_steps(run_dir)) < n:
        assert proc.poll() is None, f"training exited early: {proc.communicate()}"
        assert time.monotonic() - t0 < timeout, "training too slow"
        time.sleep(0.02)


def assert_same_run(a, b):
    pa, pb = load_file(str(Path(a) / "posterior.safetensors")), load_file(str(Path(b) / "posterior.safetensors"))
    assert pa.keys() == pb.keys()
    differ = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not differ, f"{len(differ)} posterior tensors differ, e.g. {differ[0]}"
    assert (Path(a) / "metrics.json").read_text() == (Path(b) / "metrics.json").read_text()
    la = [json.loads(line) for line in (Path(a) / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (Path(b) / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["kl"]) for r in la] == [(r["step"], r["loss"], r["kl"]) for r in lb]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One uninterrupted CLI run, the yardstick for resumed runs."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, stdout, err = finish(start_cli("train", *train_args(data_dir), "--output-dir", str(out)))
    assert code == 0, err
    assert log_steps(out) == list(range(1, MAX_STEPS + 1))
    return out


# ---- checkpoints ---------------------------------------------------------------------------------
def test_batches_resume_at_the_same_data_position():
    data = list(range(10))
    full = batches(data, 3, seed=5)
    skipped = [next(full) for _ in range(7)]
    resumed = batches(data, 3, seed=5, start=4)
    assert [next(resumed) for _ in range(3)] == skipped[4:]
    assert skipped[3][1] != skipped[0][1]  # reshuffled each epoch, not one fixed order


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
    draws = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    save_checkpoint(tmp_path / CHECKPOINT, ckpt)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary file left behind

    with torch.no_grad():  # change everything, then restore
        for p in pyro.get_param_store().values():
            p.add_(1.0)
    loaded = load_checkpoint(tmp_path / CHECKPOINT)
    restore_params(loaded)
    from blob_pyro.checkpoint import set_rng_state

    set_rng_state(loaded.rng)
    assert loaded.step == 7
    for name, p in pyro.get_param_store().named_parameters():
        assert torch.equal(p.detach(), before[name])
    assert (torch.rand(3).tolist(), __import__("random").random(), __import__("numpy").random.rand()) == \
        (draws[0].tolist(), draws[1], draws[2])
    w = loaded.optimizer["w"]
    assert torch.equal(w["state"][0]["exp_avg"], optim["w"]["state"][0]["exp_avg"])
    assert w["param_groups"][0]["betas"] == (0.9, 0.999) and w["param_groups"][0]["foreach"] is None
    assert loaded.optimizer["tiny"] == 1e-300 and math.isnan(loaded.optimizer["nan"])


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


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_damaged_checkpoint_is_a_one_line_error(tmp_path, damage):
    from safetensors.torch import save_file

    _toy_state()
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, capture(1, {}))
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


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


# ---- exact resume through the CLI ----------------------------------------------------------------
def test_ctrl_c_then_sigkill_then_resume_matches_uninterrupted_run(data_dir, reference, tmp_path, capsys):
    out = tmp_path / "run"
    # 1. Ctrl-C: a checkpoint is saved (with checkpoint_every or not), exit status 130, one line on stderr
    proc = start_cli("train", *train_args(data_dir), "--output-dir", str(out))
    wait_for_steps(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and f"--resume {out}" in lines[0]
    first = load_checkpoint(out / CHECKPOINT)
    assert first.step == len(log_steps(out)) < MAX_STEPS and f"after step {first.step}" in lines[0]

    # 2. resume, then SIGKILL at whatever step it has reached past the next periodic checkpoint
    proc = start_cli("train", "--resume", str(out), "--quiet")
    next_checkpoint = (first.step // EVERY + 1) * EVERY
    wait_for_steps(proc, out, next_checkpoint + 1)
    proc.kill()
    code, _, _ = finish(proc)
    assert code == -signal.SIGKILL
    done = log_steps(out)
    second = load_checkpoint(out / CHECKPOINT)
    assert second.step > first.step and second.step <= len(done) < MAX_STEPS
    assert not (out / "metrics.json").exists()

    # 3. resume again (in this process): bit-identical to the run that was never interrupted
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert f"run written to {out}" in capsys.readouterr().out
    assert log_steps(out) == list(range(1, MAX_STEPS + 1))  # steps after the checkpoint were redone once
    assert_same_run(reference, out)


def test_resume_drops_log_lines_after_the_checkpoint_and_half_written_ones(tmp_path):
    from blob_pyro.runs import _truncate_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "loss": 0.4}\n{"step": 4, "lo')
    _truncate_log(log, 2)
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    _truncate_log(log, 5)
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n'
    _truncate_log(log, 0)
    assert log.read_text() == ""


# ---- non-finite losses -----------------------------------------------------------------------------
def test_exploding_loss_stops_with_the_step_and_keeps_last_good_checkpoint(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *train_args(data_dir, lr=1e6, **{"checkpoint-every": 1}), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    bad_step = int(lines[0].split("non-finite loss at step ")[1].split()[0])
    ckpt = load_checkpoint(out / CHECKPOINT)
    assert ckpt.step == bad_step - 1 and f"checkpoint (step {ckpt.step}) is kept" in lines[0]
    assert ckpt.nonfinite() is None
    assert not (out / "metrics.json").exists()


def test_nonfinite_parameters_never_overwrite_a_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    import blob_pyro.infer as infer

    real_fit = infer.fit

    def poisoned_fit(*args, callback, **kwargs):
        def cb(record, state):
            if state["step"] == 2:  # the loss of step 2 was finite, but the update broke a parameter
                name, p = next(iter(pyro.get_param_store().named_parameters()))
                with torch.no_grad():
                    p.view(-1)[0] = float("nan")
            callback(record, state)
        return real_fit(*args, callback=cb, **kwargs)

    monkeypatch.setattr(infer, "fit", poisoned_fit)
    out = tmp_path / "run"
    code = main(["train", *train_args(data_dir, **{"checkpoint-every": 1}), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "after step 2" in err and "checkpoint (step 1) is kept" in err
    ckpt = load_checkpoint(out / CHECKPOINT)
    assert ckpt.step == 1 and ckpt.nonfinite() is None


# ---- reproducibility ------------------------------------------------------------------------------
def test_same_seed_gives_identical_metrics_and_config_records_versions(data_dir, reference, tmp_path):
    metrics = train_run(config_of(data_dir), tmp_path / "again", progress=False)
    assert (tmp_path / "again" / "metrics.json").read_text() == (reference / "metrics.json").read_text()
    assert metrics == json.loads((reference / "metrics.json").read_text())
    versions = json.loads((reference / "config.json").read_text())["versions"]
    assert {"python", "torch", "pyro", "transformers", "peft", "blob_pyro", "git_commit", "machine",
            "cpu_capability", "cuda_device"} <= set(versions)
    assert versions["torch"] == torch.__version__ and versions["pyro"] == pyro.__version__
    # bit-for-bit reproducibility holds per CPU kernel level: the record says which one ran
    assert versions["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert versions["cuda_device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    if (REPO / ".git").exists():
        assert isinstance(versions["git_commit"], str) and len(versions["git_commit"]) == 40


# ---- safety ---------------------------------------------------------------------------------------
def test_runs_and_checkpoints_load_without_pickle(reference, tmp_path, monkeypatch, capsys):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle-based loading was used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    load_checkpoint(reference / CHECKPOINT)
    assert main(["evaluate", "--run", str(reference), "--num-samples", "0", "--quiet"]) == 0
    assert "accuracy" in capsys.readouterr().out


def _doctored(reference, tmp_path, **config):
    run = tmp_path / "doctored"
    shutil.copytree(reference, run)
    data = json.loads((run / "config.json").read_text())
    data["config"].update(config)
    (run / "config.json").write_text(json.dumps(data))
    return run


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("field", ["guide", "prior", "method", "std_param"])
def test_config_values_cannot_name_callables(reference, tmp_path, capsys, field, monkeypatch):
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({field: "os.system"}))
    code = main(["train", "--config", str(cfg_file), "--output-dir", str(tmp_path / "out")])
    assert code == 2 and field in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()

    run = _doctored(reference, tmp_path, **{field: "os.system"})
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 2
    assert field in _one_line_error(capsys)
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert field in _one_line_error(capsys)
    assert not called


def test_trust_remote_code_only_with_the_explicit_flag(reference, tmp_path, capsys, monkeypatch):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"trust_remote_code": True}))
    assert main(["train", "--config", str(cfg_file), "--output-dir", str(tmp_path / "out")]) == 2
    assert "--trust-remote-code" in _one_line_error(capsys)

    import blob_pyro.backbone as backbone

    seen = []
    real = backbone.load_backbone

    def spy(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(*args, **kwargs)

    monkeypatch.setattr(backbone, "load_backbone", spy)
    run = _doctored(reference, tmp_path, trust_remote_code=True)
    assert main(["evaluate", "--run", str(run), "--num-samples", "0", "--quiet"]) == 0
    assert seen == [False]  # the run folder cannot turn it on
