"""How far the variational posterior of finished benchmark runs moved from its initialisation.

Reads each ``runs/<dataset>/<entry>/seed<k>`` folder of a grid's output (``python -m benchmarks.runner run``;
``bench_out/cpu`` by default)
for the entries given (default ``blob`` and ``bbb``) and prints, per run: the mean posterior std of the
Bayesian factors, its ratio to the prior scale, the mean |posterior mean| and the largest KL weight the
run's schedule reached, with the mean top-label probability gap between the N=10 and posterior-mean
predictions where both were saved. It explains a BLoB row that matches its posterior-mean row: a
posterior that stayed as narrow as it started cannot change predictions.

    python benchmarks/posterior_spread.py bench_out/cpu --entries blob bbb
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="bench_out/cpu", help="benchmark output folder (holds runs/)")
    p.add_argument("--entries", nargs="+", default=["blob", "bbb"])
    args = p.parse_args(argv)

    runs = sorted(d for e in args.entries for d in (Path(args.out) / "runs").glob(f"*/{e}/seed*")
                  if (d / "metrics.json").is_file())
    if not runs:
        print(f"posterior_spread.py: error: no finished runs of {args.entries} under {args.out}/runs", file=sys.stderr)
        return 2

    from blob_pyro.logs import quiet_library_logs

    quiet_library_logs()  # before PEFT is imported
    import pyro
    from safetensors.torch import load_file

    from blob_pyro.guides import guide_std
    from blob_pyro.training import load_run

    print("| run | mean std | std / prior scale | mean abs(mean) | max KL weight | mean abs(p_N10 − p_mean) |")
    print("|---|---|---|---|---|---|")
    for d in runs:
        pyro.clear_param_store()
        run = load_run(d)
        std = guide_std(run.guide)
        loc = {k: v for k, v in run.guide.median().items()}
        s = statistics.fmean(float(v.float().mean()) for v in std.values())
        m = statistics.fmean(float(v.float().abs().mean()) for v in loc.values())
        klw = max(json.loads(line).get("kl_weight", 0.0) for line in (d / "train_log.jsonl").read_text().splitlines())
        gap = "–"
        pred = d / "predictions.safetensors"
        entry = d.parent.name
        if pred.is_file():
            t = load_file(str(pred))
            if f"{entry}.probs" in t and f"{entry}_mean.probs" in t:
                gap = f"{float((t[f'{entry}.probs'] - t[f'{entry}_mean.probs']).abs().mean()):.2e}"
        rel = d.relative_to(Path(args.out) / "runs")
        print(f"| {rel} | {s:.2e} | {s / run.config.bayes.prior_scale:.3f} | {m:.2e} | {klw:.2e} | {gap} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
