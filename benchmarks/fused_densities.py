"""What computing the Normal latent densities and the logged KL in one pass saves per training step.

Builds one MiniLM configuration of ``perf.py`` at B = 1, T = 16 (``blob``, or ``blob_compiled`` with the network
compiled), then alternates steps with the one-pass functions and with them switched off (Pyro's per-site
computation, the same numbers), in one process, and prints both medians and the median per-round saving::

    python benchmarks/fused_densities.py --setup blob --rounds 400
    python benchmarks/fused_densities.py --setup blob_compiled --rounds 400
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf  # noqa: E402

import blob_pyro.infer as infer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", choices=("blob", "blob_compiled"), default="blob")
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = perf.build_setup(args.setup, model="minilm", seq_len=16, device="cpu")
    batch = perf.synthetic_batch(1, 16, "cpu")
    fused = {"fill_normal_densities": infer.fill_normal_densities, "normal_site_kls": infer.normal_site_kls}
    off = {"fill_normal_densities": lambda model_trace, guide_trace, kernel=None: 0,
           "normal_site_kls": lambda m, g: {}}
    for _ in range(5):  # the first step is validated (Pyro's path); a compiled network compiles on the second
        setup.step(batch)
    times = {"one pass": [], "per site": []}
    for r in range(args.rounds):
        for name in ("one pass", "per site") if r % 2 else ("per site", "one pass"):
            for attr, fn in (fused if name == "one pass" else off).items():
                setattr(infer, attr, fn)
            t0 = time.process_time()
            setup.step(batch)
            times[name].append(time.process_time() - t0)
    saving = statistics.median(a - b for a, b in zip(times["per site"], times["one pass"]))
    print(f"{args.setup}, B=1 T=16, {args.rounds} rounds, process CPU ms: per site "
          f"{1000 * statistics.median(times['per site']):.2f}, one pass {1000 * statistics.median(times['one pass']):.2f}, "
          f"median per-round saving {1000 * saving:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
