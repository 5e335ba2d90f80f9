"""benchmarks/overfit.py: the curve's checks do not change the training (RNG restored, eval mode undone), the
held-out part is the end of the training split, and --table reads the final records."""

import json

import pyro
import torch

from benchmarks import overfit
from benchmarks.runner.cli import parse_set
from blob_pyro import RunConfig, build, fit

from .test_cli import data_folder


def test_curve_checks_leave_the_training_unchanged(tmp_path, capsys):
    data = data_folder(tmp_path)  # 8 training examples, 4 dev
    out = tmp_path / "curve.jsonl"
    settings = ["model=minilm", "max_length=32", "batch_size=2", "num_samples=2", "flipout=true"]
    assert overfit.main(["--dataset", "winogrande_s", "--data-dir", str(data), "--train-limit", "5", "--holdout", "3",
                         "--max-steps", "4", "--every", "2", "--final-samples", "3", "--set", *settings,
                         "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 2, 4]
    assert recs[-1]["epochs"] == 4 * 2 / 5 and "holdout_n3_ece" in recs[-1] and "posterior_std" in recs[-1]
    assert 0 < recs[-1]["posterior_std"] < 1
    curve_state = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    # the same run without the checks ends at the same parameters
    cfg = RunConfig.from_dict({"dataset": "winogrande_s", "data_dir": str(data), "train_limit": 5, "holdout": 3,
                               "max_steps": 4, "seed": 1, **parse_set(settings)})
    run = build(cfg)
    assert len(run.train) == 5 and [e.index for e in run.eval.examples] == [5, 6, 7]
    fit(run.model, run.guide, run.train, run.config.fit, progress=False)
    plain = dict(pyro.get_param_store().items())
    assert set(plain) == set(curve_state)
    for k, v in plain.items():
        assert torch.equal(v.detach(), curve_state[k]), k

    capsys.readouterr()
    assert overfit.main(["--table", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-1].startswith("| curve | 4 | 1.6 |") and len(table) == 3
