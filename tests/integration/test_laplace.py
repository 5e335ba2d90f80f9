"""method=laplace end to end on MiniLM (a synthetic WinoGrande folder, a few steps; ARC-Easy from the data folder when
it is there): blob-pyro train fits the Laplace posterior after the MAP, writes laplace.json and the Laplace guide,
load_run / evaluate reproduce the metrics from it, and the ArviZ export draws from it."""

import json
import os
from pathlib import Path

import pytest
import torch

from blob_pyro.cli import main
from blob_pyro.laplace import LAPLACE_FILE, LaplaceGuide
from blob_pyro.predictive import predict
from blob_pyro.training import evaluate, load_run

from .test_cli import data_folder


def _train_winogrande(data, out, *extra):
    """A 3-step MiniLM laplace run on the small WinoGrande folder (``extra``: its Laplace and prediction flags)."""
    assert main(["train", "--model", "minilm", "--dataset", "winogrande_s", "--data-dir", str(data),
                 "--max-length", "32", "--batch-size", "4", "--max-steps", "3", "--lr", "0.05", "--seed", "1",
                 "--method", "laplace", *extra, "--output-dir", str(out), "--quiet"]) == 0


def test_laplace_run_fits_its_posterior_after_the_map_and_round_trips(tmp_path):
    data = data_folder(tmp_path)
    out = tmp_path / "run"
    _train_winogrande(data, out, "--num-samples", "3")
    record = json.loads((out / LAPLACE_FILE).read_text())
    assert (record["hessian"], record["subset"], record["num_examples"]) == ("diag", "all", 8)
    assert record["prior_precision"] > 0 and record["marglik"] >= record["marglik_at_map_prior"]
    assert record["num_parameters"] > 0 and record["seconds"] > 0 and record["marglik_trace"]
    run = load_run(out, data_dir=str(data))
    assert isinstance(run.guide, LaplaceGuide) and run.laplace == record
    assert float(run.guide.prior_precision) == pytest.approx(record["prior_precision"])
    metrics = json.loads((out / "metrics.json").read_text())
    torch.manual_seed(0)
    again = evaluate(run, progress=False)
    assert again["num_samples"] == metrics["num_samples"] == 3
    for key in ("accuracy", "ece", "nll", "brier"):
        assert 0 <= again[key] < float("inf")
    at_map = predict(run.model, run.guide, run.eval, num_samples=0, progress=False).probs
    torch.manual_seed(0)
    drawn = predict(run.model, run.guide, run.eval, num_samples=3, progress=False).probs
    assert not torch.allclose(at_map, drawn, atol=1e-5)
    from blob_pyro.arviz_io import to_inference_data

    idata = to_inference_data(run, num_samples=2, limit=4)
    assert "Laplace" in idata.attrs.get("inference", "") or "LaplaceGuide" in str(idata.attrs)


ARC = Path(os.environ.get("BLOB_DATA_DIR", "/work/shared/data")) / "arc_easy"


@pytest.mark.skipif(not ARC.is_dir(), reason="no ARC-Easy folder (set BLOB_DATA_DIR)")
def test_laplace_on_arc_easy_last_layer(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "minilm", "--dataset", "arc_easy", "--data-dir", str(ARC.parent),
                 "--train-limit", "16", "--eval-limit", "8", "--max-length", "64", "--batch-size", "4",
                 "--max-steps", "2", "--method", "laplace", "--laplace-subset", "last_layer",
                 "--num-samples", "2", "--output-dir", str(out), "--quiet"]) == 0
    record = json.loads((out / LAPLACE_FILE).read_text())
    assert record["subset"] == "last_layer" and len(record["sites"]) == 2 and record["num_examples"] == 16
    assert load_run(out, data_dir=str(ARC.parent)).guide.laplace_names == record["sites"]


