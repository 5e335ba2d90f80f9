"""Results of a grid: results.csv, results.md (seed means, targets, times) and plots, from the finished cells.

::

    <name>/results.csv                       one row per (result row, train dataset, eval dataset, seed)
    <name>/results.md                        mean ± std over seeds: ACC and ECE ×100, NLL, Brier, the uncertainty
                                             metrics, OOD-detection AUROCs (OOD grids), times
    <name>/plots/reliability_<dataset>__<row>.png   reliability diagram, seeds pooled
    <name>/plots/reliability_<dataset>.png          MLE's and BLoB's diagrams side by side, seeds pooled
    <name>/plots/risk_coverage_<dataset>__<row>.png risk–coverage curve beside it, seeds pooled
    <name>/plots/risk_coverage_<dataset>.png        every row's risk–coverage curve on one plot
    <name>/plots/metrics_<dataset>.png       ACC / ECE / NLL bar chart per dataset
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from blob_pyro.io import atomic_write_text

from .cells import METRIC_NAMES, UNCERTAINTY_NAMES, available_ood
from .files import METRICS, is_finished, load_predictions, predictions_path
from .grid import Grid, cells_of, run_config

__all__ = ["CSV_COLUMNS", "AUROC_COLUMNS", "collect_rows", "write_csv", "summarize", "markdown_table", "results_markdown",
           "targets_markdown", "summary_table", "write_plots", "write_metric_charts", "report", "seed_key"]

CSV_COLUMNS = ("method", "entry", "trained_as", "dataset", "eval_dataset", "seed", "num_samples", "accuracy", "ece",
               "nll", "brier", "confidence", "num_examples", "train_seconds", "eval_seconds", "setup_seconds", "max_steps",
               "batch_size", "run_dir", "ece_bins") + UNCERTAINTY_NAMES + ("auroc_max_prob", "auroc_entropy",
                                                                           "auroc_mutual_information",
                                                                           "train_cpu_seconds", "eval_cpu_seconds",
                                                                           "chance")
# an OOD row's AUROC of telling its examples from the cell's own dev split, per score (blob_pyro.uncertainty.ood_auroc)
AUROC_COLUMNS = {"max_prob": "auroc_max_prob", "entropy": "auroc_entropy", "mutual_information": "auroc_mutual_information"}


def collect_rows(grid: Grid, ood: list[str] | None = None) -> list[dict]:
    """One dict per result row of every finished cell (in-distribution and OOD), in grid order.

    A row predicted before a metric was reported (an old cell) has ``None`` for it; an OOD row has the AUROCs of
    telling its predictions from the same row's on the cell's dev split when both prediction files exist.
    """
    ood = list(ood or [])
    out = []
    cache: dict = {}
    for cell in cells_of(grid):
        if not is_finished(cell):
            continue
        metrics = json.loads((cell.dir / METRICS).read_text())
        bench = metrics.get("bench", {})
        cfg = cell.member_configs(grid.base)[0]
        common = {"entry": cell.entry.name, "trained_as": cell.entry.method, "dataset": cell.dataset,
                  "seed": cell.seed, "train_seconds": bench.get("train_seconds"),
                  "train_cpu_seconds": bench.get("train_cpu_seconds"),
                  "setup_seconds": bench.get("setup_seconds"), "max_steps": cfg.fit.max_steps,
                  "batch_size": cfg.fit.batch_size, "run_dir": str(cell.dir)}
        sources = [(cell.dataset, bench.get("rows", {}))]
        for d in ood:
            path = cell.dir / "ood" / f"{d}.json"
            if path.is_file():
                sources.append((d, json.loads(path.read_text())["rows"]))
        for eval_dataset, rows in sources:
            for row in cell.entry.predict:  # only the rows this grid asks for, in its order
                if row not in rows:
                    continue
                m = rows[row]
                out.append({**common, "method": row, "eval_dataset": eval_dataset,
                            "num_samples": m.get("num_samples"), "num_examples": m.get("num_examples"),
                            "eval_seconds": m.get("eval_seconds"), "eval_cpu_seconds": m.get("eval_cpu_seconds"),
                            **{k: m[k] for k in METRIC_NAMES},
                            **{k: m.get(k) for k in UNCERTAINTY_NAMES + ("ece_bins",)},
                            "confidence": _mean_confidence(cell.dir, eval_dataset, cell.dataset, row, cache),
                            "chance": _chance(cell.dir, eval_dataset, cell.dataset, row, cache),
                            **_ood_aurocs(cell.dir, cell.dataset, eval_dataset, row, cache)})
    return out


def _saved(run_dir: Path, dataset: str, eval_dataset: str, cache: dict) -> dict:
    """{row: (probs, logits or None)} of a cell's saved predictions on ``eval_dataset`` ({} if gone), cached."""
    path = predictions_path(run_dir, dataset, eval_dataset)
    if path not in cache:
        cache[path] = load_predictions(path)[1] if path.is_file() else {}
    return cache[path]


