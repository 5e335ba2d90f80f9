#!/usr/bin/env python
"""Run (or resume) a benchmark grid: the same as ``python -m blob_pyro.bench run CONFIG ...``.

::

    python scripts/reproduce.py configs/bench_cpu.json --data-dir ../shared/data     # the CPU protocol (main table)
    python scripts/reproduce.py configs/ood_cpu.json --data-dir ../shared/data       # train on OBQA, evaluate OOD
    python scripts/reproduce.py configs/bench_cpu.json --methods mle blob --datasets winogrande_s --seeds 1

Every flag of ``python -m blob_pyro.bench run`` works (``--out``, ``--set KEY=VALUE``, ``--keep-going``,
``--dry-run``, ``--quiet``). A second invocation skips the finished cells. Results go to
``<output_dir>/<grid name>/results.{csv,md}`` and ``plots/``.

Before torch loads, this sets ``OMP_WAIT_POLICY=PASSIVE`` (unless already set): on a CPU shared with
other processes, OpenMP threads that spin while waiting made MiniLM forwards about 10x slower here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout works without installing

from blob_pyro.bench import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0] in ("run", "report", "pilot"):
        sys.exit(main(argv))
    sys.exit(main(["run"] + argv))
