"""blob_pyro.cli exit codes and one-line errors that need no model: settings, data folders written here, run folders
made by hand, interrupts. A user's mistake prints one line on stderr, exits 2, and changes nothing on disk.

(Errors that need a loaded or trained model, and the real command in a subprocess: tests/integration/test_cli.py.)
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from blob_pyro.checkpoint import CHECKPOINT
from blob_pyro.cli import main, metrics_table, ppc_main
from blob_pyro.config import RunConfig
from blob_pyro.errors import RunError


def wg(i, answer="1", **over):
    rec = {"qID": f"q{i}", "sentence": f"The cup {i} beat the jug because _ was bigger.", "option1": "cup",
           "option2": "jug", "answer": answer}
    rec.update(over)
    return json.dumps(rec)


def data_folder(root: Path, train=None, dev=None) -> Path:
    """A winogrande folder: ``train``/``dev`` are lists of lines ("good": 8 and 4 good records); None skips a file."""
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


def error_line(capsys, argv, *, entry=main, prog="blob-pyro") -> str:
    """Run the CLI; it must exit 2 with exactly one non-empty stderr line and no traceback."""
    try:
        code = entry(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(prog), lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_folder(root: Path, *, finished=False, **config) -> Path:
    """A run folder as train writes it, up to config.json (no model files)."""
    run = root / "run"
    run.mkdir()
    cfg = RunConfig.from_dict({"model": "minilm", "dataset": "winogrande_s", **config}).resolve()
    (run / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "versions": {}}))
    (run / "train_log.jsonl").write_text("")
    if finished:
        (run / "metrics.json").write_text("{}")
    return run


# ---- help and flags ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [None, "train", "evaluate", "describe", "ppc"])
def test_help_of_every_command_prints_and_exits_0(command, capsys):
    argv = ([command] if command else []) + ["--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    if command == "train":  # every setting is a flag
        assert all(f"--{name.replace('_', '-')}" in out for name in RunConfig.field_names())


def test_a_percent_sign_in_a_settings_help_does_not_break_help(capsys, monkeypatch):
    # argparse %-formats help strings: a literal "%" in a config field's help once made `train --help` crash
    original = RunConfig.fields

    def fields(cls):
        out = dict(original())
        section, f, hint = out["gamma"]
        out["gamma"] = (section, dataclasses.field(default=8.0, metadata={"help": "costs ~30% more compute"}), hint)
        return out

    monkeypatch.setattr(RunConfig, "fields", classmethod(fields))
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0 and "~30% more compute" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["train", "--no-such-flag", "1"], "unrecognized arguments"),
    (["train", "--flipout", "maybe"], "expected true/false"),
    (["train", "--guide", "os.system"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_argument_errors_are_one_line(capsys, argv, needle):
    assert needle in error_line(capsys, argv)


def test_conflicting_runtime_settings_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--compile", "true", "--gradient-checkpointing", "true", "--output-dir", str(out)]
    assert "compile and gradient_checkpointing exclude each other" in error_line(capsys, argv)
    assert not out.exists()


def test_metrics_table():
    table = metrics_table({"dataset": "arc_easy", "split": "dev", "num_examples": 570, "num_samples": 10,
                           "ece_bins": 15, "accuracy": 0.5, "ece": 0.125, "nll": 0.75, "brier": 0.5, "entropy": 0.625,
                           "expected_entropy": 0.5, "mutual_information": 0.125, "aurc": 0.25, "accuracy_at_80": 0.5625})
    lines = table.splitlines()
    assert lines[0] == "arc_easy / dev  (N=570, samples=10, ECE bins=15)" and set(lines[1]) == {"-"}
    assert lines[2:] == ["accuracy                0.5000", "ece                     0.1250", "nll                     0.7500",
                         "brier                   0.5000", "entropy                 0.6250",
                         "expected_entropy        0.5000", "mutual_information      0.1250",
                         "aurc                    0.2500", "accuracy_at_80          0.5625"]


def test_metrics_table_prints_the_ood_aurocs():
    table = metrics_table({"dataset": "openbookqa", "split": "dev", "num_examples": 500, "num_samples": 10,
                           "ece_bins": 15, "accuracy": 0.5,
                           "ood": {"dataset": "arc_easy", "split": "dev", "num_examples": 570, "auroc_max_prob": 0.75,
                                   "auroc_entropy": 0.625, "auroc_mutual_information": 0.5}})
    assert table.splitlines()[3:] == ["", "OOD detection: arc_easy / dev (N=570) vs the above, AUROC of",
                                      "max_prob                0.7500", "entropy                 0.6250",
                                      "mutual_information      0.5000"]


def test_metrics_table_of_an_old_metrics_json_prints_what_it_has():
    lines = metrics_table({"dataset": "arc_easy", "accuracy": 0.5, "ece": 0.125}).splitlines()
    assert lines[0].endswith("ECE bins=?)") and len(lines) == 4


def test_ece_bins_must_be_positive(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path), "--ece-bins", "0"]) == 2
    assert "--ece-bins must be > 0" in capsys.readouterr().err
    assert main(["train", "--model", "minilm", "--dataset", "arc_easy", "--output-dir", str(tmp_path / "o"),
                 "--ece-bins", "0"]) == 2
    assert "ece_bins must be > 0" in capsys.readouterr().err


# ---- settings ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--prior-scale", "0"), ("--prior-scale", "-0.1"), ("--prior-scale", "nan"),
                                        ("--prior-scale", "inf"), ("--eps", "0"), ("--eps", "-1"), ("--eps", "nan"),
                                        ("--eps", "inf")])
def test_prior_scale_and_eps_must_be_positive_and_finite(tmp_path, capsys, flag, value):
    msg = error_line(capsys, ["train", *small(tmp_path, flag, value), "--output-dir", str(tmp_path / "out")])
    assert flag[2:].replace("-", "_") in msg and "> 0" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_max_steps_must_be_positive(tmp_path, capsys, steps):
    argv = small(tmp_path, "--output-dir", str(tmp_path / "out"))
    argv[argv.index("--max-steps") + 1] = steps
    msg = error_line(capsys, ["train", *argv])
    assert "max_steps" in msg and "> 0" in msg


def test_negative_num_samples(tmp_path, capsys):
    msg = error_line(capsys, ["train", *small(tmp_path, "--num-samples", "-1"), "--output-dir", str(tmp_path / "o")])
    assert "num_samples" in msg and ">= 0" in msg
    run = run_folder(tmp_path)
    msg = error_line(capsys, ["evaluate", "--run", str(run), "--num-samples", "-3"])
    assert "--num-samples" in msg and "-3" in msg
    msg = error_line(capsys, ["evaluate", "--run", str(run), "--batch-size", "0"])
    assert "--batch-size" in msg


@pytest.mark.parametrize("argv, needles", [
    (["--method", "mle", "--guide", "lowrank"], ("method=mle", "guide=lowrank")),
    (["--preset", "paper", "--prior", "student_t"], ("objective=paper", "prior=student_t")),
    (["--preset", "paper", "--method", "mcdropout"], ("preset=paper", "method=mcdropout")),
    (["--method", "mcdropout", "--lora-dropout", "0"], ("method=mcdropout", "lora_dropout")),
])
def test_conflicting_settings_name_both(tmp_path, capsys, argv, needles):
    msg = error_line(capsys, ["train", *small(tmp_path, *argv), "--output-dir", str(tmp_path / "out")])
    assert all(n in msg for n in needles), msg
    assert not (tmp_path / "out").exists()


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


@pytest.mark.parametrize("field", ["guide", "prior", "method", "std_param"])
def test_config_values_cannot_name_callables(tmp_path, capsys, field, monkeypatch):
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({field: "os.system"}))
    assert field in error_line(capsys, ["train", "--config", str(cfg_file), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    run = run_folder(tmp_path)
    data = json.loads((run / "config.json").read_text())
    section = RunConfig.fields()[field][0]
    (data["config"][section] if section else data["config"])[field] = "os.system"
    (run / "config.json").write_text(json.dumps(data))
    before = snapshot(run)
    assert field in error_line(capsys, ["evaluate", "--run", str(run), "--quiet"])
    assert field in error_line(capsys, ["train", "--resume", str(run), "--quiet"])
    assert not called and snapshot(run) == before


def test_trust_remote_code_only_with_the_explicit_flag(tmp_path, capsys):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"trust_remote_code": True}))
    msg = error_line(capsys, ["train", "--config", str(cfg_file), "--output-dir", str(tmp_path / "out")])
    assert "--trust-remote-code" in msg


# ---- data ----------------------------------------------------------------------------------------------------
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


def test_batch_larger_than_the_training_split(tmp_path, capsys):
    data = data_folder(tmp_path, train=[wg(0), wg(1)], dev="good")
    msg = error_line(capsys, ["train", *small(data), "--output-dir", str(tmp_path / "out")])
    assert "batch_size=4" in msg and "2 examples" in msg


def test_unknown_dataset_lists_valid_names(tmp_path, capsys):
    data = data_folder(tmp_path, "good", "good")
    argv = small(data, "--output-dir", str(tmp_path / "out"))
    argv[argv.index("winogrande_s")] = "winogrand"
    msg = error_line(capsys, ["train", *argv])
    assert "'winogrand'" in msg and "winogrande_s" in msg and "arc_easy" in msg and "mmlu_" in msg


def test_model_path_that_does_not_exist(tmp_path, capsys):
    data = data_folder(tmp_path, "good", "good")
    argv = small(data, "--output-dir", str(tmp_path / "out"))
    argv[argv.index("minilm")] = str(tmp_path / "no_model")
    msg = error_line(capsys, ["train", *argv])
    assert "no_model" in msg and "does not exist" in msg
    assert not (tmp_path / "out").exists()


# ---- output and run folders ------------------------------------------------------------------------------------
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


def test_not_a_run_folder(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    assert "no config.json" in error_line(capsys, ["evaluate", "--run", str(tmp_path / "stuff")])
    assert "does not exist" in error_line(capsys, ["evaluate", "--run", str(tmp_path / "none")])
    (tmp_path / "stuff" / "config.json").write_text("{not json")
    assert "not valid JSON" in error_line(capsys, ["evaluate", "--run", str(tmp_path / "stuff")])
    (tmp_path / "stuff" / "config.json").write_text("[1]")
    assert "does not hold a run configuration" in error_line(capsys, ["evaluate", "--run", str(tmp_path / "stuff")])


def test_a_run_that_did_not_finish_has_no_adapter(tmp_path, capsys):
    run = run_folder(tmp_path)
    msg = error_line(capsys, ["evaluate", "--run", str(run), "--quiet"])
    assert "adapter_config.json" in msg and "did not finish" in msg


def test_resume_errors(tmp_path, capsys):
    assert "does not exist" in error_line(capsys, ["train", "--resume", str(tmp_path / "none")])
    done = run_folder(tmp_path, finished=True)
    assert "already finished" in error_line(capsys, ["train", "--resume", str(done)])
    msg = error_line(capsys, ["train", "--resume", str(done), "--lr", "0.1", "--output-dir", str(tmp_path)])
    assert "--lr" in msg and "--output-dir" in msg and "config.json" in msg
    assert "--output-dir" in error_line(capsys, ["train", "--max-steps", "3"])


def test_corrupted_checkpoint_on_resume(tmp_path, capsys):
    run = run_folder(tmp_path)
    (run / CHECKPOINT).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    before = snapshot(run)
    msg = error_line(capsys, ["train", "--resume", str(run)])
    assert CHECKPOINT in msg and "corrupted" in msg
    assert snapshot(run) == before


# ---- exit codes of the entry points ------------------------------------------------------------------------------
def test_library_errors_are_joined_into_one_line(tmp_path, capsys, monkeypatch):
    import blob_pyro.training as training

    def fail(*args, **kwargs):
        raise RunError("first line\n  second line")

    monkeypatch.setattr(training, "train_run", fail)
    msg = error_line(capsys, ["train", "--output-dir", str(tmp_path / "out")])
    assert msg == "blob-pyro: error: first line second line"


@pytest.mark.parametrize("error, code", [("interrupted", 143), ("keyboard", 130)])
def test_an_interrupt_exits_with_128_plus_the_signal(tmp_path, capsys, monkeypatch, error, code):
    import blob_pyro.training as training

    def stop(*args, **kwargs):
        if error == "interrupted":
            raise training.TrainingInterrupted("interrupted after step 3; checkpoint saved, continue with "
                                               "blob-pyro train --resume out", 143)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_run", stop)
    assert main(["train", "--output-dir", str(tmp_path / "out"), "--quiet"]) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("blob-pyro: ")
    assert ("--resume out" in err[0]) if error == "interrupted" else err[0] == "blob-pyro: interrupted"


def test_ppc_script_entry_point_errors(tmp_path, capsys):
    msg = error_line(capsys, ["--run", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], entry=ppc_main,
                     prog="ppc.py")
    assert msg.startswith("ppc.py: error:") and "does not exist" in msg
    msg = error_line(capsys, ["--run", str(tmp_path), "--out", str(tmp_path / "o"), "--num-samples", "0"],
                     entry=ppc_main, prog="ppc.py")
    assert "--num-samples must be >= 1" in msg
    assert "required" in error_line(capsys, ["--run", str(tmp_path)], entry=ppc_main, prog="ppc.py")
    assert not (tmp_path / "o").exists()


def test_ppc_without_the_workflow_extra_is_one_line(monkeypatch, capsys, tmp_path):
    import builtins
    import sys

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "arviz" or name.startswith("arviz."):
            raise ImportError("No module named 'arviz'", name="arviz")
        return real(name, *args, **kwargs)

    for mod in ("blob_pyro.ppc", "blob_pyro.arviz_io"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    monkeypatch.setattr(builtins, "__import__", fake)
    code = main(["ppc", "--run", str(tmp_path), "--out", str(tmp_path / "ppc")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "workflow extra" in err and "arviz" in err
    assert not (tmp_path / "ppc").exists()


# ---- ensemble and temperature: bad input is one line, exit 2, nothing written ---------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--method", "ensemble", "--ensemble-size", "1"], "method=ensemble needs ensemble_size >= 2; got ensemble_size=1"),
    (["--method", "mle", "--ensemble-size", "3"], "ensemble_size is a setting of method=ensemble; got method=mle"),
    (["--method", "temperature", "--calibration-fraction", "0.01"], "calibration_fraction=0.01 of 8 training examples "
                                                                    "holds out none"),
    (["--method", "temperature", "--calibration-fraction", "0"], "0 < calibration_fraction < 1"),
    (["--method", "blob", "--calibration-fraction", "0.2"], "calibration_fraction is a setting of method=temperature"),
    (["--method", "temperature", "--calibration-fraction", "0.75"], "batch_size=4 is larger than the training split "
                                                                    "(2 examples)"),
    (["--method", "laplace", "--guide", "blob"], "method=laplace implies guide=auto_delta; got guide=blob"),
    (["--method", "laplace", "--prior", "laplace"], "method=laplace implies prior=normal; got prior=laplace"),
    (["--method", "laplace", "--laplace-hessian", "block"], "invalid choice: 'block'"),
    (["--method", "map", "--laplace-subset", "last_layer"], "laplace_subset is a setting of method=laplace"),
])
def test_bad_ensemble_and_temperature_settings_write_nothing(tmp_path, capsys, extra, needle):
    data = data_folder(tmp_path, train="good", dev="good")
    argv = ["train", *[a for a in small(data) if a not in ("--num-samples", "2")], *extra,
            "--output-dir", str(tmp_path / "out")]
    assert needle in error_line(capsys, argv)
    assert not (tmp_path / "out").exists()


def test_an_ensemble_with_bad_data_writes_nothing(tmp_path, capsys):
    data = data_folder(tmp_path, train=[wg(0), wg(1)], dev="good")
    argv = ["train", *small(data), "--method", "ensemble", "--output-dir", str(tmp_path / "out")]
    assert "batch_size=4" in error_line(capsys, argv)
    assert not (tmp_path / "out").exists()


def test_resume_of_a_finished_ensemble_is_refused(tmp_path, capsys):
    run = run_folder(tmp_path, finished=True, method="ensemble")
    assert "already finished" in error_line(capsys, ["train", "--resume", str(run)])


def test_an_ensemble_whose_first_member_cannot_load_its_model_writes_nothing(tmp_path, capsys):
    data = data_folder(tmp_path, "good", "good")
    argv = small(data, "--method", "ensemble", "--output-dir", str(tmp_path / "out"))
    argv[argv.index("minilm")] = str(tmp_path / "no_model")
    assert "does not exist" in error_line(capsys, ["train", *argv])
    assert not (tmp_path / "out").exists()