def _ood_aurocs(run_dir: Path, dataset: str, eval_dataset: str, row: str, cache: dict) -> dict:
    """AUROC columns of an OOD row: in-distribution = the row's dev predictions, positives = its shifted ones.

    The mutual information's AUROC needs both sides' per-draw logits (absent for rows saved before they were kept:
    None there); the other two scores read the averaged probabilities.
    """
    import torch

    from blob_pyro.uncertainty import ood_auroc

    empty = dict.fromkeys(AUROC_COLUMNS.values())
    if eval_dataset == dataset:
        return empty
    dev, shifted = _saved(run_dir, dataset, dataset, cache).get(row), _saved(run_dir, dataset, eval_dataset, cache).get(row)
    if dev is None or shifted is None:
        return empty

    def draws(saved):
        probs, logits = saved
        return torch.softmax(logits.float(), -1) if logits is not None else probs.float()

    got = ood_auroc(draws(dev), draws(shifted))
    if dev[1] is None or shifted[1] is None:
        got["mutual_information"] = None
    return {AUROC_COLUMNS[k]: v for k, v in got.items()}


def _mean_confidence(run_dir: Path, eval_dataset: str, dataset: str, row: str, cache: dict) -> float | None:
    """Mean top-label probability of a result row, from its saved predictions (None if they are gone).

    Read next to ACC it says which way a miscalibration goes: above ACC over-confident, below under-confident.
    """
    saved = _saved(run_dir, dataset, eval_dataset, cache)
    if row not in saved:
        return None
    return float(saved[row][0].float().max(-1).values.mean())


def _chance(run_dir: Path, eval_dataset: str, dataset: str, row: str, cache: dict) -> float | None:
    """Accuracy of guessing uniformly among each question's options: the mean of 1/K over the examples, K the options
    a question has. A padded option's logit is −∞: K counts the finite logits of the first draw where logits were
    saved, else the non-zero probabilities (a real option's probability underflows to 0 only past a logit gap of
    ~100). None without predictions.
    """
    import torch

    saved = _saved(run_dir, dataset, eval_dataset, cache)
    if row not in saved:
        return None
    probs, logits = saved[row]
    present = torch.isfinite(logits[0]) if logits is not None else probs > 0
    options = present.sum(-1).clamp(min=1)
    return float((1.0 / options.double()).mean())


def write_csv(grid: Grid, rows: list[dict]) -> Path:
    """results.csv, replaced atomically through a private temporary file: runner processes that share an output
    folder (one per --methods pick) may rewrite it at the same moment."""
    import io

    grid.report_dir.mkdir(parents=True, exist_ok=True)
    path = grid.report_dir / "results.csv"
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    atomic_write_text(path, buf.getvalue())
    return path


