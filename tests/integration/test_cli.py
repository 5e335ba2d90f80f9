"""The blob-pyro command line with real models: describe, train/evaluate end to end, and the one-line errors that
need a loaded model or a trained run (doctored run folders, damaged weights), plus the real command's stderr.

(Every error that fails before a model loads — settings, data folders, hand-made run folders, exit codes — is in
tests/unit/test_cli.py.)"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blob_pyro.cli import main
from blob_pyro.config import RunConfig
from blob_pyro.training import train_run

REPO = Path(__file__).resolve().parents[2]


def _cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "blob_pyro.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=600)


def wg(i, answer="1"):
    return json.dumps({"qID": f"q{i}", "sentence": f"The cup {i} beat the jug because _ was bigger.",
                       "option1": "cup", "option2": "jug", "answer": answer})


def data_folder(root: Path) -> Path:
    """A winogrande folder with 8 training and 4 dev records."""
    folder = root / "data"
    (folder / "winogrande").mkdir(parents=True, exist_ok=True)
    (folder / "winogrande" / "train_s.jsonl").write_text("".join(wg(i, "12"[i % 2]) + "\n" for i in range(8)))
    (folder / "winogrande" / "dev.jsonl").write_text("".join(wg(i, "21"[i % 2]) + "\n" for i in range(4)))
    return folder


def small(data_dir, *extra) -> list[str]:
    return ["--model", "minilm", "--dataset", "winogrande_s", "--data-dir", str(data_dir), "--max-length", "32",
            "--batch-size", "4", "--max-steps", "1", "--num-samples", "2", "--quiet", *extra]


def error_line(capsys, argv) -> str:
    """Run the CLI; it must exit 2 with exactly one non-empty stderr line and no traceback."""
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("blob-pyro")
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-step MiniLM run on a synthetic data folder."""
    root = tmp_path_factory.mktemp("tiny")
    data = data_folder(root)
    cfg = RunConfig.from_dict({"model": "minilm", "dataset": "winogrande_s", "data_dir": str(data), "max_length": 32,
                               "batch_size": 4, "max_steps": 1, "num_samples": 2, "seed": 1})
    train_run(cfg, root / "run", progress=False)
    return root / "run"


