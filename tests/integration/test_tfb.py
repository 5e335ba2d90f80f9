"""method=tfb end to end on MiniLM (a synthetic WinoGrande folder, a few steps): blob-pyro train fits the mle LoRA,
searches sigma on training examples, records it in tfb.json, and load_run gives back the TFB guide (the low-rank
isotropic family at that sigma) that evaluate, the ArviZ export and ppc take like any guide; bad settings exit 2
with one line and write nothing."""

import json

import pytest
import torch

from blob_pyro.cli import main
from blob_pyro.config import RunConfig
from blob_pyro.guides import BlobGuide
from blob_pyro.predictive import predict
from blob_pyro.tfb import TFB_FILE
from blob_pyro.training import build, evaluate, load_run

from .test_cli import data_folder, error_line

TRAIN = ["train", "--model", "minilm", "--dataset", "winogrande_s", "--max-length", "32", "--batch-size", "4", "--max-steps",
         "3", "--lr", "0.05", "--seed", "1", "--method", "tfb", "--num-samples", "3", "--tfb-search-steps", "5",
         "--tfb-threshold", "0.05", "--quiet"]


def test_tfb_run_searches_sigma_on_training_examples_and_round_trips(tmp_path):
    data = data_folder(tmp_path)
    out = tmp_path / "run"
    assert main([*TRAIN, "--data-dir", str(data), "--output-dir", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["method"], cfg["bayes"]["bayesian_factor"], cfg["tfb_threshold"]) == ("tfb", "A", 0.05)
    record = json.loads((out / TFB_FILE).read_text())
    assert record["split"] == "train_s" and record["num_examples"] == 8 == len(record["indices"])  # the whole split
    built = build(RunConfig.from_dict(cfg), with_data=True)
    assert [e.index for e in built.anchor.examples] == record["indices"]
    assert set(record["indices"]) <= {e.index for e in built.train.examples}  # training examples, trained on
    assert 0 < record["sigma"] <= cfg["tfb_sigma_max"]
    assert abs(record["nll"] - record["nll_at_0"]) <= cfg["tfb_threshold"]
    assert record["trace"][-1]["sigma"] in (record["sigma"], record["sigma_failed"])
    # load_run: the TFB guide at sigma over A' (std x singular value = sigma), with B' = U diag(d) from the adapter
    run = load_run(out, data_dir=str(data))
    assert isinstance(run.guide, BlobGuide) and run.tfb == record
    for site in run.model.sites:
        d = torch.tensor(record["singular_values"][site.name])
        b = site.layer.lora_B["default"].weight.detach()
        assert torch.allclose(b.T @ b, torch.diag(d**2), atol=1e-4)
        assert torch.allclose(run.guide.std()[site.name] * (d.unsqueeze(-1) + 1e-6),
                              torch.full(site.shape, record["sigma"]), rtol=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 3
    again = evaluate(run, num_samples=0, progress=False)
    assert 0 <= again["accuracy"] <= 1
    mean = predict(run.model, run.guide, run.eval, num_samples=0, progress=False).probs
    torch.manual_seed(0)
    drawn = predict(run.model, run.guide, run.eval, num_samples=3, progress=False).probs
    assert not torch.allclose(mean, drawn, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--tfb-threshold", "0"], "tfb_threshold > 0"),
    (["--tfb-anchor-size", "0"], "non-empty anchor set"),
    (["--tfb-anchor-size", "9"], "larger than the training split"),
    (["--guide", "blob"], "method=tfb implies guide=auto_delta; got guide=blob"),  # a Bayesian run is not TFB's input
])
def test_bad_tfb_settings_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    data = data_folder(tmp_path)
    out = tmp_path / "run"
    line = error_line(capsys, [*TRAIN, "--data-dir", str(data), "--output-dir", str(out), *extra])
    assert message in line
    assert not out.exists()
