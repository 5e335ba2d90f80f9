"""method=ensemble end to end on MiniLM (16 ARC-Easy examples, three steps per member): blob-pyro train writes K
member run folders with distinct seeds and the ensemble's averaged predictions; evaluate and ppc accept the run."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from blob_pyro.cli import main
from blob_pyro.optim import own_params
from blob_pyro.predictive import predict
from blob_pyro.training import evaluate, load_run


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("ens") / "run"
    assert main(["train", "--model", "minilm", "--dataset", "arc_easy", "--data-dir", str(data_dir),
                 "--train-limit", "16", "--eval-limit", "6", "--max-length", "64", "--batch-size", "4",
                 "--max-steps", "3", "--lr", "0.05", "--seed", "2",
                 "--method", "ensemble", "--ensemble-size", "2", "--output-dir", str(out), "--quiet"]) == 0
    return out


def test_the_run_folder_holds_k_distinct_members_and_their_average(ensemble_run):
    out = ensemble_run
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["method"], cfg["ensemble_size"]) == ("ensemble", 2)
    seeds = [json.loads((out / f"member{j}" / "config.json").read_text())["config"]["fit"]["seed"] for j in range(2)]
    assert seeds == [2, 1002]
    assert all((out / f"member{j}" / "metrics.json").is_file() for j in range(2))
    members = []
    for j in range(2):  # each member in its own Pyro param store (their parameter names are the same)
        with own_params():
            members.append(load_run(out / f"member{j}"))
    assert all(m.config.method == "mle" for m in members)
    ens = load_run(out)
    assert ens.model is None and len(ens.members) == 2
    data = load_run(out / "member0", data_dir=cfg["data_dir"]).eval
    own = []
    for m in members:
        with own_params():
            own.append(predict(m.model, m.guide, data, num_samples=0, progress=False).probs)
    assert not torch.allclose(own[0], own[1])  # distinct members
    saved = load_file(str(out / "predictions.safetensors"))
    assert torch.allclose(saved["probs"], (own[0] + own[1]) / 2, atol=1e-6)  # probabilities averaged
    assert saved["member_logits"].shape == (2, 6, 5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["members"] == ["member0", "member1"] and metrics["num_examples"] == 6
    again = evaluate(load_run(out, data_dir=cfg["data_dir"]), progress=False)  # load -> evaluate: the same numbers
    for key in ("accuracy", "ece", "nll", "brier"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6)


def test_evaluate_and_ppc_accept_an_ensemble(ensemble_run, tmp_path, capsys):
    assert main(["evaluate", "--run", str(ensemble_run), "--output", str(tmp_path / "m.json"), "--quiet"]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["accuracy"] == pytest.approx(json.loads((ensemble_run / "metrics.json").read_text())["accuracy"])
    assert main(["ppc", "--run", str(ensemble_run), "--num-samples", "4", "--out", str(tmp_path / "ppc"),
                 "--quiet"]) == 0
    report = json.loads((tmp_path / "ppc" / "ppc.json").read_text())
    assert report["num_samples"] == 4 and report["num_examples"] == 6 and "accuracy" in report["statistics"]
    assert "ppc written to" in capsys.readouterr().out


def test_resume_keeps_finished_members_and_trains_the_missing_one(ensemble_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(ensemble_run, run)
    kept = (run / "member0" / "posterior.safetensors").read_bytes()
    before = json.loads((run / "metrics.json").read_text())
    shutil.rmtree(run / "member1")  # as if killed before member 1 started
    (run / "metrics.json").unlink()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert (run / "member0" / "posterior.safetensors").read_bytes() == kept  # not retrained
    assert json.loads((run / "member1" / "config.json").read_text())["config"]["fit"]["seed"] == 1002
    after = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy", "ece", "nll", "brier"):  # member 1 retrained from its seed: the same ensemble
        assert after[key] == pytest.approx(before[key], abs=1e-6)
