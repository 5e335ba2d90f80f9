"""``python -m benchmarks.runner``: the environment is set before torch loads (its OpenMP threads read it once)."""

import os

# idle OpenMP threads sleep instead of spinning: runner processes share the cores (one per --methods pick)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402

from benchmarks.runner.cli import main  # noqa: E402

sys.exit(main())