def copy_run(tiny_run, tmp_path) -> Path:
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    return run


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ---- describe -------------------------------------------------------------------------------------------------
def test_describe_lists_minilm_lora_b_sites(capsys):
    assert main(["describe", "--model", "minilm"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if ".lora_B" in line]
    assert len(rows) == 12
    assert all("Normal(0, 0.2)" in row and "(384, 8)" in row for row in rows)
    assert "bert.encoder.layer.3.attention.self.query.lora_B" in out
    assert "frozen" in out and "deterministic" in out and "variational" in out
    assert "newly initialised" in out


def test_describe_paper_preset_makes_a_bayesian(capsys):
    assert main(["describe", "--model", "minilm", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert sum(".lora_A " in line for line in out.splitlines()) == 12
    assert ".lora_B " not in out


def test_describe_refuses_a_conflict(capsys):
    msg = error_line(capsys, ["describe", "--model", "minilm", "--method", "bbb", "--guide", "blob"])
    assert "method=bbb" in msg and "guide=blob" in msg


# ---- train and evaluate ---------------------------------------------------------------------------------------
def test_train_and_evaluate_end_to_end(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    res = _cli("train", "--model", str(tiny_llama_dir), "--dataset", "winogrande_s", "--data-dir", str(data_dir),
               "--max-steps", "3", "--batch-size", "4", "--train-limit", "8", "--eval-limit", "8",
               "--num-samples", "2", "--max-length", "48", "--output-dir", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "accuracy" in res.stdout and "ece" in res.stdout and f"run written to {out}" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_examples"] == 8 and metrics["num_samples"] == 2
    ev = _cli("evaluate", "--run", str(out), "--dataset", "winogrande_s", "--data-dir", str(data_dir),
              "--num-samples", "0", "--output", str(tmp_path / "m0.json"), "--quiet")
    assert ev.returncode == 0, ev.stderr
    m0 = json.loads((tmp_path / "m0.json").read_text())
    assert m0["num_samples"] == 0 and m0["split"] == "dev"


def test_evaluate_prints_and_writes_the_uncertainty_metrics(tiny_run, tmp_path, capsys):
    trained = json.loads((tiny_run / "metrics.json").read_text())  # train writes them too, with the bin count
    assert trained["ece_bins"] == 15 and trained["mutual_information"] >= 0
    names = ("entropy", "expected_entropy", "mutual_information", "aurc", "accuracy_at_80")
    for samples in ("2", "0"):
        out_file = tmp_path / f"m{samples}.json"
        assert main(["evaluate", "--run", str(tiny_run), "--num-samples", samples, "--ece-bins", "5",
                     "--output", str(out_file), "--quiet"]) == 0
        printed = capsys.readouterr().out.splitlines()
        assert printed[0].endswith(f"(N=4, samples={samples}, ECE bins=5)")
        m = json.loads(out_file.read_text())
        assert m["ece_bins"] == 5 and m["num_examples"] == 4
        for name in ("accuracy", "ece", "nll", "brier") + names:
            assert any(line.split()[:2] == [name, f"{m[name]:.4f}"] for line in printed), (name, printed)
        assert 0 <= m["expected_entropy"] <= m["entropy"] <= 0.6932 and 0 <= m["aurc"] <= 1
        assert m["mutual_information"] == pytest.approx(m["entropy"] - m["expected_entropy"], abs=1e-9)
        if samples == "0":  # the posterior mean is one draw: no epistemic part
            assert m["mutual_information"] == 0.0


def test_evaluate_ood_dataset_reports_the_aurocs(tiny_run, data_dir, tmp_path, capsys):
    data = tmp_path / "data"  # the run's winogrande folder plus 6 ARC-Easy dev questions
    shutil.copytree(tiny_run.parent / "data", data)
    (data / "arc_easy").mkdir()
    lines = (Path(data_dir) / "arc_easy" / "dev.jsonl").read_text().splitlines()[:6]
    (data / "arc_easy" / "dev.jsonl").write_text("\n".join(lines) + "\n")
    out_file = tmp_path / "m.json"
    assert main(["evaluate", "--run", str(tiny_run), "--data-dir", str(data), "--ood-dataset", "arc_easy",
                 "--output", str(out_file), "--quiet"]) == 0
    printed = capsys.readouterr().out
    m = json.loads(out_file.read_text())
    assert (m["dataset"], m["num_examples"]) == ("winogrande_s", 4)  # the in-distribution keys are unchanged
    ood = m["ood"]
    assert (ood["dataset"], ood["split"], ood["num_examples"]) == ("arc_easy", "dev", 6)
    assert all(0 <= ood[f"auroc_{k}"] <= 1 for k in ("max_prob", "entropy", "mutual_information"))
    assert "OOD detection: arc_easy / dev (N=6) vs the above, AUROC of" in printed
    assert f"max_prob{ood['auroc_max_prob']:>22.4f}" in printed
    # afterwards the head scores the run's own options again: the same metrics as without the OOD split
    from blob_pyro.data import load_split
    from blob_pyro.training import evaluate, load_run

    run = load_run(tiny_run, data_dir=str(data))
    head = run.model.head
    with_ood = evaluate(run, num_samples=0, progress=False, ood_data=load_split("arc_easy", "eval", str(data)))
    assert run.model.head is head and with_ood["ood"]["num_examples"] == 6
    assert evaluate(run, num_samples=0, progress=False) == {k: v for k, v in with_ood.items() if k != "ood"}


def test_overwrite_replaces_a_run_folder(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    (run / "stale.txt").write_text("old")
    data = json.loads((run / "config.json").read_text())["config"]["data_dir"]
    assert main(["train", *small(data), "--output-dir", str(run), "--overwrite"]) == 0
    assert not (run / "stale.txt").exists() and (run / "metrics.json").is_file()


# ---- errors that need a model or a trained run ----------------------------------------------------------------
def test_target_modules_not_in_model_lists_its_linear_layers(tmp_path, capsys):
    data = data_folder(tmp_path)
    msg = error_line(capsys, ["train", *small(data, "--target-modules", "q_proj,value"),
                              "--output-dir", str(tmp_path / "out")])
    assert "q_proj" in msg and "query" in msg and "dense" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("doctor,needle", [
    (lambda run: edit_json(run / "adapter" / "adapter_config.json",
                           lambda d: d.update(base_model_name_or_path="someone/other-model")), "someone/other-model"),
    (lambda run: edit_json(run / "config.json", lambda d: d["config"]["adapter"].update(lora_r=4)), "rank"),
    (lambda run: edit_json(run / "adapter" / "adapter_config.json", lambda d: d.update(r=16)), "rank"),
    (lambda run: edit_json(run / "adapter" / "adapter_config.json",
                           lambda d: d.update(target_modules=["key", "value"])), "targets"),
    (lambda run: edit_json(run / "config.json",
                           lambda d: d["config"]["adapter"].update(target_modules=["query", "key"])), "targets"),
    (lambda run: edit_json(run / "config.json", lambda d: d["config"]["bayes"].update(bayesian_factor="A")),
     "does not fit"),
], ids=["base-model", "rank-config", "rank-adapter", "targets-adapter", "targets-config", "factor"])
def test_run_made_for_another_model_rank_or_targets(tiny_run, tmp_path, capsys, doctor, needle):
    run = copy_run(tiny_run, tmp_path)
    doctor(run)
    before = snapshot(run)
    msg = error_line(capsys, ["evaluate", "--run", str(run), "--quiet"])
    assert needle in msg
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupted_posterior_is_one_line(tiny_run, tmp_path, capsys, damage):
    run = copy_run(tiny_run, tmp_path)
    path = run / "posterior.safetensors"
    raw = path.read_bytes()
    path.write_bytes({"garbage": b"\xff" * 64, "truncated": raw[: len(raw) // 2], "empty": b""}[damage])
    msg = error_line(capsys, ["evaluate", "--run", str(run), "--quiet"])
    assert "posterior.safetensors" in msg and "corrupted" in msg


def test_corrupted_adapter_weights_is_one_line(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 32)
    msg = error_line(capsys, ["evaluate", "--run", str(run), "--quiet"])
    assert "adapter" in msg


# ---- the real command: nothing but the one line reaches stderr --------------------------------------------------
@pytest.mark.parametrize("case", ["dataset", "targets"])
def test_real_command_prints_only_the_error(tmp_path, case):
    data = data_folder(tmp_path)
    argv = small(data, "--output-dir", str(tmp_path / "out"))
    if case == "dataset":
        argv[argv.index("winogrande_s")] = "boolqq"
    else:
        argv += ["--target-modules", "nope"]
    proc = _cli("train", *argv)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("blob-pyro: error: "), proc.stderr
    assert ("boolqq" if case == "dataset" else "nope") in proc.stderr
    assert not (tmp_path / "out").exists()
