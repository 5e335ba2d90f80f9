"""Benchmarks of blob_pyro: the grid runner (``python -m benchmarks.runner``), perf.py and the result scripts."""
