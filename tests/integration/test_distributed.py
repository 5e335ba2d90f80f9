"""Data-parallel training: 2 CPU processes (gloo, started by ``accelerate launch``) against 1 process with the
same global batch, through the unchanged CLI entry point.

Stated tolerances:

- Flipout off (one Gaussian draw per layer and step, the same on every process since the processes share
  the seed): the 2-process run *is* the 1-process run up to float summation order — loss trajectory
  within 1e-5 relative, posterior tensors within 1e-5, and, with posterior-mean prediction, the same
  metrics (within 1e-6).
- Flipout on (the default): each process draws its own signs, so the runs agree in distribution only;
  the loss trajectories stay within 5 % relative and accuracy within one example.

(The helpers' single-process behaviour: tests/unit/test_distributed.py.)
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blob_pyro.config import RunConfig
from blob_pyro.training import train_run

REPO = Path(__file__).resolve().parents[2]
STEPS = 6

WORKER = """
import json, sys
from blob_pyro.cli import main
for args in json.loads(sys.argv[1]):
    code = main(args)
    if code:
        sys.exit(code)
"""


def _settings(tiny_llama_dir, data_dir, **over):
    base = dict(model=str(tiny_llama_dir), dataset="winogrande_s", data_dir=str(data_dir), train_limit=32,
                eval_limit=11, max_length=48, max_steps=STEPS, lr=1e-2, eval_batch_size=4, num_samples=0,
                device="cpu", seed=5)
    base.update(over)
    return base


def _argv(settings: dict, out: Path) -> list[str]:
    args = []
    for k, v in settings.items():
        args += [f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v)]
    return ["train", *args, "--output-dir", str(out), "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, data_dir, tmp_path_factory):
    """Three configurations, each trained by 2 processes (batch 4 each) and by 1 process (batch 8)."""
    root = tmp_path_factory.mktemp("dist")
    configs = {"exact": _settings(tiny_llama_dir, data_dir, flipout=False),
               # the paper's eps: the sign draws' spread stays within the 5 % the test states
               "flipout": _settings(tiny_llama_dir, data_dir, flipout=True, num_samples=2, eps=0.05),
               "ensemble": _settings(tiny_llama_dir, data_dir, method="ensemble", ensemble_size=2)}
    worker = root / "worker.py"
    worker.write_text(WORKER)
    argvs = [_argv(dict(c, batch_size=4), root / f"two_{name}") for name, c in configs.items()]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(torch.get_num_threads()), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(worker), json.dumps(argvs)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, c in configs.items():  # the 1-process references train meanwhile, in this process
        train_run(RunConfig.from_dict({**c, "batch_size": 8}), root / f"one_{name}", progress=False)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return root


def test_two_processes_follow_the_one_process_run_exactly_without_flipout(runs):
    one, two = runs / "one_exact", runs / "two_exact"
    log1, log2 = _log(one), _log(two)
    assert [r["step"] for r in log2] == list(range(1, STEPS + 1))  # rank 0 alone wrote the log
    for a, b in zip(log1, log2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["kl_weight"] == a["kl_weight"]  # the KL schedule sees the global batch
    p1, p2 = load_file(str(one / "posterior.safetensors")), load_file(str(two / "posterior.safetensors"))
    assert p1.keys() == p2.keys()
    # the B means start at 0: training moved them, so the comparison below means something
    assert max(p1[k].abs().max().item() for k in p1 if k.startswith("loc.")) > 1e-3
    for k in p1:
        assert torch.allclose(p1[k], p2[k], atol=1e-5), k
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert m2["num_examples"] == 11  # every eval example once, gathered from both processes
    # the uncertainty metrics too: the per-draw logits are gathered in the examples' order
    for key in ("accuracy", "ece", "nll", "brier", "entropy", "expected_entropy", "mutual_information", "aurc",
                "accuracy_at_80"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-6), key


def test_two_processes_agree_in_distribution_with_flipout(runs):
    one, two = runs / "one_flipout", runs / "two_flipout"
    log1, log2 = _log(one), _log(two)
    assert len(log2) == STEPS
    for a, b in zip(log1, log2):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05)
        assert b["kl_weight"] == a["kl_weight"]
    assert any(a["loss"] != b["loss"] for a, b in zip(log1, log2))  # the processes drew their own signs
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert abs(m1["accuracy"] - m2["accuracy"]) <= 1 / 11 + 1e-9
    files = sorted(p.name for p in two.iterdir())
    assert files == ["adapter", "config.json", "metrics.json", "posterior.safetensors", "predictions.safetensors",
                     "train_log.jsonl"]


def test_an_ensemble_under_two_processes_is_the_one_process_ensemble(runs):
    """Every process trains every member data-parallel; rank 0 alone writes the members and their average."""
    one, two = runs / "one_ensemble", runs / "two_ensemble"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for j in range(2):
        m1, m2 = one / f"member{j}", two / f"member{j}"
        assert [r["step"] for r in _log(m2)] == list(range(1, STEPS + 1))  # one log, written once
        p1, p2 = load_file(str(m1 / "posterior.safetensors")), load_file(str(m2 / "posterior.safetensors"))
        for k in p1:
            assert torch.allclose(p1[k], p2[k], atol=1e-5), (j, k)
    a, b = (load_file(str(d / "predictions.safetensors")) for d in (one, two))
    assert torch.equal(a["labels"], b["labels"]) and a["probs"].shape == (11, 2)
    assert torch.allclose(a["probs"], b["probs"], atol=1e-5)
    # the members differ (their own seeds), and the ensemble's probabilities are their average
    member_probs = [load_file(str(two / f"member{j}" / "predictions.safetensors"))["probs"] for j in range(2)]
    assert not torch.allclose(member_probs[0], member_probs[1], atol=1e-4)
    assert torch.allclose(b["probs"], (member_probs[0] + member_probs[1]) / 2, atol=1e-6)
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    for key in ("accuracy", "ece", "nll", "brier"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-5), key

