"""The blob-pyro command line: describe, train/evaluate exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest

from blob_pyro.cli import main


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "blob_pyro.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


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


def test_train_and_evaluate_end_to_end(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    res = _cli("train", "--model", str(tiny_llama_dir), "--dataset", "winogrande_s", "--data-dir", str(data_dir),
               "--max-steps", "3", "--batch-size", "4", "--train-limit", "8", "--eval-limit", "8",
               "--num-samples", "2", "--max-length", "48", "--output-dir", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "accuracy" in res.stdout and "ece" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_examples"] == 8
    ev = _cli("evaluate", "--run", str(out), "--dataset", "winogrande_s", "--data-dir", str(data_dir),
              "--num-samples", "0", "--output", str(tmp_path / "m0.json"), "--quiet")
    assert ev.returncode == 0, ev.stderr
    m0 = json.loads((tmp_path / "m0.json").read_text())
    assert m0["num_samples"] == 0 and m0["split"] == "dev"


def test_wrong_dataset_name_is_one_line_error(tmp_path):
    res = _cli("train", "--model", "minilm", "--dataset", "winogrand", "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 2
    line = _one_line_error(res.stderr)
    assert "winogrand" in line and "winogrande_s" in line  # names the valid datasets
    assert not (tmp_path / "o").exists()


def test_missing_data_folder_is_one_line_error(tmp_path):
    res = _cli("train", "--model", "minilm", "--dataset", "arc_easy", "--data-dir", str(tmp_path / "nope"),
               "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 2
    assert "nope" in _one_line_error(res.stderr)


def test_unknown_target_modules_lists_linear_layers(data_dir, tmp_path):
    res = _cli("train", "--model", "minilm", "--dataset", "winogrande_s", "--data-dir", str(data_dir),
               "--target-modules", "q_proj,v_proj", "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 2
    line = _one_line_error(res.stderr)
    assert "q_proj" in line and "query" in line and "value" in line


@pytest.mark.parametrize("flag,value", [("--prior-scale", "0"), ("--eps", "-1"), ("--max-steps", "0"),
                                        ("--num-samples", "-1"), ("--prior-scale", "nan")])
def test_bad_numbers_are_refused(flag, value, tmp_path, capsys):
    assert main(["train", "--model", "minilm", "--output-dir", str(tmp_path / "o"), flag, value]) == 2
    err = capsys.readouterr().err
    assert flag[2:].replace("-", "_") in _one_line_error(err)


@pytest.mark.parametrize("command", [None, "train", "evaluate", "describe", "ppc"])
def test_help_of_every_command_prints_and_exits_0(command, capsys):
    # argparse %-formats help text: a literal "%" in a config field's help once made `train --help` crash
    argv = ([command] if command else []) + ["--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    if command == "train":
        assert "~30% more compute" in out
