"""How many logit draws does the GLM predictive of a Laplace run need? Monte Carlo error against S, on a saved run.

Computes the MAP logits f (N, K) and J Σ Jᵀ (N, K, K) of every evaluated example once, then the predictive's
metrics with S = 10, 100, 1 000 and 10 000 logit draws, the probit approximation and f alone (the MAP)::

    python benchmarks/laplace_glm_samples.py --run bench_out/main_cpu/runs/arc_easy/laplace/seed1 \\
        --data-dir ../shared/data --out benchmarks/results/laplace_glm/arc_easy_seed1.json

The run may have been fitted with either predictive (the fit is the same); its own ``num_samples`` is not read.
Exit status 2 on a usage error (not a laplace run, no such folder).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

SAMPLES = (10, 100, 1000, 10000)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a method=laplace run folder")
    parser.add_argument("--data-dir", default=None, help="benchmark data folder")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from blob_pyro import laplace_glm
    from blob_pyro.errors import BlobPyroError
    from blob_pyro.io import atomic_write_text
    from blob_pyro.metrics import compute_metrics
    from blob_pyro.optim import own_params
    from blob_pyro.training import load_run, read_run_config

    torch.set_num_threads(args.threads)
    try:
        if read_run_config(args.run).method != "laplace":
            raise BlobPyroError(f"{args.run} is not a method=laplace run")
        run = load_run(args.run, data_dir=args.data_dir)
    except BlobPyroError as err:
        print(f"laplace_glm_samples.py: {err}", file=sys.stderr)
        return 2
    run.guide.predictive = "glm"
    examples = list(run.eval.examples)
    device = next(run.model.network.parameters()).device
    means, covs, labels = [], [], []
    start = time.process_time()
    with own_params(), torch.no_grad():
        for i in range(0, len(examples), args.batch_size):
            batch = run.model.head.collate(examples[i:i + args.batch_size], device)
            f, cov = laplace_glm.logit_moments(run.model, run.guide, batch)
            means.append(f.double())
            covs.append(cov)
            labels.append(batch["labels"])
    f, cov, y = torch.cat(means), torch.cat(covs), torch.cat(labels)
    out = {"run": str(args.run), "num_examples": len(y), "jacobian_cpu_seconds": time.process_time() - start}
    present = torch.isfinite(f)
    gen = torch.Generator(device=f.device).manual_seed(args.seed)

    def scores(probs):
        return {k: float(v) for k, v in compute_metrics(probs.float(), y).items()}

    for s in SAMPLES:
        draws = laplace_glm.sample_logits(f, cov, s, generator=gen)
        out[f"S={s}"] = scores(torch.softmax(draws, -1).mean(0))
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    out["probit"] = scores(torch.softmax(torch.where(present, f / torch.sqrt(1 + math.pi / 8 * var), f), -1))
    out["map"] = scores(torch.softmax(f, -1))
    sd = var.sqrt()[present]
    out["logit_sd_median"], out["logit_sd_q90"] = float(sd.median()), float(sd.quantile(0.9))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    for key in [f"S={s}" for s in SAMPLES] + ["probit", "map"]:
        m = out[key]
        print(f"{key:>8}  acc {100 * m['accuracy']:5.1f} %  ECE {100 * m['ece']:5.1f} %  NLL {m['nll']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
