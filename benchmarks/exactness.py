"""Does a change to the training step leave a fixed-seed run's numbers exactly as they were? Train, then diff.

Trains the same short runs with two checkouts of blob_pyro (``--src``, default this one, and ``--ref``) and
compares every ``metrics.json`` value and every ``train_log.jsonl`` field except the wall-clock ``seconds``,
to the last digit. The runs are small (MiniLM, ARC-Easy, 30 steps x batch 4, 64 training and 48 evaluation
examples, 4 posterior samples, seed 1) and cover ``--method mle``, ``--method blob`` and ``--preset paper``::

    BLOB_DATA_DIR=/work/shared/data python benchmarks/exactness.py --ref /path/to/old/checkout --out /tmp/exact
    python benchmarks/exactness.py --compare-only --out /tmp/exact       # diff runs already there

Each checkout trains in its own process with that checkout first on ``PYTHONPATH``; run folders go to
``OUT/<src|ref>/<case>``, existing ones are reused (``--retrain src`` trains this checkout's again). Exit status 0 when
every case is identical, 1 when one differs (the first differences are printed), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--model", "minilm", "--dataset", "arc_easy", "--max-steps", "30", "--batch-size", "4",
          "--train-limit", "64", "--eval-limit", "48", "--num-samples", "4", "--seed", "1", "--quiet"]
CASES = {"mle": ["--method", "mle"], "blob": ["--method", "blob"], "paper": ["--preset", "paper"]}
VOLATILE = {"seconds"}  # wall clock: differs between any two runs


def train(src: Path, case: str, out: Path, extra: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1")  # write nothing into a checkout
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "blob_pyro.cli", "train", *COMMON, *CASES[case], *extra, "--output-dir", str(out),
           "--overwrite"]
    proc = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"exactness.py: training {case} with {src} failed:\n{proc.stderr[-3000:]}")


def _records(run: Path) -> tuple[dict, list[dict]]:
    metrics = json.loads((run / "metrics.json").read_text())
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return metrics, [{k: v for k, v in rec.items() if k not in VOLATILE} for rec in log]


def differences(new: Path, old: Path) -> list[str]:
    """Every field of metrics.json and train_log.jsonl (bar the wall clock) that is not bit-identical."""
    (m_new, log_new), (m_old, log_old) = _records(new), _records(old)
    out = [f"metrics.json {k}: {m_new.get(k)!r} != {m_old.get(k)!r}" for k in sorted(set(m_new) | set(m_old))
           if m_new.get(k) != m_old.get(k)]
    if len(log_new) != len(log_old):
        out.append(f"train_log.jsonl: {len(log_new)} lines != {len(log_old)}")
    for i, (a, b) in enumerate(zip(log_new, log_old), 1):
        out += [f"train_log.jsonl line {i} {k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=REPO, help="the checkout under test (default: this one)")
    p.add_argument("--ref", type=Path, help="the reference checkout (needed unless --compare-only)")
    p.add_argument("--out", type=Path, required=True, help="folder for the run folders (outside both checkouts)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--retrain", choices=("src", "ref", "both"), help="train that side again even where its run folders "
                                                                     "exist (e.g. src after a change)")
    p.add_argument("--compare-only", action="store_true", help="train nothing, diff the run folders in --out")
    p.add_argument("--set", dest="extra", action="append", default=[], help="one more train flag (repeatable)")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown or (args.ref is None and not args.compare_only):
        print(f"exactness.py: error: {'unknown case ' + ', '.join(unknown) if unknown else '--ref is required'}",
              file=sys.stderr)
        return 2
    failed = False
    for case in cases:
        runs = {side: args.out / side / case for side in ("src", "ref")}
        if not args.compare_only:
            for side, src in (("src", args.src), ("ref", args.ref)):
                if args.retrain in (side, "both") or not (runs[side] / "metrics.json").is_file():
                    train(src.resolve(), case, runs[side], args.extra)
        diffs = differences(runs["src"], runs["ref"])
        print(f"{case}: {'identical' if not diffs else f'{len(diffs)} differences'}")
        for line in diffs[:10]:
            print(f"  {line}")
        failed |= bool(diffs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
