"""The benchmark grid runner (benchmarks/runner) end to end on tiny settings: files it writes, resuming, refusals,
OOD, failures, ensembles, and that a cell trains what train_run trains."""

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.runner import cells as runner_cells
from benchmarks.runner.cells import ensemble_average, run_cell
from benchmarks.runner.cli import main
from benchmarks.runner.files import PREDICTIONS, check_finished, differences, predictions_path
from benchmarks.runner.grid import Entry, Grid, cells_of, load_grid
from benchmarks.runner.report import CSV_COLUMNS, markdown_table, summary_table, targets_markdown
from benchmarks.runner.run import run_grid

REPO = Path(__file__).resolve().parents[2]

TINY = {"model": "minilm", "max_steps": 2, "batch_size": 4, "train_limit": 8, "eval_limit": 6, "max_length": 32,
        "num_samples": 2, "eval_batch_size": 8}


def _grid_file(tmp_path: Path, **kw) -> Path:
    grid = {"name": "smoke", "base": dict(TINY), "methods": ["mle", "blob"], "datasets": ["winogrande_s"], "seeds": [1]}
    grid.update(kw)
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    return path


def _run(config, out, data_dir, *extra):
    return main(["run", str(config), "--out", str(out), "--data-dir", str(data_dir), "--quiet", *extra])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("bench")
    config = _grid_file(tmp)
    assert _run(config, tmp / "out", data_dir) == 0
    return config, tmp / "out", data_dir


