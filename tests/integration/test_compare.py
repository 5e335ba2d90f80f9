"""blob-pyro compare end to end on MiniLM: every entry is the run `blob-pyro train` would make, the table, the
figure and the holdout evaluation; a second call reuses the finished entries. (Orchestration and refusals
without a network: tests/unit/test_compare.py.)"""

import json

from safetensors.torch import load_file

from blob_pyro.cli import main
from blob_pyro.training import PREDICTIONS

from .test_cli import data_folder, small


def test_compare_on_minilm_matches_train_and_reuses(tmp_path, capsys):
    data = data_folder(tmp_path)
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "mle", "blob,prior_scale=0.1", "--output-dir", str(out), *small(data)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "winogrande_s / dev  (N=4" in text and "conf - acc" in text
    assert [line.split()[0] for line in text.splitlines() if line.startswith(("mle ", "blob,"))] == [
        "mle", "blob,prior_scale=0.1"]
    for folder in ("mle", "blob_prior_scale_0.1"):
        saved = load_file(str(out / folder / PREDICTIONS))
        assert saved["probs"].shape == (4, 2) and saved["labels"].tolist() == [1, 0, 1, 0]
        assert json.loads((out / folder / "config.json").read_text())["config"]["dataset"] == "winogrande_s"
    assert load_file(str(out / "blob_prior_scale_0.1" / PREDICTIONS))["logits"].shape == (2, 4, 2)
    assert (out / "reliability.png").stat().st_size > 0

    # the mle entry is exactly `blob-pyro train --method mle` with the same settings
    assert main(["train", "--method", "mle", "--output-dir", str(tmp_path / "single"), *small(data)]) == 0
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert json.loads((out / "mle" / "metrics.json").read_text()) == single

    before = (out / "mle" / "metrics.json").stat().st_mtime_ns
    assert main(argv) == 0  # finished entries are reused, not retrained
    assert (out / "mle" / "metrics.json").stat().st_mtime_ns == before


def test_holdout_run_evaluates_on_training_examples(tmp_path, capsys):
    data = data_folder(tmp_path)
    out = tmp_path / "ho"
    assert main(["train", "--method", "mle", "--holdout", "3", "--output-dir", str(out), *small(data)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "train_s[-3:]" and metrics["num_examples"] == 3
    assert main(["evaluate", "--run", str(out), "--quiet"]) == 0  # evaluate finds the same held-out slice
    assert "train_s[-3:]  (N=3" in capsys.readouterr().out
