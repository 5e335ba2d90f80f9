"""Post-hoc methods on a finished run (``--from-run``): Laplace around a map or mle run's point, TFB on an mle run's,
without training; what a one-go ``--method laplace`` run computes; refusals; the grid's ``"from"`` entries."""

import json

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.runner.cli import main as runner_main
from benchmarks.runner.grid import load_grid
from blob_pyro.cli import main
from blob_pyro.laplace import LAPLACE_FILE
from blob_pyro.predictive import predict
from blob_pyro.tfb import TFB_FILE
from blob_pyro.training import load_run

from .test_cli import data_folder, error_line, small, snapshot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A finished map run and a finished mle run on the synthetic WinoGrande folder (3 steps each, seed 1)."""
    tmp = tmp_path_factory.mktemp("from_run")
    data = data_folder(tmp)
    runs = {}
    for method in ("map", "mle"):
        runs[method] = tmp / method
        assert main(["train", *small(data, "--max-steps", "3", "--lr", "0.05", "--seed", "1"), "--method", method,
                     "--output-dir", str(runs[method])]) == 0
    return tmp, data, runs


def test_laplace_from_a_map_run_is_the_one_go_laplace_run_without_training(sources):
    tmp, data, runs = sources
    post = tmp / "map_laplace"
    assert main(["train", "--method", "laplace", "--from-run", str(runs["map"]), "--num-samples", "2",
                 "--data-dir", str(data), "--output-dir", str(post), "--quiet"]) == 0
    assert (post / "train_log.jsonl").read_text() == ""  # nothing trained
    stored = json.loads((post / "config.json").read_text())["config"]
    assert stored["from_run"] == str(runs["map"]) and stored["method"] == "laplace"
    assert stored["fit"]["max_steps"] == 3 and stored["fit"]["lr"] == 0.05  # what was trained: the source's
    # the same MAP training inside a one-go laplace run gives the same point, precision and prior precision
    one_go = tmp / "laplace"
    assert main(["train", *small(data, "--max-steps", "3", "--lr", "0.05", "--seed", "1"), "--method", "laplace",
                 "--output-dir", str(one_go)]) == 0
    a, b = load_file(str(post / "posterior.safetensors")), load_file(str(one_go / "posterior.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rec_a, rec_b = (json.loads((d / LAPLACE_FILE).read_text()) for d in (post, one_go))
    assert rec_a["prior_precision"] == rec_b["prior_precision"]
    # the MAP point is the source's: its vanilla adapters agree
    src, new = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (runs["map"], post))
    assert src.keys() == new.keys() and all(torch.equal(src[k], new[k]) for k in src)
    run = load_run(post, data_dir=str(data))
    assert run.laplace == rec_a


def test_tfb_from_an_mle_run_bayesianizes_its_point(sources):
    tmp, data, runs = sources
    post = tmp / "mle_tfb"
    assert main(["train", "--method", "tfb", "--from-run", str(runs["mle"]), "--tfb-anchor-size", "4",
                 "--num-samples", "2", "--data-dir", str(data), "--output-dir", str(post), "--quiet"]) == 0
    record = json.loads((post / TFB_FILE).read_text())
    assert record["num_examples"] == len(record["indices"]) == 4 and 0 <= record["sigma"] <= 0.2
    cfg = json.loads((post / "config.json").read_text())["config"]
    assert cfg["bayes"]["bayesian_factor"] == "A"  # tfb's own, though the mle source trained factor B
    # TFB re-parameterises B A without changing it: at the posterior mean it predicts what the source predicts
    # (one run loaded at a time: the two guides' parameters share names in Pyro's param store)
    src = load_run(runs["mle"], data_dir=str(data))
    at_source = predict(src.model, src.guide, src.eval, num_samples=0, progress=False).probs
    run = load_run(post, data_dir=str(data))
    assert torch.allclose(predict(run.model, run.guide, run.eval, num_samples=0, progress=False).probs, at_source,
                          atol=1e-5)


@pytest.mark.parametrize("argv, words", [
    (["--method", "laplace", "--from-run", "{blob}"], "method=laplace starts from a mle or map run"),
    (["--method", "tfb", "--from-run", "{blob}"], "method=tfb starts from a mle or map run"),
    (["--method", "blob", "--from-run", "{map}"], "method=blob trains its own"),
    (["--method", "laplace", "--from-run", "{map}", "--max-steps", "7"], "max_steps=3 there"),
    (["--method", "laplace", "--from-run", "{map}", "--dataset", "arc_easy"], "dataset='winogrande_s' there"),
    (["--method", "laplace", "--from-run", "{unfinished}"], "did not finish"),
    (["--method", "laplace", "--from-run", "{missing}"], "does not exist"),
])
def test_bad_from_run_is_one_line_and_writes_nothing(sources, capsys, argv, words):
    tmp, data, runs = sources
    blob = tmp / "blob_src"
    if not blob.exists():
        (blob / "adapter").mkdir(parents=True)
        cfg = json.loads((runs["mle"] / "config.json").read_text())
        cfg["config"]["method"] = "blob"
        cfg["config"]["bayes"]["guide"] = "blob"
        cfg["config"]["fit"]["kl_schedule"] = "blob"
        cfg["config"]["fit"]["kl_multiplier"] = 1.0
        (blob / "config.json").write_text(json.dumps(cfg))
    unfinished = tmp / "unfinished"
    if not unfinished.exists():
        unfinished.mkdir()
        (unfinished / "config.json").write_text((runs["map"] / "config.json").read_text())
    paths = {"mle": runs["mle"], "map": runs["map"], "blob": blob, "unfinished": unfinished, "missing": tmp / "nope"}
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]
    before = snapshot(tmp)
    line = error_line(capsys, ["train", *argv, "--data-dir", str(data), "--output-dir", str(tmp / "out"), "--quiet"])
    assert words in line, line
    assert snapshot(tmp) == before and not (tmp / "out").exists()


def test_a_grid_entry_from_another_starts_from_its_finished_run(sources, tmp_path):
    _, data, _ = sources
    grid = {"name": "posthoc", "base": {"model": "minilm", "max_steps": 2, "batch_size": 4, "max_length": 32,
                                        "eval_batch_size": 8},
            "methods": ["map", "mle"],
            "variants": [{"name": "laplace", "method": "laplace", "from": "mle", "overrides": {"num_samples": 2}},
                         {"name": "tfb", "method": "tfb", "from": "mle",
                          "overrides": {"num_samples": 2, "tfb_anchor_size": 4}}],
            "datasets": ["winogrande_s"], "seeds": [1]}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    out = tmp_path / "out"
    assert runner_main(["run", str(path), "--out", str(out), "--data-dir", str(data), "--quiet"]) == 0
    runs = out / "runs" / "winogrande_s"
    for name, source in (("laplace", "mle"), ("tfb", "mle")):
        cfg = json.loads((runs / name / "seed1" / "config.json").read_text())["config"]
        assert cfg["from_run"] == str(runs / source / "seed1")
        assert (runs / name / "seed1" / "train_log.jsonl").read_text() == ""
        assert json.loads((runs / name / "seed1" / "metrics.json").read_text())["num_samples"] == 2
    # a second invocation finds every cell finished with the same settings
    assert runner_main(["run", str(path), "--out", str(out), "--data-dir", str(data), "--quiet"]) == 0


@pytest.mark.parametrize("variants, words", [
    ([{"name": "laplace", "method": "laplace", "from": "blob"}], "must be an earlier entry of method mle or map"),
    ([{"name": "laplace", "method": "laplace", "from": "nothing"}], "must be an earlier entry"),
    ([{"name": "b2", "method": "blob", "from": "map"}], "'from' names the entry a post-hoc method"),
])
def test_grid_from_mistakes_are_refused_when_the_grid_loads(tmp_path, variants, words):
    from benchmarks.runner.grid import BenchError

    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"name": "g", "base": {"model": "minilm"}, "methods": ["map", "mle", "blob"],
                                "variants": variants, "datasets": ["winogrande_s"], "seeds": [1]}))
    with pytest.raises(BenchError, match=words):
        load_grid(path)
