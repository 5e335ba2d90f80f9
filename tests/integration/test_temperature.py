"""method=temperature end to end on MiniLM (a synthetic WinoGrande folder, a few steps): blob-pyro train holds out a
slice of the training split that it never trains on, fits T there, records both in the run folder, and load_run /
evaluate use that T."""

import json

import pytest
import torch

from blob_pyro.cli import main
from blob_pyro.config import RunConfig
from blob_pyro.predictive import predict
from blob_pyro.temperature import TEMPERATURE_FILE
from blob_pyro.training import build, evaluate, load_run

from .test_cli import data_folder


def test_temperature_run_fits_t_on_held_out_training_examples_and_round_trips(tmp_path):
    data = data_folder(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--model", "minilm", "--dataset", "winogrande_s", "--data-dir", str(data),
                 "--max-length", "32", "--batch-size", "4", "--max-steps", "3", "--lr", "0.05", "--seed", "1",
                 "--method", "temperature", "--calibration-fraction", "0.25", "--output-dir", str(out),
                 "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["method"], cfg["calibration_fraction"]) == ("temperature", 0.25)
    record = json.loads((out / TEMPERATURE_FILE).read_text())
    assert record["split"] == "train_s" and record["num_examples"] == 2 == len(record["indices"])
    assert record["temperature"] > 0 and record["nll"] <= record["nll_at_1"] + 1e-12
    # the slice is the seed's and is not in what fit trains on
    built = build(RunConfig.from_dict(cfg), with_data=True)
    assert [e.index for e in built.held_out.examples] == record["indices"]
    assert {e.index for e in built.train.examples}.isdisjoint(record["indices"]) and len(built.train) == 6
    assert built.model.num_data == 6
    # load_run restores T; evaluate reproduces the metrics train wrote
    run = load_run(out, data_dir=str(data))
    assert run.model.temperature == record["temperature"] and run.calibration == record
    metrics = json.loads((out / "metrics.json").read_text())
    again = evaluate(run, progress=False)
    for key in ("accuracy", "ece", "nll", "brier"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6)
    at_t = predict(run.model, run.guide, run.eval, num_samples=0, keep_draws=True, progress=False)
    run.model.temperature = 1.0
    at_1 = predict(run.model, run.guide, run.eval, num_samples=0, keep_draws=True, progress=False)
    assert torch.allclose(at_t.logits, at_1.logits / record["temperature"], atol=1e-5)
