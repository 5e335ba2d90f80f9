#!/usr/bin/env python
"""Posterior predictive checks of a BLoB run: the same command, flags and outputs as ``blob-pyro ppc``.

::

    python scripts/ppc.py --run runs/arc --num-samples 100 --out runs/arc/ppc

Writes ppc.json (every statistic: observed value, replicated quantiles, Bayesian p-value), idata.nc
(ArviZ InferenceData) and PNGs into --out and prints a short table; see :mod:`blob_pyro.ppc`. A wrong run
folder or dataset prints one line on stderr and exits 2.
"""

import sys

from blob_pyro.cli import ppc_main

if __name__ == "__main__":
    sys.exit(ppc_main(prog="ppc.py"))
