"""Posterior predictive checks: p-values on right and wrong toy models, scripts/ppc.py end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from blob_pyro.metrics import accuracy, expected_calibration_error
from blob_pyro.ppc import check_idata, check_predictive, format_table, run_ppc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ppc.py"


pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(n=400, k=3, s=200, seed=0):
    """True class probabilities p_i and labels y_i ~ p_i."""
    g = torch.Generator().manual_seed(seed)
    true_logits = 2.0 * torch.randn(n, k, generator=g)
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g).squeeze(1)
    return true_logits, labels, g


def _replicate(logits, g):
    s, n, k = logits.shape
    probs = torch.softmax(logits, -1).reshape(-1, k)
    return torch.multinomial(probs, 1, generator=g).reshape(s, n)


def _draws(base, s, g, jitter=0.1):
    return base[None] + jitter * torch.randn(s, *base.shape, generator=g)


def test_right_model_gives_no_extreme_p_values():
    true_logits, labels, g = _toy()
    logits = _draws(true_logits, 200, g)
    res = check_predictive(logits, labels, _replicate(logits, g))
    assert not any(st["extreme"] for st in res.statistics.values()), format_table(res)
    # over many data sets drawn from the model, p-values spread over (0, 1) instead of piling up at 0 or 1
    p_acc, p_ece = [], []
    for seed in range(1, 21):
        true_logits, labels, g = _toy(n=200, seed=seed)
        logits = _draws(true_logits, 100, g)
        st = check_predictive(logits, labels, _replicate(logits, g)).statistics
        p_acc.append(st["accuracy"]["p_value"])
        p_ece.append(st["ece"]["p_value"])
    for ps in (np.array(p_acc), np.array(p_ece)):
        assert 0.3 < ps.mean() < 0.7 and np.mean((ps < 0.025) | (ps > 0.975)) <= 0.2, ps


def test_wrong_models_give_extreme_p_values():
    true_logits, labels, g = _toy()
    over = _draws(4.0 * true_logits, 200, g)  # far too confident
    res = check_predictive(over, labels, _replicate(over, g))
    st = res.statistics
    assert st["confidence_gap"]["p_value"] < 0.025 and st["confidence_gap"]["observed"] > 0.05
    assert st["ece"]["p_value"] < 0.025 and st["ece"]["extreme"]
    assert st["accuracy"]["p_value"] > 0.975  # replicated accuracy (= confidence) exceeds the observed one
    shifted = _draws(true_logits + torch.tensor([2.5, 0.0, 0.0]), 200, g)  # class 0 far too frequent
    st = check_predictive(shifted, labels, _replicate(shifted, g)).statistics
    assert st["class_frequency[0]"]["p_value"] > 0.975 and st["class_frequency[0]"]["extreme"]
    assert st["class_frequency[0]"]["replicated"]["q05"] > st["class_frequency[0]"]["observed"]


def test_observed_statistics_agree_with_metrics_and_band():
    true_logits, labels, g = _toy(n=120, s=50)
    logits = _draws(true_logits, 50, g, jitter=0.5)
    res = check_predictive(logits, labels, _replicate(logits, g))
    probs = torch.softmax(logits.double(), -1).mean(0)
    assert res.statistics["accuracy"]["observed"] == pytest.approx(accuracy(probs, labels))
    assert res.statistics["ece"]["observed"] == pytest.approx(expected_calibration_error(probs, labels), abs=1e-6)
    conf = probs.max(-1).values
    assert res.statistics["confidence_gap"]["replicated"]["mean"] == pytest.approx(
        float(conf.mean()) - float(np.mean(res.replicated["accuracy"])))
    for c in range(3):
        is_c = labels == c
        err = float((probs.argmax(-1)[is_c] != c).double().mean())
        assert res.statistics[f"per_class_error[{c}]"]["observed"] == pytest.approx(err)
    lo, hi = res.band["lower"], res.band["upper"]
    assert lo.shape == (15,) and hi.shape == (15,)
    ok = np.isfinite(lo)
    assert ok.any() and np.all(lo[ok] <= hi[ok]) and np.all((lo[ok] >= 0) & (hi[ok] <= 1))
    assert all(len(v) == 50 for v in res.replicated.values())
    assert "accuracy" in format_table(res)


def test_p_value_is_mid_p_for_ties():
    logits = torch.zeros(10, 4, 2)
    logits[..., 0] = 5.0
    labels = torch.zeros(4, dtype=torch.long)
    y_rep = torch.zeros(10, 4, dtype=torch.long)  # every replicate equals the data
    st = check_predictive(logits, labels, y_rep).statistics
    assert st["accuracy"]["p_value"] == 0.5 and st["class_frequency[0]"]["p_value"] == 0.5
    assert np.isnan(st["per_class_error[1]"]["p_value"])  # no example of class 1: undefined, not extreme
    assert not st["per_class_error[1]"]["extreme"]


# ----------------------------------------------------------------------------- on a tiny trained run
@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir, data_dir, tmp_path_factory):
    from blob_pyro.config import TrainConfig
    from blob_pyro.runs import train_run

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = TrainConfig(model=str(tiny_llama_dir), dataset="winogrande_s", data_dir=str(data_dir), max_steps=2,
                      batch_size=4, train_limit=8, eval_limit=12, max_length=64, num_samples=2, device="cpu")
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
    assert set(report["metrics"]) >= {"accuracy", "ece", "nll"}
    assert "p-value" in proc.stdout and "accuracy" in proc.stdout
    from blob_pyro import arviz_io

    idata = arviz_io.load(out / "idata.nc")
    assert idata.posterior_predictive["y"].shape == (1, 5, 12)
    assert "training" in arviz_io.groups(idata) and idata.training["step"].size == 2
    again = check_idata(idata)  # the saved file alone reproduces the report
    assert json.loads(json.dumps(again.to_dict()))["statistics"]["ece"] == report["statistics"]["ece"]
    assert again.meta["seed"] == 0 and again.meta["dataset"] == "winogrande_s"


def test_script_wrong_run_folder_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--run", str(tmp_path / "missing"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ppc.py: error:") and "does not exist" in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


def test_run_ppc_user_errors_and_cli(tiny_run, data_dir, tmp_path, capsys):
    from blob_pyro.cli import main

    assert run_ppc(tiny_run, dataset="no_such_set", num_samples=2, out_dir=tmp_path / "a", progress=False) == 2
    assert run_ppc(tiny_run, dataset="arc_easy", data_dir=str(data_dir), num_samples=2, out_dir=tmp_path / "b",
                   progress=False) == 2  # 5 classes, the run scores 2
    assert run_ppc(tmp_path, num_samples=2, out_dir=tmp_path / "c", progress=False) == 2  # not a run folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("blob-pyro ppc: error:") for line in err), err
    assert "unknown dataset" in err[0] and "classes" in err[1] and "config.json" in err[2]
    rc = main(["ppc", "--run", str(tiny_run), "--data-dir", str(data_dir), "--num-samples", "2",
               "--out", str(tmp_path / "d"), "--quiet"])
    assert rc == 0 and (tmp_path / "d" / "ppc.json").is_file()


def test_plots_of_the_checks():
    import matplotlib.pyplot as plt

    from blob_pyro.plots import plot_ppc_statistics, reliability_diagram

    true_logits, labels, g = _toy(n=100, s=20)
    logits = _draws(true_logits, 20, g)
    res = check_predictive(logits, labels, _replicate(logits, g))
    fig = plot_ppc_statistics(res)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == len(res.statistics) and visible[0].get_title().startswith("accuracy\np = ")
    plt.close(fig)
    # the band covers every non-empty bin over its whole width, an isolated bin and a run's last bin included
    lower, upper = np.full(15, np.nan), np.full(15, np.nan)
    lower[[7, 8, 12]], upper[[7, 8, 12]] = 0.3, 0.9
    ax = reliability_diagram(res.probs, res.labels, band={"lower": lower, "upper": upper})
    band = [c for c in ax.collections if c.get_label() == "predictive band"][0]
    xs = np.concatenate([p.vertices[:, 0] for p in band.get_paths()])
    edges = np.linspace(0, 1, 16)
    for lo_edge, hi_edge in ((edges[7], edges[9]), (edges[12], edges[13])):
        assert np.isclose(xs, lo_edge).any() and np.isclose(xs, hi_edge).any()
    assert not np.isclose(xs, edges[10]).any()  # no band over empty bins
    plt.close("all")
