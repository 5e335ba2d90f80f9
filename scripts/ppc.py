#!/usr/bin/env python
"""Posterior predictive checks of a BLoB run (the same as ``blob-pyro ppc``).

::

    python scripts/ppc.py --run runs/wg --dataset winogrande_s --data-dir ../shared/data --num-samples 100 --out runs/wg/ppc

Writes ppc.json (every statistic: observed value, replicated quantiles, Bayesian p-value), idata.nc
(ArviZ InferenceData) and PNGs (reliability with predictive band, confidence histogram, label PPC,
test statistics) into --out, and prints a short table. A wrong run folder or dataset prints one line
on stderr and exits 2. See blob_pyro/ppc.py for what is computed.
"""

from __future__ import annotations

import argparse
import os
import sys

PROG = "ppc.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like blob-pyro
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def main(argv=None) -> int:
    p = _Parser(prog=PROG, description="Posterior predictive checks of a BLoB run.")
    p.add_argument("--run", required=True, help="run folder written by blob-pyro train")
    p.add_argument("--dataset", help="dataset whose eval split is checked (default: the run's)")
    p.add_argument("--data-dir", help="local benchmark folder (default: the run's / $BLOB_DATA_DIR)")
    p.add_argument("--num-samples", type=int, default=100, help="S posterior draws = replicated label vectors")
    p.add_argument("--limit", type=int, help="check only the first N examples")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws and replicates")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from blob_pyro.ppc import run_ppc

    try:
        return run_ppc(args.run, dataset=args.dataset, data_dir=args.data_dir, num_samples=args.num_samples,
                       out_dir=args.out, progress=not args.quiet, seed=args.seed, limit=args.limit, prog=PROG)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
