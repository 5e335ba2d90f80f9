"""`python -m benchmarks.runner merge`: one table from results.csv files written in several output folders (e.g. on
other machines), committed ones included."""

import csv
import json
from pathlib import Path

import pytest

from benchmarks.runner.cli import main
from benchmarks.runner.report import CSV_COLUMNS

REPO = Path(__file__).resolve().parents[2]

GRID = {"name": "g", "base": {"model": "minilm", "max_steps": 2, "batch_size": 4},
        "methods": ["mle", "blob"], "datasets": ["winogrande_s", "arc_easy"], "seeds": [1, 2]}


def _row(method, dataset, seed, acc, entry=None):
    entry = entry or ("blob" if method.startswith("blob") else method)
    return {"method": method, "entry": entry, "trained_as": entry, "dataset": dataset, "eval_dataset": dataset,
            "seed": seed, "num_samples": 0, "accuracy": acc, "ece": acc / 10, "nll": 1 - acc, "brier": 0.5,
            "confidence": "", "num_examples": 100, "train_seconds": 10.0, "eval_seconds": 2.0, "setup_seconds": 1.0,
            "max_steps": 2, "batch_size": 4, "run_dir": f"elsewhere/{dataset}/{entry}/seed{seed}"}


def _csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def _read(path: Path):
    with open(path, newline="") as f:
        return [(r["dataset"], r["seed"], r["method"], r["accuracy"]) for r in csv.DictReader(f)]


@pytest.fixture
def grid_file(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(GRID))
    return path


def test_merge_adds_rows_in_grid_order_and_renders_the_table(grid_file, tmp_path):
    out = tmp_path / "out"
    # the folder's own results (seed 1) first, then cells run elsewhere (seed 2), given out of order
    _csv(out / "g" / "results.csv", [_row("mle", "winogrande_s", 1, 0.5), _row("blob", "winogrande_s", 1, 0.6),
                                     _row("blob_mean", "winogrande_s", 1, 0.55)])
    other = _csv(tmp_path / "other.csv", [_row("blob_mean", "winogrande_s", 2, 0.45), _row("blob", "winogrande_s", 2, 0.4),
                                          _row("mle", "arc_easy", 2, 0.3), _row("mle", "winogrande_s", 2, 0.7),
                                          _row("mle", "winogrande_s", 1, 0.5)])  # a repeat, equal: kept once
    assert main(["merge", str(grid_file), "--out", str(out), "--from", str(other)]) == 0
    rows = _read(out / "g" / "results.csv")
    assert rows == [("winogrande_s", "1", "mle", "0.5"), ("winogrande_s", "1", "blob", "0.6"),
                    ("winogrande_s", "1", "blob_mean", "0.55"), ("winogrande_s", "2", "mle", "0.7"),
                    ("winogrande_s", "2", "blob", "0.4"), ("winogrande_s", "2", "blob_mean", "0.45"),
                    ("arc_easy", "2", "mle", "0.3")]
    md = (out / "g" / "results.md").read_text()
    assert "| mle | 60.00 ± 14.14 | 30.00 (1 seed) |" in md  # mean ± std over the two merged seeds
    assert "| blob | 50.00 ± 14.14 | – |" in md
    assert (out / "g" / "plots" / "metrics_winogrande_s.png").is_file()
    assert (out / "g" / "plots" / "metrics_arc_easy.png").is_file()


@pytest.mark.parametrize("old_first", [True, False])
def test_an_old_results_csv_merges_with_a_new_one(grid_file, tmp_path, old_first):
    """A results.csv written before the uncertainty columns existed loads; a row both files have takes them from the
    newer one, and a row only the old file has keeps them empty."""
    out = tmp_path / "out"
    old_columns = CSV_COLUMNS[:CSV_COLUMNS.index("run_dir") + 1]
    old_path = out / "g" / "results.csv" if old_first else tmp_path / "old.csv"
    old_path.parent.mkdir(parents=True, exist_ok=True)
    with open(old_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_columns, extrasaction="ignore")
        w.writeheader()
        w.writerows([_row("mle", "winogrande_s", 1, 0.5), _row("mle", "winogrande_s", 2, 0.7)])
    new = {**_row("mle", "winogrande_s", 1, 0.5), "ece_bins": 15, "entropy": 0.25, "expected_entropy": 0.25,
           "mutual_information": 0.0, "aurc": 0.125, "accuracy_at_80": 0.625}
    new_path = _csv(tmp_path / "new.csv" if old_first else out / "g" / "results.csv", [new])
    assert main(["merge", str(grid_file), "--out", str(out), "--from",
                 str(new_path if old_first else old_path)]) == 0
    with open(out / "g" / "results.csv", newline="") as f:
        rows = {r["seed"]: r for r in csv.DictReader(f)}
    assert tuple(rows["1"]) == CSV_COLUMNS
    assert (rows["1"]["mutual_information"], rows["1"]["aurc"], rows["1"]["ece_bins"]) == ("0.0", "0.125", "15")
    assert rows["2"]["mutual_information"] == rows["2"]["aurc"] == rows["2"]["auroc_entropy"] == ""
    md = (out / "g" / "results.md").read_text()
    assert "## AURC (%) ↓" in md and "| mle | 12.50 (1 seed) |" in md and "ECE bins: 15" in md


