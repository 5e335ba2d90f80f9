"""The ``blob-pyro`` command line.

::

    blob-pyro train --model minilm --dataset winogrande_s --data-dir ../shared/data --output-dir runs/wg \
        --checkpoint-every 50
    blob-pyro train --resume runs/wg          # after a crash, kill or Ctrl-C: continue from the last checkpoint
    blob-pyro train --method laplace --from-run runs/map --output-dir runs/map_laplace   # post-hoc, no training
    blob-pyro evaluate --run runs/wg --dataset arc_easy --num-samples 10
    blob-pyro describe --model minilm --bayesian-factor B
    blob-pyro ppc --run runs/wg --num-samples 100 --out runs/wg/ppc     # = python scripts/ppc.py

Every ``train`` flag is a setting of :class:`~blob_pyro.config.RunConfig`; ``--config FILE`` (JSON or
YAML, flat or by section) sets defaults that flags override. A user's mistake
(:class:`~blob_pyro.errors.BlobPyroError`) prints one line on stderr and exits 2; Ctrl-C during training
saves a checkpoint and exits 130 (SIGTERM: 143).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path

from .config import RunConfig, read_config_file
from .errors import BlobPyroError, ConfigError
from .logs import quiet_library_logs

__all__ = ["main", "ppc_main", "describe_text", "metrics_table"]

PROG = "blob-pyro"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + message by default)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _add_config_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    for name, (_, f, kind) in RunConfig.fields().items():
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        help_ = f.metadata.get("help")
        # argparse %-formats help strings: a literal "%" in a config field's help must be escaped
        kw = {"dest": name, "default": argparse.SUPPRESS, "help": help_.replace("%", "%%") if help_ else help_}
        if base is bool:
            kw.update(type=_bool, metavar="BOOL")
        elif base is list or typing.get_origin(base) is list:
            kw.update(type=lambda s: [t.strip() for t in s.split(",") if t.strip()], metavar="A,B")
        else:
            kw.update(type=base)
            choices = f.metadata.get("choices")
            if choices is not None:
                kw["choices"] = tuple(c for c in choices if c is not None)
        parser.add_argument(flag, **kw)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="BLoB: Bayesian LoRA by backpropagation, as a Pyro program.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train and evaluate a run")
    t.add_argument("--config", help="JSON or YAML file of RunConfig settings (flags override it)")
    t.add_argument("--output-dir", help="run folder to create")
    t.add_argument("--resume", metavar="OUT",
                   help="continue the run in OUT from its last checkpoint (settings from OUT/config.json)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(t)

    c = sub.add_parser("compare", help="train several methods on one task; one table, one reliability figure")
    c.add_argument("--methods", nargs="+", default=["mle", "blob"], metavar="ENTRY",
                   help="methods to compare (default: mle blob); an entry may carry settings of its own: "
                        "blob,preset=paper or blob,bayesian_factor=A")
    c.add_argument("--config", help="JSON or YAML file of the shared settings (flags override it)")
    c.add_argument("--output-dir", required=True, help="folder of the comparison: one run folder per entry")
    c.add_argument("--overwrite", action="store_true", help="replace a folder that holds another comparison")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(c)

    e = sub.add_parser("evaluate", help="evaluate a run on a dataset")
    e.add_argument("--run", required=True, help="run folder written by train")
    e.add_argument("--dataset", help="dataset to evaluate on (default: the run's)")
    e.add_argument("--data-dir", help="local benchmark folder")
    e.add_argument("--num-samples", type=int, help="posterior draws (0 = posterior mean)")
    e.add_argument("--batch-size", type=int, help="evaluation batch size")
    e.add_argument("--ece-bins", type=int, help="equal-width confidence bins of the ECE (default: the run's, 15)")
    e.add_argument("--laplace-predictive", choices=("glm", "sample"),
                   help="method=laplace runs: predict with the linearised network (glm) or weight draws (sample) "
                        "instead of the run's own")
    e.add_argument("--ood-dataset", metavar="D",
                   help="also predict D's eval split and report the AUROC of telling it from --dataset's (OOD detection)")
    e.add_argument("--output", help="also write the metrics to this JSON file")
    e.add_argument("--trust-remote-code", type=_bool, default=False, metavar="BOOL",
                   help="allow custom model code (never taken from the run folder)")
    e.add_argument("--quiet", action="store_true")

    d = sub.add_parser("describe", help="print the probabilistic model: sites, priors, guide, parameter counts")
    d.add_argument("--config", help="JSON or YAML settings file")
    _add_config_flags(d, only=("model", "dataset", "head", "target_modules", "lora_r", "lora_alpha", "bayesian_factor",
                               "prior", "prior_scale", "prior_df", "guide", "guide_rank", "eps", "std_param", "method",
                               "preset", "trust_remote_code"))

    add_ppc_flags(sub.add_parser("ppc", help="posterior predictive checks of a run (= scripts/ppc.py)"))
    return p


def add_ppc_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``blob-pyro ppc`` (and of ``scripts/ppc.py``, which is the same command)."""
    p.add_argument("--run", required=True, help="run folder written by blob-pyro train")
    p.add_argument("--dataset", help="dataset whose eval split is checked (default: the run's)")
    p.add_argument("--data-dir", help="local benchmark folder (default: the run's / $BLOB_DATA_DIR)")
    p.add_argument("--num-samples", type=int, default=100, help="S posterior draws = replicated label vectors")
    p.add_argument("--limit", type=int, help="check only the first N examples")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws and replicates")
    p.add_argument("--ece-bins", type=int, help="equal-width confidence bins of the ECE (default: the run's, 15)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _settings_from(args: argparse.Namespace) -> dict:
    """The settings the user gave: those of --config (flattened), then the flags over them."""
    names = set(RunConfig.field_names())
    overrides = {k: v for k, v in vars(args).items() if k in names}
    settings = {}
    if getattr(args, "config", None):
        settings = RunConfig.flat_settings(read_config_file(args.config), source=f"key in {args.config}:")
        if settings.get("trust_remote_code") and not overrides.get("trust_remote_code"):
            raise ConfigError(f"{args.config} sets trust_remote_code; custom model code is only allowed with the "
                              f"flag --trust-remote-code true")
    settings.update(overrides)
    return settings


def _config_from(args: argparse.Namespace) -> RunConfig:
    return RunConfig.from_dict(_settings_from(args))


METRICS_TABLE_ROWS = ("accuracy", "ece", "nll", "brier", "confidence", "entropy", "expected_entropy",
                      "mutual_information", "aurc", "accuracy_at_80")


def metrics_table(metrics: dict) -> str:
    """The metrics as ``blob-pyro train`` and ``evaluate`` print them: a header with the split, N, the number of
    posterior samples and the ECE's bin count, then one line per metric (fractions; entropies in nats)."""
    head = f"{metrics.get('dataset', '?')} / {metrics.get('split', '?')}  (N={metrics.get('num_examples', '?')}, " \
           f"samples={metrics.get('num_samples', '?')}, ECE bins={metrics.get('ece_bins', '?')})"
    lines = [head, "-" * len(head)]
    lines += [f"{name:<20}{metrics[name]:>10.4f}" for name in METRICS_TABLE_ROWS if metrics.get(name) is not None]
    ood = metrics.get("ood")
    if ood:
        lines += ["", f"OOD detection: {ood.get('dataset', '?')} / {ood.get('split', '?')} "
                      f"(N={ood.get('num_examples', '?')}) vs the above, AUROC of"]
        lines += [f"{name:<20}{ood['auroc_' + name]:>10.4f}" for name in ("max_prob", "entropy", "mutual_information")
                  if ood.get("auroc_" + name) is not None]
    return "\n".join(lines)


def _cmd_train(args) -> int:
    from .training import resume_run, train_run

    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in vars(args)
                 if k in RunConfig.field_names() and k != "trust_remote_code"]
        given += [flag for flag, on in (("--output-dir", args.output_dir), ("--config", args.config),
                                        ("--overwrite", args.overwrite)) if on]
        if given:
            raise ConfigError(f"--resume continues with the settings in {args.resume}/config.json; "
                              f"drop {', '.join(given)}")
        metrics = resume_run(args.resume, progress=not args.quiet,
                             trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
        out = args.resume
    else:
        if not args.output_dir:
            raise ConfigError("train needs --output-dir (a new run) or --resume OUT (continue a run)")
        settings = _settings_from(args)
        if settings.get("from_run"):  # a post-hoc method on a finished run: what was trained comes from there
            from .training import from_run_config

            cfg = from_run_config(settings)
        else:
            cfg = RunConfig.from_dict(settings).resolve()
        metrics = train_run(cfg, args.output_dir, progress=not args.quiet, overwrite=args.overwrite)
        out = args.output_dir
    print(metrics_table(metrics))
    print(f"run written to {out}")
    return 0


def _cmd_compare(args) -> int:
    from .compare import compare

    if "method" in vars(args) or "preset" in vars(args):
        raise ConfigError("compare takes its methods from --methods (e.g. --methods mle blob,preset=paper); "
                          "drop --method/--preset")
    result = compare(_config_from(args), args.methods, args.output_dir, progress=not args.quiet,
                     overwrite=args.overwrite)
    print(result.table())
    print(f"runs, compare.md and reliability.png written to {args.output_dir}")
    return 0


def _cmd_evaluate(args) -> int:
    from .io import atomic_write_text
    from .training import evaluate, load_run

    if args.num_samples is not None and args.num_samples < 0:
        raise ConfigError(f"--num-samples must be >= 0; got {args.num_samples}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be > 0; got {args.batch_size}")
    if args.ece_bins is not None and args.ece_bins <= 0:
        raise ConfigError(f"--ece-bins must be > 0; got {args.ece_bins}")
    if args.laplace_predictive is not None:
        from .training import read_run_config

        method = read_run_config(args.run).method
        if method != "laplace":
            raise ConfigError(f"laplace_predictive is a setting of method=laplace; got method={method}")
    run = load_run(args.run, dataset=args.dataset or None, data_dir=args.data_dir,
                   trust_remote_code=args.trust_remote_code)
    if run.eval is None:
        from .training import eval_split_of

        run.eval = eval_split_of(run.config)
    if args.batch_size:
        run.config.predict.eval_batch_size = args.batch_size
    if args.ece_bins:
        run.config.predict.ece_bins = args.ece_bins
    if args.laplace_predictive:
        run.config.laplace_predictive = run.guide.predictive = args.laplace_predictive
    ood = None
    if args.ood_dataset:
        from .data import load_split

        ood = load_split(args.ood_dataset, "eval", args.data_dir or run.config.data_dir, limit=run.config.eval_limit)
    metrics = evaluate(run, num_samples=args.num_samples, progress=not args.quiet, ood_data=ood)
    print(metrics_table(metrics))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.output), json.dumps(metrics, indent=2) + "\n")
    return 0