def _column(row: dict, multi_train: bool) -> str:
    if row["eval_dataset"] == row["dataset"] or not multi_train:
        return row["eval_dataset"]
    return f"{row['dataset']}->{row['eval_dataset']}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict]) -> tuple[list[str], list[str], dict]:
    """(row names, columns, {(row, column): {metric: [values over seeds]}})."""
    multi = len({r["dataset"] for r in rows}) > 1
    names, cols, cells = [], [], {}
    for r in rows:
        col = _column(r, multi)
        if r["method"] not in names:
            names.append(r["method"])
        if col not in cols:
            cols.append(col)
        slot = cells.setdefault((r["method"], col), {k: [] for k in METRIC_NAMES + ("confidence", "train_seconds",
                                                                                   "eval_seconds", "train_cpu_seconds",
                                                                                   "eval_cpu_seconds") + UNCERTAINTY_NAMES
                                                      + tuple(AUROC_COLUMNS.values())})
        for k in slot:
            if r.get(k) is not None:
                slot[k].append(float(r[k]))
    return names, cols, cells


def markdown_table(rows: list[dict], metric: str, *, scale: float = 1.0, digits: int = 2) -> str:
    """Mean ± sample std over seeds per (row, column).

    A cell with fewer seeds than the table's fullest cell says how many it has, so that a half-done grid's
    2-seed mean is not read as a 3-seed one; a single seed has no std and shows none.
    """
    names, cols, cells = summarize(rows)
    full = max((len(c.get(metric) or []) for c in cells.values()), default=0)
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name in names:
        out = []
        for col in cols:
            values = cells.get((name, col), {}).get(metric) or []
            if not values:
                out.append("–")
                continue
            mean, std = _mean_std([v * scale for v in values])
            if len(values) == 1:
                out.append(f"{mean:.{digits}f} (1 seed)")
            else:
                out.append(f"{mean:.{digits}f} ± {std:.{digits}f}"
                           + (f" ({len(values)} seeds)" if len(values) < full else ""))
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """ACC % / ECE % / NLL seed means per (row, column) in one table, as a results page quotes them.

    A cell with fewer seeds than the table's fullest cell says how many (by its accuracy values)::

        | method | arc_easy |
        |---|---|
        | mle | 44.4 / 28.9 / 2.011 |
    """
    names, cols, cells = summarize(rows)
    full = max((len(c["accuracy"]) for c in cells.values()), default=0)
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name in names:
        out = []
        for col in cols:
            c = cells.get((name, col))
            if not c or not c["accuracy"]:
                out.append("–")
                continue
            acc, ece, nll = (statistics.fmean(c[k]) for k in ("accuracy", "ece", "nll"))
            n = len(c["accuracy"])
            out.append(f"{100 * acc:.1f} / {100 * ece:.1f} / {nll:.3f}"
                       + (f" ({n} seed{'s' if n > 1 else ''})" if n < full else ""))
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def results_markdown(grid: Grid, rows: list[dict], skipped_ood: list[str] = ()) -> str:
    seeds = sorted({r["seed"] for r in rows})
    cfg0 = run_config(grid.base, {}, method="blob", dataset=grid.datasets[0], seed=0, where=f"{grid.source} base")
    bins = sorted({int(float(r["ece_bins"])) for r in rows if r.get("ece_bins") not in (None, "")}) or \
        [cfg0.predict.ece_bins]
    lines = [f"# {grid.name}", "",
             f"Grid `{grid.source}`: backbone `{cfg0.model}`, {cfg0.fit.max_steps} steps × batch {cfg0.fit.batch_size}, "
             f"seeds {seeds}, {cfg0.predict.num_samples} samples for the stochastic methods; mean ± sample std "
             f"over seeds (a cell with fewer seeds than the others says how many). ACC and ECE in % (×100, as "
             f"the paper), NLL and Brier as is; ECE bins: {', '.join(map(str, bins))}.", ""]
    lines += ["## Summary: ACC % / ECE % / NLL", "", "Seed means of the three tables below.", "",
              summary_table(rows), ""]
    for title, metric, scale, digits in (("ACC (%) ↑", "accuracy", 100, 2), ("ECE (%) ↓", "ece", 100, 2),
                                         ("NLL ↓", "nll", 1, 3), ("Brier ↓", "brier", 1, 3)):
        lines += [f"## {title}", "", markdown_table(rows, metric, scale=scale, digits=digits), ""]
    lines += uncertainty_markdown(rows)
    lines += ["## Mean confidence (%)", "", "Mean top-label probability: above ACC means over-confident, below "
              "under-confident.", "", markdown_table(rows, "confidence", scale=100, digits=2), ""]
    first_rows = {e.name: next(iter(e.predict)) for e in grid.entries}
    trained = [r for r in rows if r["method"] == first_rows.get(r["entry"]) and r["eval_dataset"] == r["dataset"]]
    lines += ["## Time (seconds per cell, mean ± std over seeds)", "",
              "Train: the fit loop of the run (ensembles: all members; one row per trained entry; a post-hoc step "
              "on another entry's run: that step only); eval: that row's predictions on the evaluated split. "
              "Wall seconds depend on what else ran on the machine; CPU seconds (the process, all its threads) "
              "much less, and are the cost to compare (cells finished before they were recorded show –).", "",
              "### train, CPU", "", markdown_table(trained, "train_cpu_seconds", digits=0), "",
              "### eval, CPU", "", markdown_table(rows, "eval_cpu_seconds", digits=0), "",
              "### train, wall", "", markdown_table(trained, "train_seconds", digits=0), "",
              "### eval, wall", "", markdown_table(rows, "eval_seconds", digits=0), ""]
    lines += targets_markdown(rows)
    total = _total_seconds(rows)
    cpu = _total_seconds(rows, "cpu")
    lines += [f"Total compute of the finished cells (setup + train + eval, summed): {total:.0f} s wall "
              f"({total / 3600:.2f} h); train + eval CPU time of the cells that recorded it: {cpu:.0f} s "
              f"({cpu / 3600:.2f} CPU-hours).", ""]
    for msg in skipped_ood:
        lines.append(f"- {msg}")
    return "\n".join(lines).rstrip() + "\n"