@pytest.mark.data
def test_runner_writes_results_table_and_plots(smoke):
    _, out, _ = smoke
    report = out / "smoke"
    with open(report / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["mle", "blob", "blob_mean"]
    assert set(CSV_COLUMNS) <= set(rows[0])
    for r in rows:
        assert (r["dataset"], r["eval_dataset"], r["seed"], r["num_examples"]) == ("winogrande_s", "winogrande_s", "1", "6")
        for key in ("accuracy", "ece", "nll", "brier", "train_seconds", "eval_seconds"):
            assert float(r[key]) >= 0, key
        # CPU seconds: recorded per row, positive (a fit and a prediction did run) and finite
        assert 0 < float(r["train_cpu_seconds"]) < 1e5 and 0 < float(r["eval_cpu_seconds"]) < 1e5
    assert [r["num_samples"] for r in rows] == ["0", "2", "0"]
    assert [r["chance"] for r in rows] == ["0.5"] * 3  # two options per WinoGrande question
    assert rows[1]["run_dir"] == rows[2]["run_dir"]  # blob and blob_mean: one trained run, two predictions
    md = (report / "results.md").read_text()
    for title in ("Summary: ACC % / ECE % / NLL", "ACC (%)", "ECE (%)", "NLL", "Brier", "Time"):
        assert f"## {title}" in md
    assert "### train, CPU" in md and "CPU-hours" in md
    assert "| method | winogrande_s |" in md and "| blob_mean |" in md
    acc = 100 * float(rows[0]["accuracy"])
    assert f"| mle | {acc:.2f} (1 seed) |" in md  # one seed: no std to show
    for name in ("reliability_winogrande_s__mle.png", "reliability_winogrande_s__blob.png",
                 "reliability_winogrande_s__blob_mean.png", "metrics_winogrande_s.png", "reliability_winogrande_s.png"):
        png = report / "plots" / name
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", name
    run = out / "runs" / "winogrande_s" / "blob" / "seed1"
    for name in ("config.json", "metrics.json", "train_log.jsonl", "posterior.safetensors", PREDICTIONS,
                 "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    assert json.loads((report / "grid.json").read_text())["seeds"] == [1]
    # mean confidence: the mean top-label probability of each row's saved predictions, also in the markdown
    saved = load_file(str(run / PREDICTIONS))
    for r in rows[1:]:
        expected = saved[f"{r['method']}.probs"].max(-1).values.mean().item()
        assert abs(float(r["confidence"]) - expected) < 1e-6
    assert "## Mean confidence (%)" in md and f"| blob | {100 * float(rows[1]['confidence']):.2f} (1 seed) |" in md


@pytest.mark.data
def test_runner_reports_the_uncertainty_metrics_and_risk_coverage_plots(smoke):
    _, out, _ = smoke
    report = out / "smoke"
    with open(report / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    for r in rows.values():
        assert r["ece_bins"] == "15"
        assert 0 <= float(r["expected_entropy"]) <= float(r["entropy"]) <= 0.6932 and 0 <= float(r["aurc"]) <= 1
        assert 0 <= float(r["accuracy_at_80"]) <= 1
        assert r["auroc_max_prob"] == r["auroc_entropy"] == r["auroc_mutual_information"] == ""  # no shifted split
    assert float(rows["mle"]["mutual_information"]) == 0 and float(rows["blob_mean"]["mutual_information"]) == 0
    assert float(rows["blob"]["mutual_information"]) >= 0
    # the same numbers as uncertainty_metrics of the saved draws
    from blob_pyro.uncertainty import uncertainty_metrics

    saved = load_file(str(out / "runs" / "winogrande_s" / "blob" / "seed1" / PREDICTIONS))
    want = uncertainty_metrics(torch.softmax(saved["blob.logits"], -1), saved["labels"])
    assert {k: float(rows["blob"][k]) for k in want if k != "confidence"} == pytest.approx(
        {k: v for k, v in want.items() if k != "confidence"}, abs=1e-9)
    # the report's confidence column is read from the saved float32 probabilities
    assert float(rows["blob"]["confidence"]) == pytest.approx(want["confidence"], abs=1e-6)
    md = (report / "results.md").read_text()
    assert "ECE bins: 15" in md and "## OOD detection" not in md
    for title in ("Predictive entropy (nats)", "Mutual information", "AURC (%)", "Accuracy at 80 % coverage (%)"):
        assert f"## {title}" in md, title
    mi = float(rows["mle"]["mutual_information"])
    assert f"| mle | {mi:.4f} (1 seed) |" in md
    for name in ("risk_coverage_winogrande_s__mle.png", "risk_coverage_winogrande_s__blob.png",
                 "risk_coverage_winogrande_s.png"):
        assert (report / "plots" / name).read_bytes()[:4] == b"\x89PNG", name
    metrics = json.loads((out / "runs" / "winogrande_s" / "blob" / "seed1" / "metrics.json").read_text())
    assert metrics["ece_bins"] == 15 and metrics["mutual_information"] == metrics["bench"]["rows"]["blob"][
        "mutual_information"]


@pytest.mark.data
def test_second_invocation_skips_finished_cells_and_redoes_a_half_done_one(smoke, monkeypatch, capsys):
    config, out, data_dir = smoke
    blob = out / "runs" / "winogrande_s" / "blob" / "seed1"
    (blob / "metrics.json").unlink()  # as if killed after training, before the end of the cell
    before = (out / "runs" / "winogrande_s" / "mle" / "seed1" / "metrics.json").stat().st_mtime_ns
    trained = []
    real = runner_cells.train_member
    monkeypatch.setattr(runner_cells, "train_member",
                        lambda cfg, d, rows, **kw: trained.append(cfg.method) or real(cfg, d, rows, **kw))
    assert _run(config, out, data_dir) == 0
    assert trained == ["blob"]
    err = capsys.readouterr().err
    assert "[1/2] mle | winogrande_s | seed 1: finished earlier, skipped" in err
    assert "[2/2] blob | winogrande_s | seed 1: training" in err
    assert (out / "runs" / "winogrande_s" / "mle" / "seed1" / "metrics.json").stat().st_mtime_ns == before
    trained.clear()
    assert _run(config, out, data_dir) == 0 and trained == []  # everything done: nothing trains
    assert "[2/2] blob | winogrande_s | seed 1: finished earlier, skipped" in capsys.readouterr().err


@pytest.mark.data
def test_a_cell_another_live_runner_holds_is_skipped_and_a_stale_lock_is_taken_over(smoke, monkeypatch, capsys):
    import os
    import socket
    import subprocess

    config, out, data_dir = smoke
    blob = out / "runs" / "winogrande_s" / "blob" / "seed1"
    lock = blob.parent / ".seed1.lock"
    (blob / "metrics.json").unlink()  # half done: a runner without the lock would delete the folder and retrain
    marker = blob / "being_written_by_the_other_runner"
    marker.write_text("")
    trained = []
    real = runner_cells.train_member
    monkeypatch.setattr(runner_cells, "train_member",
                        lambda cfg, d, rows, **kw: trained.append(cfg.method) or real(cfg, d, rows, **kw))
    host = socket.gethostname()
    lock.write_text(json.dumps({"pid": os.getpid(), "host": host}))  # a live process holds it
    assert _run(config, out, data_dir) == 0
    assert trained == [] and marker.is_file() and lock.is_file()
    assert f"[2/2] blob | winogrande_s | seed 1: being run by another runner (pid {os.getpid()} on {host}" \
        in capsys.readouterr().err
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock.write_text(json.dumps({"pid": gone.pid, "host": host}))  # its process has ended: stale
    assert _run(config, out, data_dir) == 0
    assert trained == ["blob"] and not marker.exists() and not lock.exists()
    assert (blob / "metrics.json").is_file()


@pytest.mark.data
def test_a_run_folder_with_a_flat_config_json_is_still_finished(smoke, capsys):
    """Folders the runner wrote before the nested RunConfig hold flat config.json files: still recognised."""
    config, out, data_dir = smoke
    path = out / "runs" / "winogrande_s" / "mle" / "seed1" / "config.json"
    nested = path.read_text()
    stored = json.loads(nested)
    flat = {}
    for key, value in stored["config"].items():
        flat.update(value if isinstance(value, dict) else {key: value})
    for key in ("objective", "num_particles"):  # settings the old TrainConfig did not have
        flat.pop(key)
    path.write_text(json.dumps({"config": flat, "versions": stored["versions"]}))
    try:
        assert _run(config, out, data_dir) == 0
        assert "[1/2] mle | winogrande_s | seed 1: finished earlier, skipped" in capsys.readouterr().err
        path.write_text(json.dumps({"config": {**flat, "lr": 0.5}}))
        assert _run(config, out, data_dir) == 2
        assert "lr: 0.5 -> " in capsys.readouterr().err
    finally:
        path.write_text(nested)


@pytest.mark.data
def test_a_finished_cell_differing_only_in_what_it_never_read_is_reused(smoke, capsys):
    """A changed default of a setting a method never reads (eps for mle's point estimate) reruns nothing; the same
    change for blob, which reads it, is still refused."""
    config, out, data_dir = smoke
    runs = out / "runs" / "winogrande_s"
    saved = {m: (runs / m / "seed1" / "config.json").read_text() for m in ("mle", "blob")}

    def store(method, **settings):
        stored = json.loads(saved[method])
        stored["config"]["bayes"].update(settings)
        (runs / method / "seed1" / "config.json").write_text(json.dumps(stored))

    try:
        store("mle", eps=0.05, std_param="softplus", guide_rank=5)
        assert _run(config, out, data_dir) == 0
        err = capsys.readouterr().err
        assert "[1/2] mle | winogrande_s | seed 1: finished earlier, skipped" in err
        assert "[2/2] blob | winogrande_s | seed 1: finished earlier, skipped" in err
        store("blob", eps=0.05)
        assert _run(config, out, data_dir) == 2
        err = capsys.readouterr().err
        assert "[1/2] mle | winogrande_s | seed 1: finished earlier, skipped" in err and "Traceback" not in err
        line = err.strip().splitlines()[-1]  # the error: one line
        assert "blob | winogrande_s | seed 1" in line and "finished with other settings (eps: 0.05 -> 0.2)" in line
    finally:
        for method, text in saved.items():
            (runs / method / "seed1" / "config.json").write_text(text)


def test_differences_leave_out_the_settings_neither_run_reads():
    from blob_pyro.config import RunConfig

    def cfg(**settings):
        return RunConfig.from_dict({"max_steps": 2, **settings}).resolve()

    assert differences(cfg(method="mle", eps=0.05, scale_lr=0.1), cfg(method="mle")) == []
    assert differences(cfg(method="blob", eps=0.05), cfg(method="blob")) == ["eps: 0.05 -> 0.2"]
    # read by one of the two: compared (here the guide differs as well)
    assert "eps: 0.05 -> 0.2" in differences(cfg(method="blob", eps=0.05), cfg(method="map"))
    assert differences(cfg(method="mle", max_steps=3), cfg(method="mle")) == ["max_steps: 3 -> 2"]


@pytest.mark.data
def test_a_narrowed_run_reports_every_finished_cell_of_the_grid(smoke, capsys):
    # a grid run in pieces (one process per --methods pick, as the benchmark notes do) keeps one whole table
    config, out, data_dir = smoke
    assert _run(config, out, data_dir, "--methods", "blob") == 0
    assert "[1/1] blob | winogrande_s | seed 1: finished earlier, skipped" in capsys.readouterr().err
    report = out / "smoke"
    with open(report / "results.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["mle", "blob", "blob_mean"]
    md = (report / "results.md").read_text()
    assert "| mle |" in md and "| blob |" in md
    assert (report / "plots" / "reliability_winogrande_s__mle.png").is_file()
    meta = json.loads((report / "grid.json").read_text())
    assert [e["name"] for e in meta["entries"]] == ["mle", "blob"] and meta["last_run"]["methods"] == ["blob"]
    assert meta["versions"]["torch"] == torch.__version__  # which libraries and CPU kernels ran the grid
    assert meta["versions"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert not [p.name for p in report.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    # `report` with a pick is a deliberate narrowing and stays one
    assert main(["report", str(config), "--out", str(out), "--data-dir", str(data_dir), "--methods", "mle"]) == 0
    with open(report / "results.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["mle"]
    assert _run(config, out, data_dir) == 0  # back to the whole table for the tests that follow


@pytest.mark.data
def test_finished_cell_with_other_settings_is_refused(smoke, capsys):
    config, out, data_dir = smoke
    assert _run(config, out, data_dir, "--set", "max_steps=3") == 2  # a user's mistake: one line, exit 2
    err = capsys.readouterr().err
    assert "mle | winogrande_s | seed 1" in err and "max_steps: 2 -> 3" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.data
def test_a_failing_cell_is_named(tmp_path, data_dir, capsys):
    config = _grid_file(tmp_path, methods=["mle"],
                        variants=[{"name": "broken", "method": "blob", "overrides": {"target_modules": ["no_such_layer"]}}])
    assert _run(config, tmp_path / "out", data_dir, "--methods", "broken") == 2  # the library refused a setting
    err = capsys.readouterr().err
    assert "cell broken | winogrande_s | seed 1 failed" in err and "no_such_layer" in err and "Traceback" not in err


@pytest.mark.data
def test_a_cell_failing_for_another_reason_shows_its_traceback_and_exits_1(tmp_path, data_dir, capsys, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("something broke inside")

    monkeypatch.setattr(runner_cells, "train_member", crash)
    config = _grid_file(tmp_path, methods=["mle", "blob"])
    assert _run(config, tmp_path / "out", data_dir, "--keep-going") == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "something broke inside" in err
    assert err.strip().splitlines()[-1].endswith(
        "2 cell(s) failed: mle | winogrande_s | seed 1 (RuntimeError: something broke inside); "
        "blob | winogrande_s | seed 1 (RuntimeError: something broke inside)")


@pytest.mark.data
def test_grid_file_mistakes_are_one_line_errors(tmp_path, data_dir, capsys):
    def one_line(code):
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err

    assert "method must be one of" in one_line(_run(_grid_file(tmp_path, methods=["mle", "blobb"]), tmp_path / "o",
                                                    data_dir))
    assert "did you mean 'prior_scale'" in one_line(_run(_grid_file(tmp_path, base={**TINY, "prior_scael": 0.1}),
                                                         tmp_path / "o", data_dir))
    assert "unknown key 'seedz'" in one_line(_run(_grid_file(tmp_path, seedz=[1]), tmp_path / "o", data_dir))
    # a method refuses an explicit setting that contradicts it, naming the cell before anything runs
    err = one_line(_run(_grid_file(tmp_path, variants=[{"name": "mle_lowrank", "method": "mle",
                                                        "overrides": {"guide": "lowrank"}}]), tmp_path / "o", data_dir))
    assert "mle_lowrank | winogrande_s | seed 1" in err and "method=mle implies guide=auto_delta" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.data
def test_variants_and_extra_prediction_rows(tmp_path, data_dir, monkeypatch):
    grid = load_grid(_grid_file(tmp_path, methods=[], variants=[
        {"name": "blob_A", "method": "blob", "overrides": {"bayesian_factor": "A", "elbo": "meanfield"},
         "predict": {"blob_A_N1": 1, "blob_A_N3": 3}}]), data_dir=str(data_dir), output_dir=tmp_path / "out")
    cell = cells_of(grid)[0]
    cfg = cell.member_configs(grid.base)[0]
    assert (cfg.bayes.bayesian_factor, cfg.fit.elbo, cfg.method) == ("A", "meanfield", "blob")
    rows = run_grid(grid, progress=False)
    assert [(r["method"], r["num_samples"]) for r in rows] == [("blob_A_N1", 1), ("blob_A_N3", 3)]
    # another grid asks the same trained run for one more row: predicted from the saved run, no training
    grid.entries[0].predict = {"blob_A_N1": 1, "blob_A_mean": 0}
    monkeypatch.setattr(runner_cells, "train_member", lambda *a, **k: pytest.fail("a finished run was retrained"))
    rows = run_grid(grid, progress=False)
    assert [(r["method"], r["num_samples"]) for r in rows] == [("blob_A_N1", 1), ("blob_A_mean", 0)]
    saved = json.loads((cell.dir / "metrics.json").read_text())["bench"]["rows"]
    assert set(saved) == {"blob_A_N1", "blob_A_N3", "blob_A_mean"}


@pytest.mark.data
def test_ood_grid_evaluates_the_same_runs_elsewhere_and_skips_missing_mmlu(tmp_path, data_dir, capsys,
                                                                          monkeypatch):
    if (Path(data_dir) / "mmlu").is_dir():
        pytest.skip("the data folder has mmlu/: the skip message is not exercised")
    import blob_pyro.plots

    titles, save = {}, blob_pyro.plots.save_figure

    def recording_save(fig, path, **kw):
        axes = fig.get_axes() if hasattr(fig, "get_axes") else [fig]
        titles[Path(path).name] = axes[0].get_title()
        return save(fig, path, **kw)

    monkeypatch.setattr(blob_pyro.plots, "save_figure", recording_save)
    config = _grid_file(tmp_path, name="ood", methods=[{"name": "ensemble", "method": "ensemble", "members": 2}],
                        datasets=["openbookqa"], ood_datasets=["arc_easy", "mmlu_college_chemistry"])
    assert _run(config, tmp_path / "out", data_dir) == 0
    err = capsys.readouterr().err
    assert "skipping mmlu_college_chemistry" in err and "mmlu/" in err
    with open(tmp_path / "out" / "ood" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["eval_dataset"]) for r in rows} == {
        (m, d) for m in ("ensemble", "ensemble_logitavg") for d in ("openbookqa", "arc_easy")}
    assert all(r["dataset"] == "openbookqa" for r in rows)
    md = (tmp_path / "out" / "ood" / "results.md").read_text()
    assert "| method | openbookqa | arc_easy |" in md and "skipping mmlu_college_chemistry" in md
    # OOD detection: the arc_easy rows hold the AUROC of telling them from the openbookqa dev rows
    from blob_pyro.uncertainty import ood_auroc

    cell_dir = tmp_path / "out" / "runs" / "openbookqa" / "ensemble" / "seed1"
    dev, shifted = load_file(str(cell_dir / PREDICTIONS)), load_file(str(cell_dir / "ood" / "arc_easy.safetensors"))
    for r in rows:
        columns = (r["auroc_max_prob"], r["auroc_entropy"], r["auroc_mutual_information"])
        if r["eval_dataset"] == "openbookqa":
            assert columns == ("", "", "")
            continue
        row = r["method"]
        want = ood_auroc(torch.softmax(dev[f"{row}.logits"], -1), torch.softmax(shifted[f"{row}.logits"], -1))
        assert [float(c) for c in columns] == pytest.approx(list(want.values()), abs=1e-9)
        # the ensemble's draws are its 2 members; the logit average is one draw, whose MI is 0 everywhere
        assert dev[f"{row}.logits"].shape[0] == (2 if row == "ensemble" else 1)
    assert float(next(r for r in rows if r["method"] == "ensemble_logitavg" and r["eval_dataset"] == "arc_easy")[
        "auroc_mutual_information"]) == 0.5
    assert "## OOD detection AUROC (%)" in md and "### mutual_information" in md
    cell = tmp_path / "out" / "runs" / "openbookqa" / "ensemble" / "seed1"
    for member in ("member0", "member1"):
        assert (cell / member / "ood" / "arc_easy.json").is_file()
    assert (tmp_path / "out" / "ood" / "plots" / "reliability_arc_easy__ensemble.png").is_file()
    # the OOD diagram says where the run was trained; the in-distribution one does not
    assert titles["reliability_arc_easy__ensemble.png"].startswith("ensemble on arc_easy, trained on openbookqa")
    assert titles["reliability_openbookqa__ensemble.png"].startswith("ensemble on openbookqa (")


@pytest.mark.data
def test_ood_grid_evaluates_a_local_mmlu_subject(tmp_path, data_dir):
    """With cais/mmlu CSVs under mmlu/, the OpenBookQA run is scored there too: its own column, JSON and rows."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "openbookqa").symlink_to(Path(data_dir).resolve() / "openbookqa", target_is_directory=True)
    (root / "mmlu").mkdir()
    answers = "ABCDDCBA"
    (root / "mmlu" / "college_physics_test.csv").write_text("".join(
        f'"What is {i}, plus one?",{i + 1},{i + 2},{i + 3},{i + 4},{a}\n' for i, a in enumerate(answers)),
        encoding="utf-8")
    config = _grid_file(tmp_path, name="ood_mmlu", methods=["mle"], datasets=["openbookqa"],
                        ood_datasets=["mmlu_college_physics"])
    assert _run(config, tmp_path / "out", root) == 0
    with open(tmp_path / "out" / "ood_mmlu" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["dataset"], r["eval_dataset"]) for r in rows} == {
        ("mle", "openbookqa", "openbookqa"), ("mle", "openbookqa", "mmlu_college_physics")}
    mmlu = next(r for r in rows if r["eval_dataset"] == "mmlu_college_physics")
    assert mmlu["num_examples"] == str(min(len(answers), TINY["eval_limit"]))
    assert 0.0 <= float(mmlu["accuracy"]) <= 1.0 and float(mmlu["nll"]) > 0
    md = (tmp_path / "out" / "ood_mmlu" / "results.md").read_text()
    assert "| method | openbookqa | mmlu_college_physics |" in md and "skipping" not in md
    saved = json.loads((tmp_path / "out" / "runs" / "openbookqa" / "mle" / "seed1" / "ood"
                        / "mmlu_college_physics.json").read_text())
    assert set(saved["rows"]) == {"mle"}


def test_targets_table_reads_the_seed_means():
    def row(method, seed, acc, ece, nll):
        return {"method": method, "dataset": "d", "eval_dataset": "d", "seed": seed, "accuracy": acc, "ece": ece,
                "nll": nll, "brier": 0.5, "confidence": 0.5, "train_seconds": 1, "eval_seconds": 1}

    rows = [row("mle", 1, 0.70, 0.20, 0.9), row("mle", 2, 0.72, 0.10, 0.8),       # ECE mean 0.15
            row("blob", 1, 0.70, 0.06, 0.7), row("blob", 2, 0.70, 0.08, 0.7),     # 0.07 <= 0.075; acc -1.0 pt
            row("blob_mean", 1, 0.71, 0.10, 0.75), row("blob_mean", 2, 0.71, 0.12, 0.75)]
    lines = targets_markdown(rows)
    assert lines[0] == "## Targets (seed means)" and len(lines) == 12
    cells = [c.strip() for c in lines[4].split("|")[1:-1]]
    assert cells[0] == "d" and cells[1] == "7.00 / 15.00 = 0.47" and cells[2] == "yes"
    assert cells[3] == "-1.00" and cells[4] == "yes"
    assert cells[5] == "-0.1500" and cells[6] == "yes"
    assert cells[7] == "15.00 > 11.00 > 7.00: yes"
    assert cells[8] == "-21.0"  # mle's mean confidence 0.5 against its accuracy 0.71
    assert cells[9] == "–"  # no saved predictions: chance unknown, the targets apply
    # Welch's one-sided p per target, against scipy's unequal-variance t-test
    from scipy.stats import ttest_ind

    def p(a, b, alternative):
        return f"{ttest_ind(a, b, equal_var=False, alternative=alternative).pvalue:.3f}"

    ps = [c.strip() for c in lines[10].split("|")[1:-1]]
    assert ps[:2] == ["d", "2"]
    assert ps[2] == p([0.06, 0.08], [0.10, 0.05], "less")
    assert ps[3] == p([0.70, 0.70], [0.69, 0.71], "greater")
    assert ps[4] == p([0.7, 0.7], [0.9, 0.8], "less")
    assert ps[5] == p([0.20, 0.10], [0.10, 0.12], "greater")
    assert ps[6] == p([0.10, 0.12], [0.06, 0.08], "greater")
    rows[2]["ece"] = 0.09  # blob ECE mean 0.085: more than half of 0.15
    cells = [c.strip() for c in targets_markdown(rows)[4].split("|")[1:-1]]
    assert cells[1] == "8.50 / 15.00 = 0.57" and cells[2] == "**no**"
    assert targets_markdown([r for r in rows if r["method"] != "blob_mean"]) == []
    # a half-done grid: blob's seed 3 has no mle / blob_mean partner, so it stays out of the means and is named
    lines = targets_markdown(rows + [row("blob", 3, 0.10, 0.90, 9.0)])
    cells = [c.strip() for c in lines[4].split("|")[1:-1]]
    assert cells[1] == "8.50 / 15.00 = 0.57" and cells[3] == "-1.00"
    assert "- d: seeds 1, 2 (those all three rows have); left out: 3." in lines
    one = targets_markdown([r for r in rows if r["seed"] == 1])  # one seed: means, but no t
    assert [c.strip() for c in one[10].split("|")[1:-1]] == ["d", "1", "–", "–", "–", "–", "–"]


def test_targets_do_not_apply_where_mle_stays_near_chance():
    def row(method, seed, acc, chance):
        return {"method": method, "dataset": "d", "eval_dataset": "d", "seed": seed, "accuracy": acc, "ece": 0.1,
                "nll": 0.7, "confidence": 0.5, "chance": chance}

    near = [row(m, s, 0.54, "0.5") for m in ("mle", "blob", "blob_mean") for s in (1, 2)]  # CSV strings, as merged
    lines = targets_markdown(near)
    cells = [c.strip() for c in lines[4].split("|")[1:-1]]
    assert cells[2] == cells[4] == cells[6] == "n/a" and cells[7].endswith(": n/a") and cells[9] == "+4.0"
    assert "- d: MLE is +4.0 points from chance, less than 5: a task this backbone does not learn, so the targets " \
           "do not apply." in lines
    assert lines[-2] == "| d | 2 | n/a | n/a | n/a | n/a | n/a |"
    learned = [row(m, s, 0.55, 0.5) for m in ("mle", "blob", "blob_mean") for s in (1, 2)]  # 5 points: it applies
    cells = [c.strip() for c in targets_markdown(learned)[4].split("|")[1:-1]]
    assert cells[9] == "+5.0" and cells[2] == "**no**" and cells[6] == "**no**"


def test_chance_counts_each_questions_options_not_its_padding():
    import torch

    from benchmarks.runner.report import _chance

    inf = float("inf")
    # three questions with 4, 3 and 5 options (padded to 5: logit -inf); the first question's last real option has a
    # probability that underflowed to 0, which the logits still count and the probabilities alone cannot
    logits = torch.tensor([[[0.0, 1.0, 2.0, -200.0, -inf], [0.0, 0.0, 1.0, -inf, -inf], [0.0, 1.0, 2.0, 3.0, 4.0]]])
    probs = torch.softmax(logits[0], -1)
    assert probs[0, 3] == 0
    run_dir = Path("cell")
    cache = {predictions_path(run_dir, "d", "d"): {"mle": (probs, logits), "old": (probs, None)}}
    assert _chance(run_dir, "d", "d", "mle", cache) == pytest.approx((1 / 4 + 1 / 3 + 1 / 5) / 3)
    assert _chance(run_dir, "d", "d", "old", cache) == pytest.approx((1 / 3 + 1 / 3 + 1 / 5) / 3)  # probs only
    assert _chance(run_dir, "d", "d", "absent", cache) is None


def test_summary_table_quotes_the_three_metrics_seed_means():
    def row(method, seed, acc, ece, nll):
        return {"method": method, "dataset": "d", "eval_dataset": "d", "seed": seed, "accuracy": acc, "ece": ece,
                "nll": nll}

    rows = [row("mle", 1, 0.40, 0.30, 2.0), row("mle", 2, 0.45, 0.25, 1.9), row("blob", 1, 0.46, 0.07, 1.25)]
    lines = summary_table(rows).splitlines()
    assert lines[:2] == ["| method | d |", "|---|---|"]
    assert lines[2] == "| mle | 42.5 / 27.5 / 1.950 |"
    assert lines[3] == "| blob | 46.0 / 7.0 / 1.250 (1 seed) |"


def test_markdown_table_marks_cells_with_fewer_seeds():
    def row(method, seed, acc):
        return {"method": method, "dataset": "d", "eval_dataset": "d", "seed": seed, "accuracy": acc}

    rows = [row("mle", 1, 0.5), row("mle", 2, 0.6), row("mle", 3, 0.7), row("blob", 1, 0.4), row("blob", 2, 0.6),
            row("map", 1, 0.55)]
    lines = markdown_table(rows, "accuracy", scale=100).splitlines()
    assert lines[2] == "| mle | 60.00 ± 10.00 |"
    assert lines[3] == "| blob | 50.00 ± 14.14 (2 seeds) |"
    assert lines[4] == "| map | 55.00 (1 seed) |"


@pytest.mark.data
def test_posterior_spread_script_reads_finished_runs(smoke, tmp_path):
    """benchmarks/posterior_spread.py: one row per blob run with its std, and one line + exit 2 without runs."""
    import subprocess
    import sys

    script = REPO / "benchmarks" / "posterior_spread.py"
    _, out, _ = smoke
    proc = subprocess.run([sys.executable, str(script), str(out), "--entries", "blob"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| winogrande_s/blob/seed1 |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    std, ratio = float(cells[1]), float(cells[2])
    assert 0.015 < std < 0.045 and abs(ratio - std / 0.2) < 1e-3  # rho^2, rho ~ U(0.14, 0.2), after 2 steps
    assert float(cells[5]) >= 0  # N=2 vs posterior-mean probabilities, both saved by the runner
    bad = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "no finished runs" in bad.stderr


# ---- ensembles and the training path (moved from tests/test_methods.py) ---------------------------------
def test_ensemble_average_rules():
    probs = [torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([[0.5, 0.5], [0.4, 0.6]])]
    logits = [torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])]
    p, q = ensemble_average(probs, logits)
    assert torch.allclose(p, (probs[0] + probs[1]) / 2)
    assert torch.allclose(q, torch.softmax(torch.tensor([[1.0, 0.0], [0.5, 1.0]]), -1))


def _tiny_llama_base(tiny_llama_dir, data_dir) -> dict:
    return dict(model=str(tiny_llama_dir), data_dir=str(data_dir), max_steps=2, batch_size=4, max_length=32,
                eval_batch_size=8, lr=1e-2, train_limit=8, eval_limit=6)


@pytest.mark.data
def test_ensemble_cell_trains_k_members_and_averages_their_probabilities(tiny_llama_dir, data_dir, tmp_path):
    entry = Entry("ensemble", "ensemble", {}, {"ensemble": "probs", "ensemble_logitavg": "logits"}, members=3)
    grid = Grid("g", tmp_path, _tiny_llama_base(tiny_llama_dir, data_dir), [entry], ["winogrande_s"], [7])
    cell = cells_of(grid)[0]
    metrics = run_cell(cell, grid, progress=False)
    members = cell.member_dirs()
    assert [m.name for m in members] == ["member0", "member1", "member2"]
    stored = [json.loads((m / "config.json").read_text())["config"] for m in members]
    assert [c["fit"]["seed"] for c in stored] == [7, 1007, 2007]
    assert {c["method"] for c in stored} == {"mle"} and {c["predict"]["num_samples"] for c in stored} == {0}
    member_preds = [load_file(str(m / PREDICTIONS)) for m in members]
    ours = load_file(str(cell.dir / PREDICTIONS))
    mean = torch.stack([p["member.probs"] for p in member_preds]).mean(0)
    assert torch.allclose(ours["ensemble.probs"], mean, atol=1e-6)
    logit_mean = torch.stack([p["member.logits"].mean(0) for p in member_preds]).mean(0)
    assert torch.allclose(ours["ensemble_logitavg.probs"], torch.softmax(logit_mean, -1), atol=1e-6)
    assert not torch.allclose(member_preds[0]["member.probs"], member_preds[1]["member.probs"])  # seeds differ
    assert set(metrics["bench"]["rows"]) == {"ensemble", "ensemble_logitavg"}


@pytest.mark.data
def test_a_cell_trains_what_train_run_trains(tiny_llama_dir, data_dir, tmp_path):
    """The runner trains through fit (keeping every prediction); it must match train_run exactly."""
    from blob_pyro.config import RunConfig
    from blob_pyro.training import train_run

    cfg = RunConfig.from_dict({**_tiny_llama_base(tiny_llama_dir, data_dir), "dataset": "winogrande_s",
                               "method": "blob", "num_samples": 2, "seed": 3}).resolve()
    ref = train_run(cfg, tmp_path / "ref", progress=False)
    ours = runner_cells.train_member(cfg, tmp_path / "ours", {"blob": cfg.predict.num_samples, "blob_mean": 0},
                                     progress=False)
    for key in ("accuracy", "ece", "nll", "brier"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    assert ours["bench"]["rows"]["blob"]["nll"] == pytest.approx(ref["nll"], abs=1e-6)
    ref_log = (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()
    our_log = (tmp_path / "ours" / "train_log.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
    assert [strip(x) for x in our_log] == [strip(x) for x in ref_log]
    # both folders hold the same settings, and the runner accepts the train_run folder as finished with them
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["config"] == \
        json.loads((tmp_path / "ref" / "config.json").read_text())["config"]
    check_finished("ref", tmp_path / "ref", cfg)


@pytest.mark.data
def test_an_ensemble_cell_is_what_blob_pyro_train_method_ensemble_gives(tiny_llama_dir, data_dir, tmp_path):
    """One ensemble, two front ends: the grid's cell and the library's train_ensemble share seeds and averages."""
    from blob_pyro.config import RunConfig
    from blob_pyro.ensemble import train_ensemble

    base = _tiny_llama_base(tiny_llama_dir, data_dir)
    entry = Entry("ensemble", "ensemble", {}, {"ensemble": "probs"}, members=2)
    grid = Grid("g", tmp_path / "grid", base, [entry], ["winogrande_s"], [7])
    cell = cells_of(grid)[0]
    ours = run_cell(cell, grid, progress=False)["bench"]["rows"]["ensemble"]
    cfg = RunConfig.from_dict({**base, "dataset": "winogrande_s", "method": "ensemble", "ensemble_size": 2,
                               "seed": 7})
    ref = train_ensemble(cfg, tmp_path / "lib", progress=False)
    for key in ("accuracy", "ece", "nll", "brier"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    for j in range(2):  # the members' settings are the same too
        assert json.loads((cell.dir / f"member{j}" / "config.json").read_text())["config"] == \
            json.loads((tmp_path / "lib" / f"member{j}" / "config.json").read_text())["config"]
    probs = load_file(str(tmp_path / "lib" / PREDICTIONS))["probs"]
    assert torch.allclose(load_file(str(cell.dir / PREDICTIONS))["ensemble.probs"], probs, atol=1e-6)


@pytest.mark.data
def test_a_temperature_cell_fits_t_as_train_run_does(tiny_llama_dir, data_dir, tmp_path):
    from blob_pyro.config import RunConfig
    from blob_pyro.training import train_run

    cfg = RunConfig.from_dict({**_tiny_llama_base(tiny_llama_dir, data_dir), "dataset": "winogrande_s",
                               "method": "temperature", "calibration_fraction": 0.25, "seed": 3}).resolve()
    ref = train_run(cfg, tmp_path / "ref", progress=False)
    ours = runner_cells.train_member(cfg, tmp_path / "ours", {"temperature": 0}, progress=False)
    assert (tmp_path / "ours" / "temperature.json").read_text() == (tmp_path / "ref" / "temperature.json").read_text()
    for key in ("accuracy", "ece", "nll", "brier"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key


def test_side_by_side_reliability_figure_has_a_panel_per_row_and_needs_mle(tmp_path, monkeypatch):
    import blob_pyro.plots
    from benchmarks.runner.report import write_side_by_side

    saved = {}
    monkeypatch.setattr(blob_pyro.plots, "save_figure",
                        lambda fig, path: saved.setdefault(Path(path).name, [a.get_title() for a in fig.get_axes()]))
    g = torch.Generator().manual_seed(0)
    probs = [torch.softmax(torch.randn(20, 4, generator=g), -1) for _ in range(2)]
    labels = [torch.randint(0, 4, (20,), generator=g) for _ in range(2)]
    pooled = {("arc_easy", m): (probs, labels, "arc_easy") for m in ("mle", "blob", "map")}
    pooled[("arc_challenge", "blob")] = (probs[:1], labels[:1], "arc_challenge")  # no mle there: no figure
    write_side_by_side(pooled, tmp_path)
    assert list(saved) == ["reliability_arc_easy.png"]
    assert saved["reliability_arc_easy.png"] == ["MLE (plain LoRA), 2 seeds pooled", "BLoB (N = 10), 2 seeds pooled"]
