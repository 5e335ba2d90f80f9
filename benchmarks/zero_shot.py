"""The backbone before fine-tuning: a grid's base settings, LoRA at its initialisation (B = 0, so exactly the
pretrained network), one prediction pass of the eval split. The reference row of a grid whose point is what
fine-tuning does to calibration::

    python -m benchmarks.zero_shot configs/smollm2_cloze.json --dataset arc_easy --data-dir ../shared/data \\
        --out benchmarks/results/smollm2_cloze/zero_shot_arc_easy.json

Prints accuracy, ECE, NLL, Brier and mean confidence (the runner's row metrics) and writes them with the CPU and
wall seconds of the pass. Exit status 2 on a usage error (unknown dataset, a grid file that does not resolve).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="grid file (its base settings are used)")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-dir", default=None, help="benchmark data folder")
    parser.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from benchmarks.runner.cells import _row_metrics, predict_rows
    from benchmarks.runner.grid import load_grid, run_config
    from blob_pyro.errors import BlobPyroError
    from blob_pyro.io import atomic_write_text
    from blob_pyro.training import build

    torch.set_num_threads(args.threads)
    try:
        grid = load_grid(args.config, data_dir=args.data_dir)
        cfg = run_config(grid.base, {}, method="mle", dataset=args.dataset, seed=1, where=args.config)
        run = build(cfg)  # the mle guide starts at PEFT's initialisation: B = 0, the pretrained network
    except BlobPyroError as err:
        print(f"zero_shot.py: {err}", file=sys.stderr)
        return 2
    t0, c0 = time.perf_counter(), time.process_time()
    (pred, _), = predict_rows(run, run.eval, {"zero_shot": 0}, progress=not args.quiet).values()
    seconds = (time.perf_counter() - t0, time.process_time() - c0)
    m = _row_metrics(pred.probs, pred.labels, 0, seconds, run.eval, logits=pred.logits, bins=cfg.predict.ece_bins)
    m["model"], m["head"] = cfg.model, cfg.head  # _row_metrics' uncertainty metrics hold the mean confidence
    for key in ("accuracy", "ece", "nll", "brier", "confidence"):
        print(f"{key:<12} {m[key]:.4f}")
    print(f"{'cpu seconds':<12} {seconds[1]:.0f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(m, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