def describe_text(cfg: RunConfig) -> str:
    """The model's sample sites, priors, guide and parameter counts, as ``blob-pyro describe`` prints them."""
    import torch

    from .training import build

    run = build(cfg, with_data=False)
    model, guide = run.model, run.guide
    with torch.no_grad():
        guide()  # Pyro's autoguides create their parameters at the first call
    guide_desc = guide.describe() if hasattr(guide, "describe") else type(guide).__name__
    lines = [f"model: {cfg.model}   head: {model.head.kind} (K={model.head.num_classes})   "
             f"bayesian factor: {model.bayesian_factor}   guide: {type(guide).__name__}", "",
             f"{'sample site':<60} {'shape':>12}  {'prior':<18} guide"]
    prior_desc = model.prior.describe() if hasattr(model.prior, "describe") else repr(model.prior)
    for site in model.sites:
        lines.append(f"{site.name:<60} {str(tuple(site.shape)):>12}  {prior_desc:<18} {guide_desc}")
    lines.append(f"{'obs':<60} {'(batch,)':>12}  Categorical(logits) over {model.head.num_classes} options, "
                 f"plate 'data' of size N")
    counts = model.parameter_counts(guide)
    lines += ["", "parameters:",
              f"  frozen (backbone)            {counts['frozen']:>12,}",
              f"  deterministic (trained)      {counts['deterministic']:>12,}",
              f"  variational (guide)          {counts['variational']:>12,}"]
    if model.head.kind in ("multiple_choice", "sequence_classification"):
        lines.append("  note: the classifier head is newly initialised and trained as a deterministic parameter")
    return "\n".join(lines)