def test_laplace_kfac_on_minilm_gives_a_positive_definite_posterior_that_moves_the_predictions(tmp_path):
    data = data_folder(tmp_path)
    out = tmp_path / "run"
    _train_winogrande(data, out, "--laplace-hessian", "kfac", "--num-samples", "3")
    record = json.loads((out / LAPLACE_FILE).read_text())
    assert (record["hessian"], record["num_examples"]) == ("kfac", 8)
    assert record["prior_precision"] > 0 and record["marglik"] >= record["marglik_at_map_prior"]
    assert record["seconds"] > 0 and ("peak_rss_mb" in record or "peak_gpu_memory_mb" in record)
    positions = record["kfac"]["positions"]
    assert record["kfac"]["approximation"] == "expand" and len(positions) == len(record["sites"]) // 2
    assert all(m > 0 for m in positions.values())
    run = load_run(out, data_dir=str(data))
    guide = run.guide
    assert isinstance(guide, LaplaceGuide) and guide.hessian == "kfac"
    delta = float(guide.prior_precision)
    assert delta == pytest.approx(record["prior_precision"])
    for name in guide.laplace_names:  # P = H ⊗ Q + δI: eigenvalues λ_i μ_j + δ, all >= δ > 0
        h_values, h_vectors, q_values, q_vectors = guide.kfac_parts(name)
        assert (h_values >= 0).all() and (q_values >= 0).all()
        assert torch.allclose(h_vectors.T @ h_vectors, torch.eye(len(h_values), dtype=torch.float64), atol=1e-8)
        assert torch.allclose(q_vectors.T @ q_vectors, torch.eye(len(q_values), dtype=torch.float64), atol=1e-8)
    assert any(float(guide.kfac_parts(n)[0].max()) > 0 for n in guide.laplace_names)  # curvature was measured
    at_map = predict(run.model, guide, run.eval, num_samples=0, progress=False).probs
    torch.manual_seed(0)
    drawn = predict(run.model, guide, run.eval, num_samples=3, progress=False).probs
    assert not torch.allclose(at_map, drawn, atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    torch.manual_seed(0)
    assert evaluate(run, progress=False)["num_samples"] == metrics["num_samples"] == 3


def test_laplace_glm_on_minilm_predicts_in_logit_space_and_a_saved_run_evaluates_the_same(tmp_path, capsys):
    data = data_folder(tmp_path)
    out = tmp_path / "run"
    _train_winogrande(data, out, "--laplace-hessian", "kfac", "--num-samples", "4")
    record = json.loads((out / LAPLACE_FILE).read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert record["predictive"] == metrics["laplace_predictive"] == "glm"  # the default, as Laplace-LoRA
    run = load_run(out, data_dir=str(data))
    assert run.guide.predictive == run.config.laplace_predictive == "glm"
    from blob_pyro.laplace_glm import logit_moments

    batch = run.model.head.collate(list(run.eval.examples)[:3])
    mean, cov = logit_moments(run.model, run.guide, batch)
    assert mean.shape == (3, 2) and (cov.diagonal(dim1=1, dim2=2) > 0).all()
    assert torch.allclose(cov, cov.transpose(1, 2))
    torch.manual_seed(0)
    first = evaluate(run, progress=False)
    torch.manual_seed(0)
    assert evaluate(run, progress=False) == first  # a saved run evaluates reproducibly
    assert first["num_samples"] == 4 and first["mutual_information"] > 0 and first["laplace_predictive"] == "glm"
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--data-dir", str(data), "--laplace-predictive", "sample",
                 "--output", str(tmp_path / "sample.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "sample.json").read_text())["laplace_predictive"] == "sample"
    from blob_pyro.arviz_io import to_inference_data

    idata = to_inference_data(run, num_samples=3, limit=4)
    assert "linearised" in idata.attrs["inference"] and idata.posterior_predictive["logits"].shape == (1, 3, 4, 2)
    # a run from before the setting (laplace.json without "predictive") predicted with weight draws, and still does
    del record["predictive"]
    (out / LAPLACE_FILE).write_text(json.dumps(record))
    assert load_run(out, data_dir=str(data)).guide.predictive == "sample"