def uncertainty_markdown(rows: list[dict]) -> list[str]:
    """The uncertainty tables (docs/metrics.md): the entropy split, selective prediction, and on an OOD grid the
    AUROC of telling each shifted dataset from the dev split. A table no row has a value for is left out (results
    of cells predicted before these metrics were reported)."""
    def has(metric, subset):
        return any(r.get(metric) not in (None, "") for r in subset)

    lines = []
    tables = (("Predictive entropy (nats)", "entropy", 1, 3), ("Expected entropy (nats, aleatoric)", "expected_entropy",
                                                                1, 3),
              ("Mutual information (nats, epistemic; 0 for point estimates)", "mutual_information", 1, 4),
              ("AURC (%) ↓", "aurc", 100, 2), ("Accuracy at 80 % coverage (%) ↑", "accuracy_at_80", 100, 2))
    for title, metric, scale, digits in tables:
        if has(metric, rows):
            lines += [f"## {title}", "", markdown_table(rows, metric, scale=scale, digits=digits), ""]
    shifted = [r for r in rows if r["eval_dataset"] != r["dataset"]]
    aurocs = [(score, col) for score, col in AUROC_COLUMNS.items() if has(col, shifted)]
    if aurocs:
        lines += ["## OOD detection AUROC (%) ↑", "",
                  "Telling each shifted dataset's examples (positives) from the dev split's, by a score where higher "
                  "means shifted: 1 − max p̄, the predictive entropy, the mutual information. 50 is chance.", ""]
        for score, col in aurocs:
            lines += [f"### {score}", "", markdown_table(shifted, col, scale=100, digits=2), ""]
    return lines


LEARNED_MARGIN = 0.05  # MLE's accuracy above chance from which the targets apply (issue 29's protocol)


