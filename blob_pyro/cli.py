"""The ``blob-pyro`` command line.

::

    blob-pyro train --model minilm --dataset winogrande_s --data-dir ../shared/data --output-dir runs/wg \
        --checkpoint-every 50
    blob-pyro train --resume runs/wg          # after a crash, kill or Ctrl-C: continue from the last checkpoint
    blob-pyro evaluate --run runs/wg --dataset arc_easy --num-samples 10
    blob-pyro describe --model minilm --bayesian-factor B

Every ``train`` flag is a field of :class:`~blob_pyro.config.TrainConfig`; ``--config FILE`` (JSON or
YAML) sets defaults that flags override. A user's mistake prints one line on stderr and exits 2;
Ctrl-C during training saves a checkpoint and exits 130 (SIGTERM: 143).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
import warnings
from pathlib import Path

from .config import ConfigError, TrainConfig

__all__ = ["main"]

PROG = "blob-pyro"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + message by default)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _user_errors() -> tuple:
    from .backbone import ModelError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .heads import HeadError
    from .infer import TrainingError
    from .lora import TargetModuleError
    from .runs import RunError

    return (ConfigError, DataError, ModelError, TargetModuleError, RunError, HeadError, TrainingError, CheckpointError)




def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _add_config_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        help_ = f.metadata.get("help")
        # argparse %-formats help strings: a literal "%" in a config field's help must be escaped
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_.replace("%", "%%") if help_ else help_}
        if base is bool:
            kw.update(type=_bool, metavar="BOOL")
        elif base is list or typing.get_origin(base) is list:
            kw.update(type=lambda s: [t.strip() for t in s.split(",") if t.strip()], metavar="A,B")
        elif f.name == "preset":
            kw.update(type=str, choices=("paper",))
        else:
            kw.update(type=base)
            choices = f.metadata.get("choices")
            if choices is not None and None not in choices:
                kw["choices"] = choices
        parser.add_argument(flag, **kw)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="BLoB: Bayesian LoRA by backpropagation, as a Pyro program.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train and evaluate a run")
    t.add_argument("--config", help="JSON or YAML file of TrainConfig settings (flags override it)")
    t.add_argument("--output-dir", help="run folder to create")
    t.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its last checkpoint (settings from OUT/config.json)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(t)

    e = sub.add_parser("evaluate", help="evaluate a run on a dataset")
    e.add_argument("--run", required=True, help="run folder written by train")
    e.add_argument("--dataset", help="dataset to evaluate on (default: the run's)")
    e.add_argument("--data-dir", help="local benchmark folder")
    e.add_argument("--num-samples", type=int, help="posterior draws (0 = posterior mean)")
    e.add_argument("--batch-size", type=int, help="evaluation batch size")
    e.add_argument("--output", help="also write the metrics to this JSON file")
    e.add_argument("--trust-remote-code", type=_bool, default=False, metavar="BOOL",
                   help="allow custom model code (never taken from the run folder)")
    e.add_argument("--quiet", action="store_true")

    d = sub.add_parser("describe", help="print the probabilistic model: sites, priors, guide, parameter counts")
    d.add_argument("--config", help="JSON or YAML settings file")
    _add_config_flags(d, only=("model", "dataset", "head", "target_modules", "lora_r", "lora_alpha", "bayesian_factor",
                               "prior", "prior_scale", "prior_df", "guide", "guide_rank", "eps", "std_param", "method",
                               "preset", "trust_remote_code"))

    q = sub.add_parser("ppc", help="posterior predictive checks of a run (see scripts/ppc.py)")
    q.add_argument("--run", required=True)
    q.add_argument("--dataset")
    q.add_argument("--data-dir")
    q.add_argument("--num-samples", type=int, default=100)
    q.add_argument("--out", required=True)
    q.add_argument("--quiet", action="store_true")
    return p


def _config_from(args: argparse.Namespace) -> TrainConfig:
    names = set(TrainConfig.field_names())
    overrides = {k: v for k, v in vars(args).items() if k in names}
    if getattr(args, "config", None):
        cfg = TrainConfig.from_file(args.config, overrides)
        if cfg.trust_remote_code and not overrides.get("trust_remote_code"):
            raise ConfigError(f"{args.config} sets trust_remote_code; custom model code is only allowed with the "
                              f"flag --trust-remote-code true")
        return cfg
    return TrainConfig.from_dict(overrides)


def metrics_table(metrics: dict) -> str:
    rows = [("accuracy", "{:.4f}"), ("ece", "{:.4f}"), ("nll", "{:.4f}"), ("brier", "{:.4f}")]
    head = f"{metrics.get('dataset', '?')} / {metrics.get('split', '?')}  (N={metrics.get('num_examples', '?')}, " \
           f"samples={metrics.get('num_samples', '?')})"
    lines = [head, "-" * len(head)]
    lines += [f"{name:<10}{fmt.format(metrics[name]):>10}" for name, fmt in rows if name in metrics]
    return "\n".join(lines)


def _cmd_train(args) -> int:
    from .runs import resume_run, train_run

    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in vars(args)
                 if k in TrainConfig.field_names() and k != "trust_remote_code"]
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
        cfg = _config_from(args)
        cfg.effective().validate()
        metrics = train_run(cfg, args.output_dir, progress=not args.quiet, overwrite=args.overwrite)
        out = args.output_dir
    print(metrics_table(metrics))
    print(f"run written to {out}")
    return 0


def _cmd_evaluate(args) -> int:
    from .runs import atomic_write_text, evaluate, load_run

    if args.num_samples is not None and args.num_samples < 0:
        raise ConfigError(f"--num-samples must be >= 0; got {args.num_samples}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be > 0; got {args.batch_size}")
    run = load_run(args.run, dataset=args.dataset or None, data_dir=args.data_dir,
                   trust_remote_code=args.trust_remote_code)
    if run.eval is None:
        from .data import load_split

        run.eval = load_split(run.config.dataset, "eval", run.config.data_dir, limit=run.config.eval_limit)
    if args.batch_size:
        run.config.eval_batch_size = args.batch_size
    metrics = evaluate(run, num_samples=args.num_samples, progress=not args.quiet)
    print(metrics_table(metrics))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.output), json.dumps(metrics, indent=2) + "\n")
    return 0


def describe_text(cfg: TrainConfig) -> str:
    from .runs import build

    run = build(cfg, with_data=False)
    model, guide = run.model, run.guide
    with __import__("torch").no_grad():
        guide(model.example_batch())  # lazy guides set themselves up here
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
    if model.head.kind != "causal_lm":
        lines.append("  note: the classifier head is newly initialised and trained as a deterministic parameter")
    return "\n".join(lines)


def _cmd_describe(args) -> int:
    cfg = _config_from(args)
    cfg.effective().validate()
    print(describe_text(cfg))
    return 0


def _cmd_ppc(args) -> int:
    from .ppc import run_ppc

    return run_ppc(args.run, dataset=args.dataset, data_dir=args.data_dir, num_samples=args.num_samples,
                   out_dir=args.out, progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # stderr is for the user's errors, not weight loading bars
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter
    handlers = {"train": _cmd_train, "evaluate": _cmd_evaluate, "describe": _cmd_describe, "ppc": _cmd_ppc}
    try:
        return handlers[args.command](args)
    except _user_errors() as err:
        msg = " ".join(str(err).split())
        sys.stderr.write(f"{PROG}: error: {msg}\n")
        return 2
    except KeyboardInterrupt as err:  # TrainingInterrupted says where the checkpoint is
        sys.stderr.write(f"{PROG}: {' '.join(str(err).split()) or 'interrupted'}\n")
        return getattr(err, "exit_code", 130)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
