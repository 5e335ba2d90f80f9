"""Where one training step's time goes at B = 1, T = 16 (the fixed cost per step), phase by phase.

``perf.py --sections overhead`` gives each configuration's whole step; this splits the step of every
configuration into the same phases, measured inside the step by wrapping the functions that run them, so that the
difference between plain LoRA and BLoB can be read off phase by phase::

    python benchmarks/step_phases.py --rounds 100                      # eager: lora_torch, blob_torch, mle, blob
    python benchmarks/step_phases.py --rounds 100 --compiled           # and lora/mle/blob compiled, blob C++-wrapped
    python benchmarks/step_phases.py --quick                           # smoke run (2 configurations, 3 rounds)

Phases (process CPU time, median over rounds of each step's phase; ``total`` is the median step):

- ``network``: the forward pass of the network (``head.logits``; the compiled network's call, sign draw
  included); plain LoRA's forward has no wrapper of its own and is in ``rest``;
- ``pyro traces``: the guide's and model's traces without the network (param and sample statements through the
  handlers, the guide's draws, the model's likelihood);
- ``densities``: the latent sites' float64 log-densities in one pass (``fill_normal_densities``);
- ``logged kl``: the step's logged KL (``kl_terms``, no gradient);
- ``backward``, ``optimizer`` (AdamW's step), ``zero_grad``;
- ``rest``: everything else (the ELBO's sums, the host read of the logged numbers, the schedule, Python glue).

Writes ``<out>/step_phases.json`` (every round) and ``step_phases.md`` (the table).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf  # noqa: E402

import blob_pyro.infer as infer  # noqa: E402
from blob_pyro.compiled import CompiledNetwork  # noqa: E402

PHASES = ("network", "pyro traces", "densities", "logged kl", "backward", "optimizer", "zero_grad", "rest")
EAGER = ("lora_torch", "blob_torch", "mle", "blob")
COMPILED = ("lora_compiled", "mle_compiled", "blob_compiled", "blob_compiled_cpp")


class Clock:
    """Process CPU seconds spent inside wrapped functions, per label, since the last ``reset``. A call nested in
    another wrapped call is counted in both (``pyro traces`` subtracts the network from the traces)."""

    def __init__(self):
        self.spent = collections.Counter()
        self._undo = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[label] += time.process_time() - t0

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo = []

    def reset(self) -> None:
        self.spent.clear()


def instrument(clock: Clock) -> None:
    """Wrap the phases' functions; before any setup is built (a scheduler keeps the optimiser's step it finds)."""
    from pyro.poutine.trace_messenger import TraceHandler

    clock.wrap(torch.Tensor, "backward", "backward")
    clock.wrap(torch.optim.AdamW, "step", "optimizer")
    clock.wrap(torch.optim.Optimizer, "zero_grad", "zero_grad")
    clock.wrap(TraceHandler, "get_trace", "traces")
    clock.wrap(infer, "fill_normal_densities", "densities")
    clock.wrap(infer, "kl_terms", "logged kl")
    clock.wrap(CompiledNetwork, "__call__", "network")  # outside the graph: the call, not what it compiled


def instrument_heads(clock: Clock, setups: dict) -> None:
    """The eager network's forward: each eager model's ``head.logits``, on the instance (a compiled network calls
    the head inside its graph, which a Python clock there would break)."""
    seen = set()
    for s in setups.values():
        model = s.model
        if model is None or getattr(model, "compiled", None) is not None or id(model.head) in seen:
            continue
        seen.add(id(model.head))
        clock.wrap(model.head, "logits", "network")


def phases_of(spent: dict, total: float) -> dict[str, float]:
    """One step's phases (seconds) from what the wrappers measured during it."""
    network = spent.get("network", 0.0)
    out = {"network": network, "pyro traces": spent["traces"] - network if "traces" in spent else 0.0}
    for key in ("densities", "logged kl", "backward", "optimizer", "zero_grad"):
        out[key] = spent.get(key, 0.0)
    out["rest"] = total - sum(out.values())
    return out


def measure(kinds, *, rounds: int, warmup: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    clock = Clock()
    instrument(clock)
    try:
        setups = {k: perf.build_setup(k, model="minilm", seq_len=16, device="cpu") for k in kinds}
        instrument_heads(clock, setups)
        batch = perf.synthetic_batch(1, 16, "cpu")
        perf._warm_compiled(setups, batch)
        for _ in range(warmup):
            for s in setups.values():
                s.step(batch)
        steps = {k: [] for k in kinds}
        for r in range(rounds):
            for k in (kinds if r % 2 == 0 else tuple(reversed(kinds))):
                clock.reset()
                t0 = time.process_time()
                setups[k].step(batch)
                total = time.process_time() - t0
                steps[k].append({"total": total, **phases_of(dict(clock.spent), total)})
    finally:
        clock.restore()
    return steps


def medians(steps: dict) -> dict:
    return {k: {key: 1000 * statistics.median(s[key] for s in rows) for key in ("total",) + PHASES}
            for k, rows in steps.items()}


def markdown(table: dict, meta: dict) -> str:
    kinds = list(table)
    lines = [f"Median process CPU ms per step phase, B = 1, T = 16, MiniLM, {meta['rounds']} rounds, "
             f"{meta['threads']} thread(s); `{meta['command']}`", "",
             "| phase | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for key in ("total",) + PHASES:
        lines.append(f"| {key} | " + " | ".join(f"{table[k][key]:.2f}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compiled", action="store_true", help="add the compiled configurations (compiles first)")
    p.add_argument("--quick", action="store_true", help="smoke run: mle and blob, 3 rounds")
    p.add_argument("--out", type=Path, default=None, help="folder for step_phases.json/.md (default: print only)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        print(f"step_phases.py: --rounds must be >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}",
              file=sys.stderr)
        return 2
    kinds = ("mle", "blob") if args.quick else EAGER + (COMPILED if args.compiled else ())
    rounds, warmup = (3, 2) if args.quick else (args.rounds, args.warmup)
    steps = measure(kinds, rounds=rounds, warmup=warmup, threads=args.threads)
    table = medians(steps)
    meta = {"command": "python benchmarks/step_phases.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "rounds": rounds, "threads": args.threads, "machine": platform.processor() or platform.machine(),
            "library": perf.library_info()}
    text = markdown(table, meta)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step_phases.json").write_text(json.dumps({"meta": meta, "median_ms": table, "steps_s": steps},
                                                              indent=1) + "\n")
        (args.out / "step_phases.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
