"""Does a benchmark row differ from a reference row by more than the seed noise? Welch's t over seeds.

Reads a grid's ``results.csv`` (the one ``python -m benchmarks.runner report`` writes, or a committed copy under
``benchmarks/results/``) and, for one dataset, compares every result row with the reference row (``mle`` by
default) on accuracy, ECE and NLL: mean ± sample std over seeds, Welch's t (the difference of the means over
its standard error), the Welch–Satterthwaite degrees of freedom and the two-sided p-value. Only rows with the
reference's seeds are compared; the others are listed as skipped. With three seeds a |t| needs to pass
about 2.8 (four degrees of freedom) for p < 0.05, and a table of thirty rows × three metrics will show a few
such values by chance: read the p-values as a screen, not a verdict.

    python benchmarks/seed_tests.py benchmarks/results/cpu_ablations/results.csv --dataset arc_challenge
"""

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

METRICS = (("accuracy", 100.0, 1, "ACC %"), ("ece", 100.0, 2, "ECE %"), ("nll", 1.0, 3, "NLL"))


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """(t, degrees of freedom) of mean(a) − mean(b); t is nan when both samples have zero variance."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se2 = va + vb
    if se2 == 0:
        return math.nan, math.nan
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(se2)
    df = se2 ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, df


def two_sided_p(t: float, df: float) -> float:
    if math.isnan(t):
        return math.nan
    from scipy.stats import t as student_t  # scipy comes with arviz

    return float(2 * student_t.sf(abs(t), df))


def one_sided_p(a: list[float], b: list[float], alternative: str) -> float:
    """Welch's one-sided p of the alternative mean(a) < mean(b) (``"less"``) or mean(a) > mean(b) (``"greater"``):
    small when the seeds support it. nan with fewer than 2 values on a side or no variance on either."""
    if alternative not in ("less", "greater"):
        raise ValueError(f"alternative must be 'less' or 'greater', got {alternative!r}")
    if min(len(a), len(b)) < 2:
        return math.nan
    t, df = welch(a, b)
    if math.isnan(t):
        return math.nan
    from scipy.stats import t as student_t

    return float(student_t.cdf(t, df) if alternative == "less" else student_t.sf(t, df))


def fail(msg: str) -> int:
    print(f"seed_tests.py: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", help="a grid's results.csv")
    p.add_argument("--dataset", required=True, help="the in-distribution dataset to compare on")
    p.add_argument("--reference", default="mle", help="the row to compare with (default mle)")
    args = p.parse_args(argv)

    path = Path(args.csv)
    if not path.is_file():
        return fail(f"no such file: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"method", "dataset", "eval_dataset", "seed"} | {m for m, *_ in METRICS}
    if not rows or not need <= set(rows[0]):
        return fail(f"{path} is not a results.csv of benchmarks.runner (needs columns {', '.join(sorted(need))})")
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["dataset"] == args.dataset and r["eval_dataset"] == args.dataset:
            by.setdefault(r["method"], {})[r["seed"]] = r
    if not by:
        datasets = sorted({r["dataset"] for r in rows})
        return fail(f"no rows for dataset {args.dataset!r} in {path} (it has: {', '.join(datasets)})")
    if args.reference not in by:
        return fail(f"no {args.reference!r} rows for {args.dataset} in {path}")
    seeds = sorted(by[args.reference], key=lambda s: (len(s), s))
    if len(seeds) < 2:
        return fail(f"{args.reference!r} has {len(seeds)} seed on {args.dataset}: Welch's t needs at least 2")

    def values(method, metric, scale):
        return [float(by[method][s][metric]) * scale for s in seeds]

    head = " | ".join(f"{label} | t | p" for *_, label in METRICS)
    print(f"Welch's t against `{args.reference}` on {args.dataset}, seeds {', '.join(seeds)} "
          f"(mean ± sample std over seeds).\n")
    print(f"| row | {head} |")
    print("|---|" + "---|---|---|" * len(METRICS))
    skipped = []
    for method in by:
        if sorted(by[method]) != sorted(seeds):
            skipped.append(f"{method} (seeds {', '.join(sorted(by[method]))})")
            continue
        cells = []
        for metric, scale, digits, _ in METRICS:
            a, b = values(method, metric, scale), values(args.reference, metric, scale)
            t, df = welch(a, b) if method != args.reference else (math.nan, math.nan)
            pv = two_sided_p(t, df)
            cells.append(f"{statistics.fmean(a):.{digits}f} ± {statistics.stdev(a):.{digits}f} | "
                         + ("–" if math.isnan(t) else f"{t:+.2f}") + " | " + ("–" if math.isnan(pv) else f"{pv:.3f}"))
        print(f"| {method} | " + " | ".join(cells) + " |")
    if skipped:
        print(f"\nSkipped (not the reference's seeds): {'; '.join(skipped)}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
