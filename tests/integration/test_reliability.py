"""Reliability and safety of runs through the real CLI on MiniLM: exact resume after Ctrl-C and SIGKILL, non-finite
losses, safe loading, reproducibility.

The resume test drives the real CLI in subprocesses and compares with one uninterrupted run (``reference``): on
CPU with the same seed, the resumed run must end with bit-identical posterior tensors and metrics.json.

(The checkpoint file itself, exact resume of ``fit`` on the tiny network, and the one-line refusals of
hand-made run folders: tests/unit/test_checkpoint.py and tests/unit/test_cli.py.)
"""

import json
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

from blob_pyro.checkpoint import CHECKPOINT, load_checkpoint
from blob_pyro.cli import main
from blob_pyro.config import RunConfig
from blob_pyro.training import train_run

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 8
EVERY = 3


def train_args(data_dir, **over):
    settings = {"model": "minilm", "dataset": "winogrande_s", "data-dir": str(data_dir), "train-limit": 8,
                "eval-limit": 4, "max-length": 32, "batch-size": 4, "max-steps": MAX_STEPS, "num-samples": 2,
                "checkpoint-every": EVERY, "seed": 3}
    settings.update(over)
    return [a for k, v in settings.items() for a in (f"--{k}", str(v))] + ["--quiet"]


def config_of(data_dir, **over) -> RunConfig:
    return RunConfig.from_dict(dict(model="minilm", dataset="winogrande_s", data_dir=str(data_dir), train_limit=8,
                                    eval_limit=4, max_length=32, batch_size=4, max_steps=MAX_STEPS, num_samples=2,
                                    checkpoint_every=EVERY, seed=3, **over))


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
    saved = json.loads((reference / "config.json").read_text())
    assert RunConfig.from_dict(saved["config"]) == config_of(data_dir).resolve()  # the resolved settings
    versions = saved["versions"]
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
    for key, value in config.items():  # a section's settings are merged into it
        data["config"][key] = {**data["config"][key], **value} if isinstance(value, dict) else value
    (run / "config.json").write_text(json.dumps(data))
    return run


def test_a_run_folder_cannot_turn_on_trust_remote_code(reference, tmp_path, monkeypatch):
    import blob_pyro.backbone as backbone

    seen = []
    real = backbone.load_backbone

    def spy(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(*args, **kwargs)

    monkeypatch.setattr(backbone, "load_backbone", spy)
    run = _doctored(reference, tmp_path, runtime={"trust_remote_code": True})
    assert main(["evaluate", "--run", str(run), "--num-samples", "0", "--quiet"]) == 0
    assert seen == [False]  # the run folder cannot turn it on
