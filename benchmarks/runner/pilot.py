"""Pilot: time a few training steps and one pass over each dev split, and derive the step budget that fits.

::

    python -m benchmarks.runner pilot configs/bench_cpu.json --data-dir ../shared/data --budget-hours 3
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from functools import partial
from pathlib import Path

from blob_pyro.config import RunConfig

from .grid import Cell, Grid, run_config

__all__ = ["pilot"]


def _stochastic_pass(cfg: RunConfig, samples: int) -> bool:
    """Does a prediction pass run Flipout draws (costlier than a plain forward)?"""
    return samples > 0 and cfg.bayes.guide != "auto_delta" and cfg.bayes.flipout


def _time_build(cfg: RunConfig, timed, build) -> tuple:
    """(CPU seconds, run) of building ``cfg``'s model, guide and data."""
    built = []
    cpu, _ = timed(lambda: built.append(build(cfg)))
    return cpu, built[0]


def pilot(grid: Grid, *, steps: int = 4, examples: int | None = None, budget_hours: float = 3.0,
          efficiency: float | None = None, progress: bool = False) -> str:
    """Measure what the grid costs and the largest step budget S that fits ``budget_hours``.

    Per dataset, with the grid's base settings: ``steps`` training steps (after one warm-up step) of a
    deterministic (mle) and a stochastic (blob) run, and one prediction pass over the dev split (all of it,
    or ``examples`` evenly spaced examples scaled up) at N=0 (mle) and N=1 (blob, Flipout). Both wall and
    process CPU seconds are measured; the budget uses CPU seconds divided by (threads × efficiency), which
    does not depend on what else runs on a shared machine. ``efficiency`` (parallel efficiency of the torch
    threads) defaults to the highest CPU/wall ratio seen in the pilot divided by the thread count, i.e. it
    is only as optimistic as the pilot observed. Returns the tables and the arithmetic as markdown.
    """
    import torch

    from blob_pyro.data import load_split
    from blob_pyro.infer import fit
    from blob_pyro.predictive import predict
    from blob_pyro.training import build

    threads = torch.get_num_threads()
    seeds = len(grid.seeds)
    meas, ratios = {}, []

    def timed(fn):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        ratios.append(cpu / wall if wall > 0 else 0.0)
        return cpu, wall

    for d in grid.datasets:
        t = meas[d] = {}
        for kind, method, samples in (("det", "mle", 0), ("sto", "blob", 1)):
            cfg = run_config(grid.base, {}, method=method, dataset=d, seed=grid.seeds[0], where=f"pilot {method} | {d}")
            t["build_cpu"], run = _time_build(cfg, timed, build)
            stamps = []  # (cpu, wall) after every step: differences include collating the batch
            short = dataclasses.replace(run.config.fit, max_steps=steps + 1)
            timed(partial(fit, run.model, run.guide, run.train, short, autocast_dtype=run.config.runtime.autocast_dtype(),
                          progress=progress,
                          callback=lambda _r, _s, stamps=stamps: stamps.append((time.process_time(), time.perf_counter()))))
            t[f"step_cpu_{kind}"] = statistics.median(b[0] - a[0] for a, b in zip(stamps, stamps[1:]))
            t[f"step_wall_{kind}"] = statistics.median(b[1] - a[1] for a, b in zip(stamps, stamps[1:]))
            full = load_split(d, "eval", run.config.data_dir, limit=run.config.eval_limit)
            subset = list(full.examples)
            if examples and examples < len(subset):
                subset = subset[:: len(subset) // examples][:examples]
            cpu, wall = timed(partial(predict, run.model, run.guide, subset,
                                      **{**run.config.predict.kwargs(), "num_samples": samples},
                                      progress=progress, autocast_dtype=run.config.runtime.autocast_dtype()))
            scale = len(full) / len(subset)
            t[f"pass_cpu_{kind}"], t[f"pass_wall_{kind}"] = cpu * scale, wall * scale
            t["n"] = len(full)
    eff = efficiency if efficiency is not None else min(1.0, max(ratios) / threads)
    speed = threads * eff  # CPU seconds per wall second on dedicated cores

    # what one seed of the grid runs, per dataset: trainings and prediction passes of each kind
    counts = {"train_det": 0, "train_sto": 0, "pass_det": 0, "pass_sto": 0}
    for e in grid.entries:
        cell = Cell(e, grid.datasets[0], grid.seeds[0], Path("."))
        for cfg in cell.member_configs(grid.base):
            counts["train_sto" if cfg.bayes.guide != "auto_delta" else "train_det"] += 1
            for samples in cell.member_rows(cfg).values():
                counts["pass_sto" if _stochastic_pass(cfg, samples) else "pass_det"] += max(1, samples)
    trainings = counts["train_det"] + counts["train_sto"]
    eval_cpu = seeds * sum(counts["pass_det"] * t["pass_cpu_det"] + counts["pass_sto"] * t["pass_cpu_sto"]
                           for t in meas.values())
    build_cpu = seeds * trainings * sum(t["build_cpu"] for t in meas.values())
    step_cpu = seeds * sum(counts["train_det"] * t["step_cpu_det"] + counts["train_sto"] * t["step_cpu_sto"]
                           for t in meas.values())
    budget = budget_hours * 3600
    fixed = (eval_cpu + build_cpu) / speed
    s_max = int((budget - fixed) / (step_cpu / speed)) if budget > fixed else 0
    passes = f"{examples} evenly spaced dev examples (scaled to the split)" if examples else "the full dev split"
    lines = [f"Pilot of `{grid.source}`: torch threads {threads}, cpu_count {os.cpu_count()}, "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; {steps} timed steps after 1 warm-up; "
             f"one pass over {passes}.",
             "", "CPU seconds (wall seconds on this machine in brackets):", "",
             "| dataset | dev N | step det. | step stoch. | dev pass N=0 | dev pass Flipout N=1 | model load |",
             "|---|---|---|---|---|---|---|"]
    for d, t in meas.items():
        lines.append(f"| {d} | {t['n']} | {t['step_cpu_det']:.3f} ({t['step_wall_det']:.3f}) | "
                     f"{t['step_cpu_sto']:.3f} ({t['step_wall_sto']:.3f}) | {t['pass_cpu_det']:.1f} ({t['pass_wall_det']:.1f}) | "
                     f"{t['pass_cpu_sto']:.1f} ({t['pass_wall_sto']:.1f}) | {t['build_cpu']:.1f} |")
    lines += ["", f"One seed of the grid trains {counts['train_det']} deterministic and {counts['train_sto']} stochastic "
              f"runs and makes {counts['pass_det']} plain and {counts['pass_sto']} Flipout passes over each dev split "
              f"(N=0 counts as one pass).", "",
              f"- highest CPU/wall ratio seen: {max(ratios):.2f} ⇒ parallel efficiency {eff:.2f}, "
              f"{speed:.2f} CPU s per wall s on {threads} dedicated cores",
              f"- evaluation: {seeds} seeds × Σ_d ({counts['pass_det']}·pass_det + {counts['pass_sto']}·pass_sto) "
              f"= {eval_cpu:.0f} CPU s = {eval_cpu / speed:.0f} s wall",
              f"- model loads: {seeds} × {trainings} × Σ_d load = {build_cpu:.0f} CPU s = {build_cpu / speed:.0f} s wall",
              f"- training: S × {seeds} × Σ_d ({counts['train_det']}·step_det + {counts['train_sto']}·step_stoch) = "
              f"S × {step_cpu:.2f} CPU s = S × {step_cpu / speed:.2f} s wall",
              f"- budget {budget:.0f} s ⇒ S ≤ ({budget:.0f} − {fixed:.0f}) / {step_cpu / speed:.2f} = **{s_max}**"]
    return "\n".join(lines) + "\n"