def targets_markdown(rows: list[dict]) -> list[str]:
    """The issue's targets per in-distribution dataset, from the seed means of ``mle``, ``blob``, ``blob_mean``.

    BLoB (N=10) ECE at most half of MLE's; BLoB accuracy at most 1 point below MLE's; BLoB NLL below MLE's;
    ECE ordering MLE > BLoB N=0 > BLoB N=10; beside them MLE's over-confidence (mean confidence − accuracy). The
    means are over the seeds that all three rows have, and a note names the seeds left out when a half-done grid
    has more for some row. A second table gives, per target, Welch's one-sided p over those seeds that it holds
    (:func:`benchmarks.seed_tests.one_sided_p`; "–" with fewer than two seeds). The targets apply where MLE beats
    chance (the mean of 1/K over the questions, from the saved predictions) by at least
    :data:`LEARNED_MARGIN`: on a task the backbone does not learn, calibrating a constant predictor says nothing,
    so that dataset's marks and p-values read "n/a" and a note says how far from chance MLE is. Empty when the
    three rows share no seed.
    """
    from benchmarks.seed_tests import one_sided_p

    need = ("mle", "blob", "blob_mean")
    multi = len({r["dataset"] for r in rows}) > 1
    by: dict = {}  # column -> method -> seed -> row
    for r in rows:
        if r["eval_dataset"] == r["dataset"] and r["method"] in need:
            by.setdefault(_column(r, multi), {}).setdefault(r["method"], {})[str(r["seed"])] = r
    table, notes = [], []
    for col, methods in by.items():
        seeds = set.intersection(*(set(methods.get(m, {})) for m in need))
        if not seeds:
            continue
        table.append((col, methods, sorted(seeds, key=seed_key)))
        extra = set().union(*(set(methods.get(m, {})) for m in need)) - seeds
        if extra:
            notes.append(f"- {col}: seeds {', '.join(sorted(seeds, key=seed_key))} (those all three rows have); "
                         f"left out: {', '.join(sorted(extra, key=seed_key))}.")
    if not table:
        return []

    def fmt_p(p):
        return "–" if p != p else f"{p:.3f}"

    lines = ["## Targets (seed means)", "",
             "| dataset | ECE blob / mle | ≤ ½? | ACC blob − mle (pt) | ≥ −1? | NLL blob − mle | < 0? | "
             "ECE mle > blob_mean > blob? | mle confidence − accuracy (pt) | mle − chance (pt) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    p_lines = ["Welch's one-sided p over the seeds that each target holds (small: the seeds support it; with three "
               "seeds a side, p < 0.05 needs t beyond about 2.1):", "",
               "| dataset | seeds | ECE blob < ½ mle | ACC blob > mle − 1 pt | NLL blob < mle | ECE mle > blob_mean | "
               "ECE blob_mean > blob |", "|---|---|---|---|---|---|---|"]
    for col, methods, seeds in table:
        def values(method, metric, methods=methods, seeds=seeds):
            return [float(methods[method][s][metric]) for s in seeds]

        def mean(method, metric):
            return statistics.fmean(values(method, metric))

        e_mle, e_n0, e_b = (mean(m, "ece") for m in ("mle", "blob_mean", "blob"))
        ratio = e_b / e_mle if e_mle > 0 else float("inf")
        dacc = 100 * (mean("blob", "accuracy") - mean("mle", "accuracy"))
        dnll = mean("blob", "nll") - mean("mle", "nll")
        conf = [methods["mle"][s].get("confidence") for s in seeds]
        over = (f"{100 * (statistics.fmean(float(c) for c in conf) - mean('mle', 'accuracy')):+.1f}"
                if all(c not in (None, "") for c in conf) else "–")
        chance = [methods["mle"][s].get("chance") for s in seeds]
        above = (mean("mle", "accuracy") - statistics.fmean(float(c) for c in chance)
                 if all(c not in (None, "") for c in chance) else None)
        applies = above is None or above >= LEARNED_MARGIN - 1e-12
        if not applies:
            notes.append(f"- {col}: MLE is {100 * above:+.1f} points from chance, less than "
                         f"{100 * LEARNED_MARGIN:.0f}: a task this backbone does not learn, so the targets do not apply.")

        def mark(ok, applies=applies):
            return ("yes" if ok else "**no**") if applies else "n/a"

        lines.append(f"| {col} | {100 * e_b:.2f} / {100 * e_mle:.2f} = {ratio:.2f} | {mark(ratio <= 0.5)} | "
                     f"{dacc:+.2f} | {mark(dacc >= -1 - 1e-9)} | {dnll:+.4f} | {mark(dnll < 0)} | "
                     f"{100 * e_mle:.2f} > {100 * e_n0:.2f} > {100 * e_b:.2f}: {mark(e_mle > e_n0 > e_b)} | {over} | "
                     f"{'–' if above is None else f'{100 * above:+.1f}'} |")
        if not applies:
            p_lines.append(f"| {col} | {len(seeds)} | " + " | ".join(["n/a"] * 5) + " |")
            continue
        ps = [one_sided_p(values("blob", "ece"), [e / 2 for e in values("mle", "ece")], "less"),
              one_sided_p(values("blob", "accuracy"), [a - 0.01 for a in values("mle", "accuracy")], "greater"),
              one_sided_p(values("blob", "nll"), values("mle", "nll"), "less"),
              one_sided_p(values("mle", "ece"), values("blob_mean", "ece"), "greater"),
              one_sided_p(values("blob_mean", "ece"), values("blob", "ece"), "greater")]
        p_lines.append(f"| {col} | {len(seeds)} | " + " | ".join(fmt_p(p) for p in ps) + " |")
    return lines + ([""] + notes if notes else []) + [""] + p_lines + [""]