def _cmd_describe(args) -> int:
    print(describe_text(_config_from(args)))
    return 0


def _cmd_ppc(args) -> int:
    from .ppc import format_table, run_ppc

    try:
        result = run_ppc(args.run, dataset=args.dataset, data_dir=args.data_dir, num_samples=args.num_samples,
                         out_dir=args.out, progress=not args.quiet, seed=args.seed, limit=args.limit,
                     n_bins=args.ece_bins)
    except ImportError as err:  # arviz / matplotlib are the workflow extra, not the core
        if (err.name or "").split(".")[0] not in ("arviz", "matplotlib", "xarray"):
            raise
        raise ConfigError(f"ppc needs the workflow extra ({err.name} is missing): "
                          f"pip install 'blob_pyro[workflow]'") from err
    print(format_table(result))
    print(f"ppc written to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    return _run(args, PROG)


def ppc_main(argv: list[str] | None = None, *, prog: str = "ppc.py") -> int:
    """``blob-pyro ppc`` as a command of its own (``scripts/ppc.py``): the same flags, errors and outputs."""
    p = _Parser(prog=prog, description="Posterior predictive checks of a BLoB run.")
    add_ppc_flags(p)
    args = p.parse_args(argv)
    args.command = "ppc"
    return _run(args, prog)


def _run(args: argparse.Namespace, prog: str) -> int:
    quiet_library_logs()
    handlers = {"train": _cmd_train, "compare": _cmd_compare, "evaluate": _cmd_evaluate, "describe": _cmd_describe,
                "ppc": _cmd_ppc}
    try:
        return handlers[args.command](args)
    except BlobPyroError as err:
        msg = " ".join(str(err).split()) or type(err).__name__
        sys.stderr.write(f"{prog}: error: {msg}\n")
        return 2
    except KeyboardInterrupt as err:  # TrainingInterrupted says where the checkpoint is
        sys.stderr.write(f"{prog}: {' '.join(str(err).split()) or 'interrupted'}\n")
        return getattr(err, "exit_code", 130)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
