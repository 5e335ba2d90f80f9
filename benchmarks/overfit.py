"""Training curves on training data only: when does a method over-fit, and how over-confident does it get?

Trains one run (any method, any setting) on the first ``--train-limit`` examples of a training split, with the
last ``--holdout`` examples of that split set aside (``RunConfig.holdout``; the dev split is never read), and
every ``--every`` steps predicts the training subset itself and the held-out examples. One JSON line per
check: step, epochs seen, and for both parts accuracy, ECE, NLL and mean confidence. A budget where the
training NLL is far below the held-out NLL and the held-out mean confidence exceeds its accuracy is the
over-fitting regime the BLoB paper works in.

    python -m benchmarks.overfit --dataset arc_easy --train-limit 400 --holdout 300 --max-steps 800 \\
        --every 100 --set method=mle lr=1e-3 batch_size=8 max_length=128 --out bench_out/overfit/mle.jsonl

The predictions inside the loop run under saved-and-restored RNG state and in eval mode, so the run trains
exactly as it would without them. ``--table`` prints the last record of each given file as one markdown table:

    python -m benchmarks.overfit --table bench_out/overfit/arce_*.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path


def _summary(out, bins: int) -> dict:
    from blob_pyro.metrics import compute_metrics

    m = compute_metrics(out.probs, out.labels, n_bins=bins)
    conf = out.probs.max(-1).values.mean().item()
    return {"accuracy": m["accuracy"], "ece": m["ece"], "nll": m["nll"], "confidence": conf}


def table(paths: list[str]) -> str:
    """Markdown: one row per curve file (its final record): held-out metrics at N = 0 and at the final N."""
    head = ("| run | step | epochs | train NLL | held-out NLL | held-out acc % | ECE % | conf − acc (pt) | "
            "N=10 NLL | N=10 acc % | N=10 ECE % | N=10 conf − acc (pt) | posterior std |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for path in paths:
        recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        if not recs:
            continue
        r = recs[-1]
        nk = next((m.group(1) for m in map(re.compile(r"(holdout_n\d+)_nll$").match, r) if m), None)

        def pct(key, rec=r):
            return f"{100 * rec[key]:.1f}" if key in rec else "-"

        def gap(prefix, rec=r):
            if prefix + "_accuracy" not in rec:
                return "-"
            return f"{100 * (rec[prefix + '_confidence'] - rec[prefix + '_accuracy']):+.1f}"

        cells = [Path(path).stem, str(r["step"]), f"{r['epochs']:.1f}", f"{r['train_nll']:.3f}", f"{r['holdout_nll']:.3f}",
                 pct("holdout_accuracy"), pct("holdout_ece"), gap("holdout"),
                 f"{r[nk + '_nll']:.3f}" if nk else "-", pct(f"{nk}_accuracy") if nk else "-",
                 pct(f"{nk}_ece") if nk else "-", gap(nk) if nk else "-",
                 f"{r['posterior_std']:.4f}" if "posterior_std" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--table":
        print(table(argv[1:]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-limit", type=int, required=True)
    p.add_argument("--holdout", type=int, required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=0, help="posterior draws per check (0: posterior mean)")
    p.add_argument("--final-samples", type=int, default=10,
                   help="at the last step also predict the held-out examples with this many draws (0: skip)")
    p.add_argument("--train-eval-limit", type=int, default=None, help="predict only the first N training examples")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="any RunConfig setting")
    p.add_argument("--out", required=True, help="JSON-lines file to write (replaced)")
    args = p.parse_args(argv)

    from blob_pyro.logs import quiet_library_logs

    quiet_library_logs()
    import pyro
    import torch

    from benchmarks.runner.cli import parse_set
    from blob_pyro import RunConfig, build, fit
    from blob_pyro.errors import BlobPyroError
    from blob_pyro.predictive import predict

    try:
        settings = {"model": "minilm", **parse_set(args.set), "dataset": args.dataset,
                    "train_limit": args.train_limit, "holdout": args.holdout, "max_steps": args.max_steps,
                    "seed": args.seed, **({"data_dir": args.data_dir} if args.data_dir else {})}
        run = build(RunConfig.from_dict(settings))
    except BlobPyroError as err:
        print(f"overfit: error: {err}", file=sys.stderr)
        return 2
    cfg = run.config
    train_part = list(run.train.examples)[: args.train_eval_limit]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    recent: list[dict] = []
    start = time.perf_counter()

    def check(step: int) -> None:
        cpu, cuda = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        was = run.model.network.training
        kw = dict(num_samples=args.num_samples, batch_size=cfg.predict.eval_batch_size,
                  autocast_dtype=cfg.runtime.autocast_dtype(), progress=False)
        with pyro.poutine.block():
            tr = _summary(predict(run.model, run.guide, train_part, **kw), cfg.predict.ece_bins)
            ho = _summary(predict(run.model, run.guide, run.eval, **kw), cfg.predict.ece_bins)
            final = {}
            if step == cfg.fit.max_steps and args.final_samples and args.final_samples != args.num_samples:
                kw["num_samples"] = args.final_samples
                final = _summary(predict(run.model, run.guide, run.eval, **kw), cfg.predict.ece_bins)
        run.model.network.train(was)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        rec = {"step": step, "epochs": step * cfg.fit.batch_size / len(run.train),
               "train_nll_running": sum(r["nll"] for r in recent) / max(len(recent), 1),
               "kl_weight": recent[-1]["kl_weight"] if recent else 0.0,
               "seconds": time.perf_counter() - start,
               **{f"train_{k}": v for k, v in tr.items()}, **{f"holdout_{k}": v for k, v in ho.items()},
               **{f"holdout_n{args.final_samples}_{k}": v for k, v in final.items()}}
        if hasattr(run.guide, "site_distribution") and step == cfg.fit.max_steps:
            with torch.no_grad():  # how far the posterior widened: its mean std and mean |mean| over every entry
                d = [run.guide.site_distribution(site.name) for site in run.model.sites]
                n = sum(x.mean.numel() for x in d)
                rec["posterior_std"] = float(sum(x.stddev.double().sum() for x in d) / n)
                rec["posterior_abs_mean"] = float(sum(x.mean.double().abs().sum() for x in d) / n)
        recent.clear()
        lines.append(json.dumps(rec))
        out_path.write_text("\n".join(lines) + "\n")
        line = (f"step {step:5d} ep {rec['epochs']:5.1f}  train nll {tr['nll']:.3f} acc {tr['accuracy']:.3f}  "
                f"holdout nll {ho['nll']:.3f} acc {ho['accuracy']:.3f} ece {ho['ece']:.3f} conf {ho['confidence']:.3f}")
        if final:
            line += (f"  | N={args.final_samples}: nll {final['nll']:.3f} acc {final['accuracy']:.3f} "
                     f"ece {final['ece']:.3f} conf {final['confidence']:.3f}")
        print(line, flush=True)

    def callback(record: dict, _state: dict) -> None:
        recent.append(record)
        if record["step"] % args.every == 0 or record["step"] == cfg.fit.max_steps:
            check(record["step"])

    check(0)
    fit(run.model, run.guide, run.train, cfg.fit, autocast_dtype=cfg.runtime.autocast_dtype(), progress=False,
        callback=callback)
    return 0


if __name__ == "__main__":
    sys.exit(main())