def seed_key(seed: str):
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def _total_seconds(rows: list[dict], kind: str = "") -> float:
    """Setup + train + eval seconds summed over the finished cells (``kind="cpu"``: train + eval CPU seconds of
    the cells that recorded them)."""
    train, evaluate = ("train_cpu_seconds", "eval_cpu_seconds") if kind == "cpu" else ("train_seconds", "eval_seconds")
    seen, total = set(), 0.0
    for r in rows:
        key = r["run_dir"]
        if key not in seen:
            seen.add(key)
            total += float(r.get(train) or 0) + (0.0 if kind == "cpu" else float(r.get("setup_seconds") or 0))
        if r["entry"] == r["method"] or r["trained_as"] != "ensemble":
            total += float(r.get(evaluate) or 0)
    return total


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace("->", "_to_"))


def write_plots(grid: Grid, rows: list[dict]) -> list[Path]:
    """A reliability diagram per (dataset, result row), seeds pooled, and a metric bar chart per dataset."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import torch

    from blob_pyro.plots import reliability_diagram, risk_coverage_plot, save_figure

    multi = len({r["dataset"] for r in rows}) > 1
    pooled: dict = {}
    cache: dict = {}
    for r in rows:
        run_dir = Path(r["run_dir"])
        path = predictions_path(run_dir, r["dataset"], r["eval_dataset"])
        if path not in cache:
            cache[path] = load_predictions(path) if path.is_file() else None
        if cache[path] is None or r["method"] not in cache[path][1]:
            continue
        labels, preds = cache[path]
        col = _column(r, multi)
        where = col if r["eval_dataset"] == r["dataset"] else f"{r['eval_dataset']}, trained on {r['dataset']}"
        slot = pooled.setdefault((col, r["method"]), ([], [], where))
        slot[0].append(preds[r["method"]][0])
        slot[1].append(labels)
    out = []
    plots = grid.report_dir / "plots"
    overlays: dict = {}
    for (col, method), (probs, labels, where) in pooled.items():
        seeds = len(probs)
        title = f"{method} on {where} ({seeds} seed{'s' if seeds > 1 else ''} pooled)"
        ax = reliability_diagram(torch.cat(probs), torch.cat(labels), label=method)
        ax.set_title(title, fontsize="medium")
        out.append(save_figure(ax, plots / f"reliability_{_safe(col)}__{_safe(method)}.png"))
        ax = risk_coverage_plot(torch.cat(probs), torch.cat(labels), label=method)
        ax.set_title(title, fontsize="medium")
        out.append(save_figure(ax, plots / f"risk_coverage_{_safe(col)}__{_safe(method)}.png"))
        if col not in overlays:
            overlays[col] = risk_coverage_plot(torch.cat(probs), torch.cat(labels), label=method)
            overlays[col].set_title(f"{where}: risk–coverage, seeds pooled", fontsize="medium")
        else:
            risk_coverage_plot(torch.cat(probs), torch.cat(labels), ax=overlays[col], label=method)
    out += [save_figure(ax, plots / f"risk_coverage_{_safe(col)}.png") for col, ax in overlays.items()]
    return out + write_side_by_side(pooled, plots) + write_metric_charts(grid, rows)


# The comparison the protocol is about, drawn in one figure per dataset column: plain LoRA, BLoB's posterior mean
# (N = 0) and BLoB's predictive (N = 10)
SIDE_BY_SIDE = {"mle": "MLE (plain LoRA)", "blob_mean": "BLoB, posterior mean (N = 0)", "blob": "BLoB (N = 10)"}


def write_side_by_side(pooled: dict, plots: Path) -> list[Path]:
    """``reliability_<column>.png``: the reliability diagrams of the :data:`SIDE_BY_SIDE` rows next to each other,
    seeds pooled, for every column that has MLE and at least one BLoB row. ``pooled`` maps (column, row) to
    (probs list, labels list, where)."""
    import matplotlib.pyplot as plt
    import torch

    from blob_pyro.plots import reliability_diagram, save_figure

    out = []
    for col in dict.fromkeys(c for c, _ in pooled):
        shown = [m for m in SIDE_BY_SIDE if (col, m) in pooled]
        if "mle" not in shown or len(shown) < 2:
            continue
        fig, axes = plt.subplots(1, len(shown), figsize=(5.0 * len(shown), 5.2))
        for ax, method in zip(axes, shown):
            probs, labels, where = pooled[(col, method)]
            reliability_diagram(torch.cat(probs), torch.cat(labels), ax=ax, label=method)
            ax.set_title(f"{SIDE_BY_SIDE[method]}, {len(probs)} seed{'s' if len(probs) > 1 else ''} pooled",
                         fontsize="medium")
        fig.suptitle(where)
        out.append(save_figure(fig, plots / f"reliability_{_safe(col)}.png"))
    return out


def write_metric_charts(grid: Grid, rows: list[dict]) -> list[Path]:
    """An ACC / ECE / NLL bar chart per dataset column, from the rows' values (no predictions needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from blob_pyro.plots import plot_metric_comparison, save_figure

    names, cols, cells = summarize(rows)
    out = []
    for col in cols:
        results = {n: {k: cells[(n, col)][k] for k in ("accuracy", "ece", "nll")} for n in names if (n, col) in cells}
        fig = plot_metric_comparison(results, percent=True)
        fig.suptitle(col)
        out.append(save_figure(fig, grid.report_dir / "plots" / f"metrics_{_safe(col)}.png"))
    return out


def report(grid: Grid, *, ood: list[str] | None = None, skipped: list[str] = (), plots: bool = True) -> list[dict]:
    """Write results.csv, results.md and the plots from the finished cells; returns the rows."""
    if ood is None:
        ood, skipped = available_ood(grid) if grid.ood_datasets else ([], [])
    rows = collect_rows(grid, ood)
    write_csv(grid, rows)
    if not rows:
        return rows
    atomic_write_text(grid.report_dir / "results.md", results_markdown(grid, rows, skipped))
    if plots:
        write_plots(grid, rows)
    return rows


