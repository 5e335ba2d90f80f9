"""blob_pyro.compare without a network: entries, the refusals that come before any training, reuse and resume of
entry folders (train_run/resume_run stood in by fakes that write a run folder), the table and the figure.
(End to end on MiniLM: tests/integration/test_compare.py.)"""

import json

import pytest
import torch
from safetensors.torch import save_file

import blob_pyro.training as training
from blob_pyro.cli import main
from blob_pyro.compare import COMPARE_FILE, Comparison, compare, parse_entry
from blob_pyro.config import RunConfig
from blob_pyro.errors import ConfigError, RunError

BASE = RunConfig.from_dict({"model": "minilm", "dataset": "arc_easy", "max_steps": 3, "batch_size": 2})


def test_parse_entry():
    assert parse_entry("mle") == ("mle", {"method": "mle"})
    assert parse_entry("blob,preset=paper,prior_scale=0.1,flipout=false") == (
        "blob,preset=paper,prior_scale=0.1,flipout=false",
        {"method": "blob", "preset": "paper", "prior_scale": 0.1, "flipout": False})
    for bad in ("", "preset=paper", "blob,lr", "blob,=3"):
        with pytest.raises(ConfigError):
            parse_entry(bad)


def _fake_run(labels_probs):
    """A train_run that writes what a finished run folder holds, with fixed predictions per method."""
    calls = []

    def train_run(cfg, out, progress=True, overwrite=False):
        calls.append(("train", cfg.method, out.name))
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
        labels, probs = labels_probs[cfg.method]
        save_file({"labels": labels, "probs": probs}, str(out / training.PREDICTIONS))
        conf = float(probs.max(-1).values.mean())
        acc = float((probs.argmax(-1) == labels).double().mean())
        metrics = {"accuracy": acc, "ece": abs(conf - acc), "nll": 1.0, "brier": 0.5, "confidence": conf,
                   "dataset": cfg.dataset, "split": "dev", "num_examples": len(labels), "num_samples":
                   cfg.predict.num_samples, "ece_bins": 15}
        (out / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    def resume_run(out, progress=True, trust_remote_code=False):
        calls.append(("resume", None, out.name))
        cfg = training.read_run_config(out)
        (out / "config.json").unlink()
        return train_run(cfg, out)

    return calls, train_run, resume_run


@pytest.fixture
def fake(monkeypatch):
    labels = torch.tensor([0, 1, 0, 1])
    confident = torch.tensor([[0.99, 0.01], [0.99, 0.01], [0.99, 0.01], [0.01, 0.99]])
    calibrated = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.6, 0.4], [0.3, 0.7]])
    calls, train_run, resume_run = _fake_run({"mle": (labels, confident), "blob": (labels, calibrated)})
    monkeypatch.setattr(training, "train_run", train_run)
    monkeypatch.setattr(training, "resume_run", resume_run)
    return calls


def test_compare_trains_each_entry_once_then_reuses_and_resumes(tmp_path, fake):
    out = tmp_path / "cmp"
    result = compare(BASE, ["mle", "blob"], out)
    assert fake == [("train", "mle", "mle"), ("train", "blob", "blob")]
    assert set(result.rows) == {"mle", "blob"} and result.rows["mle"]["accuracy"] == 0.75
    record = json.loads((out / COMPARE_FILE).read_text())
    assert record["entries"] == ["mle", "blob"] and set(record["rows"]) == {"mle", "blob"}
    assert (out / "reliability.png").stat().st_size > 0 and "| mle |" in (out / "compare.md").read_text()
    text = result.table()
    assert "conf - acc" in text and "+24.00 pt" in text  # mle: mean confidence 0.99 at accuracy 0.75

    fake.clear()
    compare(BASE, ["mle", "blob"], out)  # the same comparison again: nothing retrained
    assert fake == []
    (out / "blob" / "metrics.json").unlink()  # an interrupted entry resumes, a finished one is kept
    compare(BASE, ["mle", "blob"], out)
    assert fake == [("resume", None, "blob"), ("train", "blob", "blob")]


def test_compare_refuses_before_training_anything(tmp_path, fake):
    with pytest.raises(ConfigError, match="method=mle implies guide=auto_delta"):
        compare(BASE, ["blob", "mle,guide=lowrank"], tmp_path / "a")
    with pytest.raises(ConfigError, match="given twice"):
        compare(BASE, ["mle", "mle"], tmp_path / "a")
    with pytest.raises(ConfigError, match="at least one"):
        compare(BASE, [], tmp_path / "a")
    assert fake == [] and not (tmp_path / "a").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a comparison folder"):
        compare(BASE, ["mle"], other, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine" and fake == []


def test_another_comparison_in_the_folder_needs_overwrite(tmp_path, fake):
    out = tmp_path / "cmp"
    compare(BASE, ["mle"], out)
    with pytest.raises(RunError, match="another comparison"):
        compare(BASE, ["mle", "blob"], out)
    with pytest.raises(RunError, match="another comparison"):
        compare(BASE.replace(max_steps=4), ["mle"], out)
    fake.clear()
    compare(BASE, ["mle", "blob"], out, overwrite=True)
    assert fake == [("train", "mle", "mle"), ("train", "blob", "blob")]


def test_comparison_table_columns():
    rows = {"mle": {"accuracy": 0.5, "ece": 0.25, "nll": 2.0, "brier": 0.7, "confidence": 0.75, "num_samples": 0,
                    "dataset": "arc_easy", "split": "dev", "num_examples": 4, "ece_bins": 15}}
    text = Comparison(None, rows).table().splitlines()
    assert text[0].startswith("arc_easy / dev  (N=4, ECE bins=15)")
    assert text[-1].split() == ["mle", "50.00", "25.00", "2.0000", "0.7000", "75.00", "+25.00", "pt", "0"]


def test_compare_cli_refuses_method_flag(tmp_path, capsys):
    assert main(["compare", "--methods", "mle", "--method", "blob", "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--methods" in err
    assert not (tmp_path / "x").exists()