def test_merge_refuses_a_row_that_differs_and_writes_nothing(grid_file, tmp_path, capsys):
    out = tmp_path / "out"
    mine = _csv(out / "g" / "results.csv", [_row("mle", "winogrande_s", 1, 0.5)])
    before = mine.read_bytes()
    other = _csv(tmp_path / "other.csv", [_row("mle", "arc_easy", 1, 0.3), _row("mle", "winogrande_s", 1, 0.49)])
    assert main(["merge", str(grid_file), "--out", str(out), "--from", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mle/mle/winogrande_s/winogrande_s/1 differs" in err[0] and "accuracy 0.5 vs 0.49" in err[0]
    assert mine.read_bytes() == before and not (out / "g" / "results.md").exists()


@pytest.mark.parametrize("case", ["not_in_grid", "other_settings", "missing", "not_a_results_csv"])
def test_merge_bad_input_is_one_line_and_nonzero(grid_file, tmp_path, capsys, case):
    if case == "other_settings":  # a 250-step cell must not join a 2-step grid's seed means
        src = _csv(tmp_path / "x.csv", [_row("mle", "winogrande_s", 1, 0.5) | {"max_steps": 250}])
        want = "trained with max_steps 250 (grid: 2)"
    elif case == "not_in_grid":
        src = _csv(tmp_path / "x.csv", [_row("bbb", "winogrande_s", 1, 0.5)])
        want = "'bbb' of entry 'bbb' on 'winogrande_s' is not in the grid"
    elif case == "missing":
        src, want = tmp_path / "nope.csv", "cannot read"
    else:
        src = tmp_path / "notes.csv"
        src.write_text("a,b\n1,2\n")
        want = "is not a results.csv of this runner"
    assert main(["merge", str(grid_file), "--out", str(tmp_path / "out"), "--from", str(src)]) == 2
    err = capsys.readouterr().err
    assert want in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "g" / "results.csv").exists()


# each committed results.csv, with the grid file and settings its README says produced it
COMMITTED = [
    ("cpu", "bench_cpu.json", []),
    ("cpu_ablations", "ablations_cpu.json", []),
    ("cpu_ood", "ood_cpu.json", []),
    ("cpu_long", "long_budget_cpu.json", []),
    ("cpu_long_arcc_fp32", "long_budget_cpu.json", ["--set", "bf16=false", "--datasets", "arc_challenge"]),
    ("cpu_long_wg_fp32", "long_budget_cpu.json", ["--set", "bf16=false", "--datasets", "winogrande_s"]),
    ("cpu_ood_long_fp32", "ood_long_cpu.json", ["--set", "bf16=false"]),
    ("smollm2_cloze", "smollm2_cloze.json", []),
    ("main_cpu", "main_cpu.json", []),
]


def test_every_committed_results_csv_has_its_grid():
    assert sorted(d for d, _, _ in COMMITTED) == sorted(p.parent.name for p in (REPO / "benchmarks" / "results").glob(
        "*/results.csv"))


@pytest.mark.parametrize("folder, grid, extra", COMMITTED, ids=[c[0] for c in COMMITTED])
def test_committed_results_merge_into_their_grid_unchanged(tmp_path, folder, grid, extra):
    """The committed tables stay readable: merged into their grid they give the same rows and metrics."""
    src = REPO / "benchmarks" / "results" / folder / "results.csv"
    assert main(["merge", str(REPO / "configs" / grid), "--out", str(tmp_path), "--from", str(src), *extra]) == 0
    merged = next(tmp_path.glob("*/results.csv"))
    key = lambda r: (r["entry"], r["method"], r["dataset"], r["eval_dataset"], r["seed"])  # noqa: E731
    with open(src, newline="") as f:
        before = {key(r): r for r in csv.DictReader(f)}
    with open(merged, newline="") as f:
        after = {key(r): r for r in csv.DictReader(f)}
    assert after.keys() == before.keys()
    for k, r in before.items():
        # columns added since a file was written (the uncertainty metrics) are empty in the merged table
        assert {c: after[k][c] for c in CSV_COLUMNS} == {c: r.get(c, "") for c in CSV_COLUMNS}, k
