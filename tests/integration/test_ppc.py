"""Posterior predictive checks of a run trained on the tiny Llama: scripts/ppc.py end to end, run_ppc's errors, and
``blob-pyro ppc``. (The statistics themselves: tests/unit/test_ppc.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blob_pyro.errors import BlobPyroError, DataError, RunError
from blob_pyro.ppc import check_idata, run_ppc

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ppc.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir, data_dir, tmp_path_factory):
    from blob_pyro.config import RunConfig
    from blob_pyro.training import train_run

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = RunConfig.from_dict({"model": str(tiny_llama_dir), "dataset": "winogrande_s", "data_dir": str(data_dir),
                               "max_steps": 2, "batch_size": 4, "train_limit": 8, "eval_limit": 12, "max_length": 64,
                               "num_samples": 2, "device": "cpu"})
    train_run(cfg, out, progress=False)
    return out


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}


def test_script_end_to_end(tiny_run, data_dir, tmp_path):
    out = tmp_path / "ppc"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--run", str(tiny_run), "--dataset", "winogrande_s",
                           "--data-dir", str(data_dir), "--num-samples", "5", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=240, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for name in ("ppc.json", "idata.nc", "reliability.png", "confidence_histogram.png", "ppc_labels.png",
                 "ppc_statistics.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "ppc.json").read_text())
    assert report["num_samples"] == 5 and report["num_examples"] == 12 and report["dataset"] == "winogrande_s"
    for name in ("accuracy", "confidence_gap", "ece", "class_frequency[0]", "per_class_error[1]"):
        st = report["statistics"][name]
        assert {"observed", "replicated", "p_value", "extreme"} <= set(st)
        assert {"q05", "q50", "q95", "mean"} <= set(st["replicated"])
    assert set(report["metrics"]) >= {"accuracy", "ece", "nll", "entropy", "mutual_information", "aurc", "accuracy_at_80"}
    assert report["metrics"]["ece_bins"] == 15 and (out / "risk_coverage.png").read_bytes()[:4] == b"\x89PNG"
    assert "p-value" in proc.stdout and "accuracy" in proc.stdout and "ECE bins=15;" in proc.stdout
    from blob_pyro import arviz_io

    idata = arviz_io.load(out / "idata.nc")
    assert idata.posterior_predictive["y"].shape == (1, 5, 12)
    assert "training" in arviz_io.groups(idata) and idata.training["step"].size == 2
    again = check_idata(idata)  # the saved file alone reproduces the report
    assert json.loads(json.dumps(again.to_dict()))["statistics"]["ece"] == report["statistics"]["ece"]
    assert again.meta["seed"] == 0 and again.meta["dataset"] == "winogrande_s"


def test_ece_bins_flag_sets_the_bins_of_the_table_the_metrics_and_the_diagram(tiny_run, tmp_path, capsys):
    from blob_pyro.cli import main
    from blob_pyro.metrics import expected_calibration_error

    out = tmp_path / "ppc"
    assert main(["ppc", "--run", str(tiny_run), "--num-samples", "3", "--ece-bins", "5", "--out", str(out),
                 "--quiet"]) == 0
    assert "ECE bins=5;" in capsys.readouterr().out
    report = json.loads((out / "ppc.json").read_text())
    assert report["metrics"]["ece_bins"] == 5
    from blob_pyro import arviz_io

    result = check_idata(arviz_io.load(out / "idata.nc"), n_bins=5)
    assert len(result.band["lower"]) == 5
    assert report["metrics"]["ece"] == pytest.approx(expected_calibration_error(result.probs, result.labels, n_bins=5))
    assert report["statistics"]["ece"]["observed"] == pytest.approx(report["metrics"]["ece"], abs=1e-6)


def test_script_wrong_run_folder_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--run", str(tmp_path / "missing"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ppc.py: error:") and "does not exist" in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


def test_run_ppc_user_errors_and_cli(tiny_run, data_dir, tmp_path, capsys):
    from blob_pyro.cli import main

    with pytest.raises(DataError, match="no_such_set"):
        run_ppc(tiny_run, dataset="no_such_set", num_samples=2, out_dir=tmp_path / "a", progress=False)
    with pytest.raises(RunError, match="classes"):  # 5 classes, the run scores 2
        run_ppc(tiny_run, dataset="arc_easy", data_dir=str(data_dir), num_samples=2, out_dir=tmp_path / "b",
                progress=False)
    with pytest.raises(RunError, match="config.json"):  # not a run folder
        run_ppc(tmp_path, num_samples=2, out_dir=tmp_path / "c", progress=False)
    for name in "abc":
        assert not (tmp_path / name).exists()
    for argv, needle in ((["--run", str(tiny_run), "--dataset", "no_such_set"], "unknown dataset"),
                         (["--run", str(tmp_path)], "config.json")):
        assert main(["ppc", *argv, "--num-samples", "2", "--out", str(tmp_path / "e"), "--quiet"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("blob-pyro: error:") and needle in err[0], err
    rc = main(["ppc", "--run", str(tiny_run), "--data-dir", str(data_dir), "--num-samples", "2",
               "--out", str(tmp_path / "d"), "--quiet"])
    assert rc == 0 and (tmp_path / "d" / "ppc.json").is_file()
    assert main(["ppc", "--run", str(tiny_run), "--num-samples", "2", "--ece-bins", "0", "--out",
                 str(tmp_path / "f"), "--quiet"]) == 2
    assert "--ece-bins must be >= 1" in capsys.readouterr().err and not (tmp_path / "f").exists()
    assert issubclass(DataError, BlobPyroError) and issubclass(RunError, BlobPyroError)
