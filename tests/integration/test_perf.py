"""benchmarks/perf.py and scripts/gpu_check.sh run end to end at tiny sizes: the code paths, not the numbers."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PERF = REPO / "benchmarks" / "perf.py"
BEFORE_RESTRUCTURE = "dc2f5b6"  # the last commit with TrainConfig / make_stepper (perf.py's _old_api branches)


def _load_perf():
    spec = importlib.util.spec_from_file_location("perf_under_test", PERF)
    perf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(perf)
    return perf


def _perf(tmp_path, *args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, str(PERF), "--threads", "1", "--out", str(tmp_path), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_gpu_check_script_logic_on_cpu(tmp_path):
    """scripts/gpu_check.sh with DEVICE=cpu: the bf16 tiny-Llama train + evaluate check and the perf sections."""
    env = dict(os.environ, DEVICE="cpu", PYTHON=sys.executable, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("SMOLLM2_GGUF", None)  # check 5 times the random model of SmolLM2's kind
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=460, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "latent log-density dtype under bf16 autocast: ['torch.float64']" in out
    assert "check 1: ok" in out and "gpu_check: all checks passed (cpu)" in out
    data = json.loads((tmp_path / "perf" / "perf-cpu.json").read_text())
    assert set(data["step"]["32"]["median_ms"]) == {"lora_torch", "mle", "blob", "blob_seq"}
    assert data["memory"]["32"]["blob"]["kind"] == "rss" and data["memory"]["32"]["blob"]["peak_mb"] > 0
    assert data["predict"]["sequential_over_mean"] > 1  # four draws cost more than one mean pass
    md = (tmp_path / "perf" / "perf-cpu.md").read_text()
    assert "**Training step**" in md and "**Targets**" in md
    assert "**Fixed per-step cost**" in md and "**Operators per step**" in md  # issue 31's figures, on the GPU too
    assert data["overhead"]["ops_per_step"]["blob"]["ops"] > data["overhead"]["ops_per_step"]["lora_torch"]["ops"]
    # check 5: the SmolLM2 cloze experiment's step on a 2-layer random model of the same kind
    assert "weights: random, a 2-layer model of SmolLM2-135M's kind" in out
    assert "model: LlamaForCausalLM, 2 layers, hidden 72, 9 heads (3 KV)" in out and "vocab 49152, tied embeddings True" in out
    assert "LoRA r=8 on q_proj, v_proj" in out
    assert re.search(r"16 cloze rows of \d+ tokens .*options 1-\d tokens", out)
    assert re.search(r"train step .*: mle [\d.]+ ms, blob [\d.]+ ms; blob/mle [\d.]+", out)
    assert re.search(r"blob N=10 sample-batched \d+ ms", out) and "peak memory (peak RSS" in out
    assert "check 5: ok" in out


def test_cloze_step_times_the_weights_smollm2_gguf_names(tmp_path):
    """benchmarks/cloze_step.py with SMOLLM2_GGUF: it loads that GGUF file (here a tiny random one) and says so."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from helpers import save_tiny_gguf

    path = save_tiny_gguf(tmp_path / "tiny.gguf")
    env = dict(os.environ, SMOLLM2_GGUF=str(path), BLOB_PYRO_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cloze_step.py"), "--device", "cpu", "--tiny"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"weights: real, {path} (SMOLLM2_GGUF)" in proc.stdout
    assert "model: LlamaForCausalLM, 2 layers, hidden 64, 4 heads (2 KV)" in proc.stdout  # the file's, not TINY's
    assert re.search(r"blob/mle [\d.]+", proc.stdout) and "sample-batched" in proc.stdout


@pytest.mark.parametrize("inherited", [None, "/opt/extra-site"])
def test_perf_memory_child_keeps_the_callers_pythonpath(monkeypatch, inherited):
    """The memory children must import what the parent imports: packages a caller put on PYTHONPATH (wheels
    unpacked into a folder, as on the GPU machine where this failed) come after the repo, not instead of it."""
    perf = _load_perf()
    if inherited is None:
        monkeypatch.delenv("PYTHONPATH", raising=False)
    else:
        monkeypatch.setenv("PYTHONPATH", inherited)
    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen["env"] = env
        return subprocess.CompletedProcess(cmd, 0, stdout='{"kind": "rss", "peak_mb": 1.0}\n', stderr="")

    monkeypatch.setattr(perf.subprocess, "run", fake_run)
    out = perf.run_memory_child("mle", types.SimpleNamespace(batch=2, device="cpu", model="minilm"), 32)
    assert out == {"kind": "rss", "peak_mb": 1.0}
    expected = [str(REPO)] + ([inherited] if inherited else [])
    assert seen["env"]["PYTHONPATH"].split(os.pathsep) == expected
    # a --compare-src side: that checkout first, and the child is told which one it measures
    perf.run_memory_child("mle", types.SimpleNamespace(batch=2, device="cpu", model="minilm"), 32, src=Path("/x/old"))
    assert seen["env"]["PYTHONPATH"].split(os.pathsep)[0] == "/x/old" and seen["env"]["BLOB_PERF_SRC"] == "/x/old"


def test_overhead_section_measures_every_configuration_including_the_paper_preset_and_compiled_ones(tmp_path):
    _perf(tmp_path, "--quick", "--sections", "overhead", "--compiled")
    data = json.loads((tmp_path / "perf-cpu-quick.json").read_text())
    over = data["overhead"]
    assert (over["batch"], over["seq_len"]) == (1, 16)
    eager = {"lora_torch", "mle", "blob", "blob_seq", "paper", "blob_torch"}
    assert set(over["median_ms"]) == eager | {"lora_compiled", "mle_compiled", "blob_compiled", "blob_compiled_cpp"}
    assert all(v > 0 for v in over["median_ms"].values())
    ops = over["ops_per_step"]
    assert set(ops) == eager  # a compiled kernel is no aten operator: the compiled ones are timed, not counted
    # blob's densities in one pass put it below its plain-PyTorch twin, which computes them per site; mle dispatches
    # about what plain LoRA does (its multi-tensor AdamW against LoRA's per-tensor loop: 951 against 955 on MiniLM)
    assert ops["blob"]["ops"] > ops["mle"]["ops"] > 100 and ops["lora_torch"]["ops"] > 100
    assert abs(ops["mle"]["ops"] - ops["lora_torch"]["ops"]) < 0.2 * ops["lora_torch"]["ops"]
    assert ops["blob_torch"]["ops"] > ops["lora_torch"]["ops"]
    assert set(over["compiled_over_lora_ms"]) == {"mle", "blob", "blob_cpp"}
    assert set(over["compiled_over_lora_compiled_ms"]) == {"mle", "blob"}
    assert over["compiled_ratio"]["blob_compiled/lora_torch"] > 0
    md = (tmp_path / "perf-cpu-quick.md").read_text()
    assert "**Fixed per-step cost**" in md and "paper preset" in md and "**Operators per step**" in md
    assert "**Compiled network**" in md and "blob compiled / LoRA (PyTorch)" in md
    assert "With Inductor's C++ wrapper (`compile_cpp_wrapper=true`): blob " in md


def test_fused_densities_script_times_both_paths():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fused_densities.py"), "--rounds", "2"],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"blob, B=1 T=16, 2 rounds, process CPU ms: per site [\d.]+, one pass [\d.]+, median per-round "
                     r"saving -?[\d.]+", proc.stdout)


