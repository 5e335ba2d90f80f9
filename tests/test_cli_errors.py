"""A user's mistake gives one line on stderr, exit status 2, no traceback, and damages nothing.

Most cases call ``blob_pyro.cli.main`` in this process; two run the real command to check that no
library noise (warnings, progress bars) reaches stderr. Data errors use small data folders written
here, so no benchmark download or shared data is needed.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blob_pyro.cli import main
from blob_pyro.config import TrainConfig
from blob_pyro.runs import train_run

REPO = Path(__file__).resolve().parents[1]


def wg(i, answer="1", **over):
    rec = {"qID": f"q{i}", "sentence": f"The cup {i} beat the jug because _ was bigger.", "option1": "cup",
           "option2": "jug", "answer": answer}
    rec.update(over)
    return json.dumps(rec)


def data_folder(root: Path, train=None, dev=None) -> Path:
    """A winogrande folder: ``train``/``dev`` are lists of lines (default: 8 and 4 good records); None skips a file."""
    folder = root / "data"
    (folder / "winogrande").mkdir(parents=True, exist_ok=True)
    train = [wg(i, "12"[i % 2]) for i in range(8)] if train == "good" else train
    dev = [wg(i, "21"[i % 2]) for i in range(4)] if dev == "good" else dev
    for name, lines in (("train_s.jsonl", train), ("dev.jsonl", dev)):
        if lines is not None:
            (folder / "winogrande" / name).write_text("".join(line + "\n" for line in lines))
    return folder


def small(data_dir, *extra) -> list[str]:
    return ["--model", "minilm", "--dataset", "winogrande_s", "--data-dir", str(data_dir), "--max-length", "32",
            "--batch-size", "4", "--max-steps", "1", "--num-samples", "2", "--quiet", *extra]


def error_line(capsys, argv) -> str:
    """Run the CLI; it must exit 2 with exactly one non-empty stderr line and no traceback."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("blob-pyro")
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-step run on a synthetic data folder."""
    root = tmp_path_factory.mktemp("tiny")
    data = data_folder(root, "good", "good")
    cfg = TrainConfig(model="minilm", dataset="winogrande_s", data_dir=str(data), max_length=32, batch_size=4,
                      max_steps=1, num_samples=2, seed=1)
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


# ---- data --------------------------------------------------------------------------------------------
def test_missing_data_folder(tmp_path, capsys):
    msg = error_line(capsys, ["train", *small(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out")])
    assert "nowhere" in msg and "does not exist" in msg
    assert not (tmp_path / "out").exists()


def test_missing_split_file(tmp_path, capsys):
    data = data_folder(tmp_path, train=None, dev="good")
    msg = error_line(capsys, ["train", *small(data), "--output-dir", str(tmp_path / "out")])
    assert "train_s.jsonl" in msg and "missing" in msg


def test_malformed_jsonl_line_names_file_and_line(tmp_path, capsys):
    data = data_folder(tmp_path, train=[wg(0), '{"sentence": "broken', wg(2), wg(3)], dev="good")
    msg = error_line(capsys, ["train", *small(data), "--output-dir", str(tmp_path / "out")])
    assert f"{data / 'winogrande' / 'train_s.jsonl'}:2" in msg and "malformed" in msg


def test_record_missing_a_field(tmp_path, capsys):
    broken = json.dumps({k: v for k, v in json.loads(wg(1)).items() if k != "option2"})
    data = data_folder(tmp_path, train=[wg(0), broken, wg(2), wg(3)], dev="good")
    msg = error_line(capsys, ["train", *small(data), "--output-dir", str(tmp_path / "out")])
    assert "train_s.jsonl:2" in msg and "'option2'" in msg


def test_out_of_range_label(tmp_path, capsys):
    data = data_folder(tmp_path, train="good", dev=[wg(0), wg(1, answer="3")])
    msg = error_line(capsys, ["train", *small(data), "--output-dir", str(tmp_path / "out")])
    assert "dev.jsonl:2" in msg and "'3'" in msg and "out of range" in msg


def test_empty_split(tmp_path, capsys):
    data = data_folder(tmp_path, train=[], dev="good")
    msg = error_line(capsys, ["train", *small(data), "--output-dir", str(tmp_path / "out")])
    assert "train_s.jsonl" in msg and "empty" in msg


def test_unknown_dataset_lists_valid_names(tmp_path, capsys):
    data = data_folder(tmp_path, "good", "good")
    argv = small(data, "--output-dir", str(tmp_path / "out"))
    argv[argv.index("winogrande_s")] = "winogrand"
    msg = error_line(capsys, ["train", *argv])
    assert "'winogrand'" in msg and "winogrande_s" in msg and "arc_easy" in msg and "mmlu_" in msg


# ---- model ---------------------------------------------------------------------------------------------
def test_model_path_that_does_not_exist(tmp_path, capsys):
    data = data_folder(tmp_path, "good", "good")
    argv = small(data, "--output-dir", str(tmp_path / "out"))
    argv[argv.index("minilm")] = str(tmp_path / "no_model")
    msg = error_line(capsys, ["train", *argv])
    assert "no_model" in msg and "does not exist" in msg


def test_target_modules_not_in_model_lists_its_linear_layers(tmp_path, capsys):
    data = data_folder(tmp_path, "good", "good")
    msg = error_line(capsys, ["train", *small(data, "--target-modules", "q_proj,value"),
                              "--output-dir", str(tmp_path / "out")])
    assert "q_proj" in msg and "query" in msg and "dense" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("doctor,needle", [
    (lambda run: edit_json(run / "adapter" / "adapter_config.json",
                           lambda d: d.update(base_model_name_or_path="someone/other-model")), "someone/other-model"),
    (lambda run: edit_json(run / "config.json", lambda d: d["config"].update(lora_r=4)), "rank"),
    (lambda run: edit_json(run / "adapter" / "adapter_config.json", lambda d: d.update(r=16)), "rank"),
    (lambda run: edit_json(run / "adapter" / "adapter_config.json",
                           lambda d: d.update(target_modules=["key", "value"])), "targets"),
    (lambda run: edit_json(run / "config.json", lambda d: d["config"].update(target_modules=["query", "key"])), "targets"),
    (lambda run: edit_json(run / "config.json", lambda d: d["config"].update(bayesian_factor="A")), "does not fit"),
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


def test_not_a_run_folder(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    assert "no config.json" in error_line(capsys, ["evaluate", "--run", str(tmp_path / "stuff")])
    assert "does not exist" in error_line(capsys, ["evaluate", "--run", str(tmp_path / "none")])


# ---- settings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--prior-scale", "0"), ("--prior-scale", "-0.1"), ("--prior-scale", "nan"),
                                        ("--prior-scale", "inf"), ("--eps", "0"), ("--eps", "-1"), ("--eps", "nan"),
                                        ("--eps", "inf")])
def test_prior_scale_and_eps_must_be_positive_and_finite(tmp_path, capsys, flag, value):
    msg = error_line(capsys, ["train", *small(tmp_path, flag, value), "--output-dir", str(tmp_path / "out")])
    assert flag[2:].replace("-", "_") in msg and "> 0" in msg


def test_negative_num_samples(tiny_run, tmp_path, capsys):
    msg = error_line(capsys, ["train", *small(tmp_path, "--num-samples", "-1"), "--output-dir", str(tmp_path / "o")])
    assert "num_samples" in msg and ">= 0" in msg
    msg = error_line(capsys, ["evaluate", "--run", str(tiny_run), "--num-samples", "-3"])
    assert "--num-samples" in msg and "-3" in msg


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_max_steps_must_be_positive(tmp_path, capsys, steps):
    argv = small(tmp_path, "--output-dir", str(tmp_path / "out"))
    argv[argv.index("--max-steps") + 1] = steps
    msg = error_line(capsys, ["train", *argv])
    assert "max_steps" in msg and "> 0" in msg


def test_wrong_type_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"lora_r": "eight"}))
    msg = error_line(capsys, ["train", "--config", str(cfg), "--output-dir", str(tmp_path / "out")])
    assert "lora_r" in msg and "'eight'" in msg


def test_unknown_config_key_is_named_with_closest_suggestion(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("prior_scal: 0.1\n")
    msg = error_line(capsys, ["train", "--config", str(cfg), "--output-dir", str(tmp_path / "out")])
    assert "'prior_scal'" in msg and "did you mean 'prior_scale'" in msg


def test_non_empty_output_folder_is_refused_and_untouched(tmp_path, capsys):
    data = data_folder(tmp_path, "good", "good")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    before = snapshot(out)
    msg = error_line(capsys, ["train", *small(data), "--output-dir", str(out)])
    assert "not empty" in msg and "--overwrite" in msg
    msg = error_line(capsys, ["train", *small(data), "--output-dir", str(out), "--overwrite"])
    assert "not a blob_pyro run folder" in msg  # --overwrite deletes run folders only
    assert snapshot(out) == before


def test_overwrite_replaces_a_run_folder(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    (run / "stale.txt").write_text("old")
    data = json.loads((run / "config.json").read_text())["config"]["data_dir"]
    assert main(["train", *small(data), "--output-dir", str(run), "--overwrite"]) == 0
    assert not (run / "stale.txt").exists() and (run / "metrics.json").is_file()


# ---- resume ----------------------------------------------------------------------------------------------
def test_resume_errors(tiny_run, tmp_path, capsys):
    assert "does not exist" in error_line(capsys, ["train", "--resume", str(tmp_path / "none")])
    assert "already finished" in error_line(capsys, ["train", "--resume", str(tiny_run)])
    msg = error_line(capsys, ["train", "--resume", str(tiny_run), "--lr", "0.1", "--output-dir", str(tmp_path)])
    assert "--lr" in msg and "--output-dir" in msg and "config.json" in msg
    assert "--output-dir" in error_line(capsys, ["train", "--max-steps", "3"])


def test_corrupted_checkpoint_on_resume(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    (run / "metrics.json").unlink()
    (run / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    before = snapshot(run)
    msg = error_line(capsys, ["train", "--resume", str(run)])
    assert "checkpoint.safetensors" in msg and "corrupted" in msg
    assert snapshot(run) == before


# ---- the real command: nothing but the one line reaches stderr --------------------------------------------
@pytest.mark.parametrize("case", ["dataset", "targets"])
def test_real_command_prints_only_the_error(tmp_path, case):
    data = data_folder(tmp_path, "good", "good")
    argv = small(data, "--output-dir", str(tmp_path / "out"))
    if case == "dataset":
        argv[argv.index("winogrande_s")] = "boolqq"
    else:
        argv += ["--target-modules", "nope"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "blob_pyro.cli", "train", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("blob-pyro: error: "), proc.stderr
    assert ("boolqq" if case == "dataset" else "nope") in proc.stderr
