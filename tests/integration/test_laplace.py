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


def test_laplace_run_fits_its_posterior_after_the_map_and_round_trips(tmp_path):
    data = data_folder(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--model", "minilm", "--dataset", "winogrande_s", "--data-dir", str(data),
                 "--max-length", "32", "--batch-size", "4", "--max-steps", "3", "--lr", "0.05", "--seed", "1",
                 "--method", "laplace", "--num-samples", "3", "--output-dir", str(out), "--quiet"]) == 0
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
