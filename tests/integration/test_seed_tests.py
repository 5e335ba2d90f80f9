"""benchmarks/seed_tests.py: Welch's t per row against a reference, from a results.csv; clear errors."""

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "seed_tests.py"
COLUMNS = ["method", "entry", "dataset", "eval_dataset", "seed", "accuracy", "ece", "nll"]


def _load():
    spec = importlib.util.spec_from_file_location("seed_tests", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _csv(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for method, dataset, seed, acc, ece, nll in rows:
            w.writerow([method, method, dataset, dataset, seed, acc, ece, nll])
    return path


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_welch_matches_the_textbook_formula_and_scipy():
    mod = _load()
    a, b = [0.30, 0.34, 0.35], [0.24, 0.25, 0.27]
    ma, mb = sum(a) / 3, sum(b) / 3
    va = sum((x - ma) ** 2 for x in a) / 2 / 3
    vb = sum((x - mb) ** 2 for x in b) / 2 / 3
    t, df = mod.welch(a, b)
    assert t == pytest.approx((ma - mb) / math.sqrt(va + vb), rel=1e-12)
    assert df == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2), rel=1e-12)
    from scipy.stats import ttest_ind

    ref = ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic, rel=1e-9)
    assert mod.two_sided_p(t, df) == pytest.approx(ref.pvalue, rel=1e-9)
    assert math.isnan(mod.welch([1.0, 1.0], [1.0, 1.0])[0])  # no spread on either side: no t


def test_cli_prints_one_row_per_method_and_skips_other_seed_sets(tmp_path):
    path = _csv(tmp_path / "results.csv", [
        ("mle", "d", 1, 0.30, 0.10, 1.30), ("mle", "d", 2, 0.34, 0.08, 1.28), ("mle", "d", 3, 0.35, 0.12, 1.31),
        ("blob", "d", 1, 0.24, 0.02, 1.38), ("blob", "d", 2, 0.25, 0.01, 1.38), ("blob", "d", 3, 0.27, 0.03, 1.37),
        ("half", "d", 1, 0.5, 0.5, 0.5), ("half", "d", 2, 0.5, 0.5, 0.5),
        ("mle", "other", 1, 0.9, 0.9, 0.9),
    ])
    proc = _run(path, "--dataset", "d")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    blob = next(line for line in lines if line.startswith("| blob |"))
    cells = [c.strip() for c in blob.strip("|").split("|")]
    mod = _load()
    t, df = mod.welch([24.0, 25.0, 27.0], [30.0, 34.0, 35.0])
    assert cells[1] == "25.3 ± 1.5" and cells[2] == f"{t:+.2f}" and cells[3] == f"{mod.two_sided_p(t, df):.3f}"
    assert next(line for line in lines if line.startswith("| mle |")).count("–") == 6  # no test against itself
    assert not any(line.startswith("| half |") for line in lines)
    assert "Skipped (not the reference's seeds): half (seeds 1, 2)." in proc.stdout


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("dataset", "no rows for dataset 'nope'"),
    ("reference", "no 'map' rows"),
    ("one_seed", "needs at least 2"),
    ("not_results", "is not a results.csv"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, case, message):
    good = _csv(tmp_path / "results.csv", [("mle", "d", 1, 0.3, 0.1, 1.3), ("mle", "d", 2, 0.3, 0.1, 1.3),
                                           ("mle", "e", 1, 0.3, 0.1, 1.3)])
    args = {"missing": [tmp_path / "absent.csv", "--dataset", "d"], "dataset": [good, "--dataset", "nope"],
            "reference": [good, "--dataset", "d", "--reference", "map"], "one_seed": [good, "--dataset", "e"]}
    if case == "not_results":
        other = tmp_path / "other.csv"
        other.write_text("a,b\n1,2\n")
        args[case] = [other, "--dataset", "d"]
    proc = _run(*args[case])
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seed_tests.py: error:") and message in err[0]