def test_step_phases_splits_the_steps_of_mle_and_blob(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_phases.py"), "--quick", "--out", str(tmp_path)],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "step_phases.json").read_text())
    table = result["median_ms"]
    assert set(table) == {"mle", "blob"} and len(result["steps_s"]["blob"]) == 3
    for kind in ("mle", "blob"):
        for phase in ("network", "pyro traces", "backward", "optimizer", "logged kl"):
            assert 0 < table[kind][phase] < table[kind]["total"], (kind, phase)
    # mle's zero KL weight records zero densities: the one pass finds nothing to compute; blob's computes 24
    assert table["mle"]["densities"] < table["blob"]["densities"]
    assert "| pyro traces |" in (tmp_path / "step_phases.md").read_text()


def test_op_counts_count_operators_and_value_reads():
    perf = _load_perf()
    x = torch.ones(3)
    counts = perf.op_counts(lambda: ((x + 1) * 2).sum().item(), warmup=0)
    assert counts == {"ops": 4, "scalar_reads": 1}  # add, mul, sum, item (its _local_scalar_dense is inside it)
    assert perf.op_counts(lambda: bool(x.sum() > 0), warmup=0)["scalar_reads"] == 1  # a read under is_nonzero


def test_compare_mode_against_the_same_checkout(tmp_path):
    """--compare-src with this checkout on both sides: the workers, the interleaving and the report."""
    out = _perf(tmp_path, "--quick", "--sections", "overhead", "--compare-src", str(REPO))
    data = json.loads((tmp_path / "perf-cpu-quick-compare.json").read_text())
    assert data["sources"]["new"] == data["sources"]["old"]
    rows = {r["configuration"]: r for r in data["comparison"]["timing"]}
    assert set(rows) == {"lora_torch", "mle", "blob", "blob_seq", "paper", "blob_torch"}
    assert all(r["section"] == "overhead" and r["new/old"]["n"] == 7 for r in rows.values())
    # each side ran 7 rounds of its own: the same numbers as a plain run reports them
    assert data["new"]["overhead"]["median_ms"]["paper"] == pytest.approx(rows["paper"]["new_ms"])
    assert data["old"]["overhead"]["median_ms"]["paper"] == pytest.approx(rows["paper"]["old_ms"])
    assert len(data["old"]["overhead"]["cpu_ms"]["blob"]) == 7
    md = (tmp_path / "perf-cpu-quick-compare.md").read_text()
    assert "| overhead | B=1, T=16 | paper |" in md and "## new" in md and "## old" in md
    assert "new / old" in out


def test_compare_mode_drives_a_checkout_from_before_the_restructure(tmp_path):
    """The issue's comparison: every section against blob_pyro as of commit dc2f5b6 (TrainConfig, make_stepper)."""
    archive = tmp_path / "old.tar"
    proc = subprocess.run(["git", "archive", "-o", str(archive), BEFORE_RESTRUCTURE, "blob_pyro"], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"commit {BEFORE_RESTRUCTURE} is not in this clone's history: {proc.stderr.strip()[:200]}")
    old = tmp_path / "old"
    with tarfile.open(archive) as tar:
        tar.extractall(old, filter="data")
    _perf(tmp_path, "--quick", "--compare-src", str(old))
    data = json.loads((tmp_path / "perf-cpu-quick-compare.json").read_text())
    assert data["sources"]["new"]["blob_pyro"] == str(REPO / "blob_pyro")
    assert data["sources"]["old"]["blob_pyro"] == str(old.resolve() / "blob_pyro")
    assert (data["sources"]["new"]["api"], data["sources"]["old"]["api"]) == ("RunConfig", "TrainConfig (old)")
    timing = {(r["section"], r["configuration"]) for r in data["comparison"]["timing"]}
    assert timing == ({("step", k) for k in ("lora_torch", "mle", "blob", "blob_seq")}
                      | {("predict", k) for k in ("lora_forward", "mean", "sequential", "batched")}
                      | {("overhead", k) for k in ("lora_torch", "mle", "blob", "blob_seq", "paper", "blob_torch")})
    memory = {(r["seq_len"], r["configuration"]) for r in data["comparison"]["memory"]}
    assert memory == {(16, k) for k in ("lora_torch", "mle", "blob", "blob_seq")}
    for side in ("new", "old"):  # each side's own figures, as a plain run reports them
        assert {k for k in data[side]} == {"step", "memory", "predict", "overhead"}
    md = (tmp_path / "perf-cpu-quick-compare.md").read_text()
    assert "| step | B=2, T=16 | blob |" in md and "**Memory**" in md
