"""The command line: ``python -m benchmarks.runner run|report|merge|pilot CONFIG [flags]``.

A user's mistake (a bad grid file or flag, data that cannot be read, a finished cell with other settings, a
cell whose settings the library refuses) prints one line on stderr and exits 2; a cell that fails for
another reason prints its traceback and that line and exits 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from blob_pyro.errors import BlobPyroError

from .grid import BenchError

__all__ = ["main", "parse_set"]

PROG = "python -m benchmarks.runner"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the usage too by default)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def parse_set(items: list[str] | None) -> dict:
    """``["max_steps=3", "bf16=false"]`` -> ``{"max_steps": 3, "bf16": False}`` (values read as JSON if they parse)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BenchError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _parser() -> argparse.ArgumentParser:
    from . import __doc__ as doc

    p = _Parser(prog=PROG, description=(doc or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, helptext in (("run", "run (or resume) a grid, then write results"),
                           ("report", "write results.csv / results.md / plots from the finished cells"),
                           ("pilot", "time a few steps and examples per dataset; print the step budget"),
                           ("merge", "add the rows of other results.csv files to the grid's results and re-render")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("config", help="grid file (JSON or YAML)")
        q.add_argument("--out", help="output folder (default: the grid's output_dir)")
        q.add_argument("--data-dir", help="benchmark data folder (default: base.data_dir, else $BLOB_DATA_DIR)")
        q.add_argument("--methods", nargs="+", help="only these entries (method or variant names)")
        q.add_argument("--datasets", nargs="+", help="only these datasets")
        q.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
        q.add_argument("--set", nargs="+", metavar="KEY=VALUE",
                       help="RunConfig settings for every cell (added to the grid's base)")
        q.add_argument("--quiet", action="store_true", help="no progress bars (one line per cell remains)")
        if name == "run":
            q.add_argument("--keep-going", action="store_true", help="run the other cells when one fails")
            q.add_argument("--dry-run", action="store_true", help="list the cells and whether they are done")
        if name == "merge":
            q.add_argument("--from", dest="sources", nargs="+", required=True, metavar="RESULTS_CSV",
                           help="results.csv files of other output folders (or machines) to add")
        if name == "pilot":
            q.add_argument("--steps", type=int, default=4, help="timed training steps per run (after 1 warm-up)")
            q.add_argument("--examples", type=int, default=None, help="time this many dev examples (default: all)")
            q.add_argument("--budget-hours", type=float, default=3.0)
            q.add_argument("--efficiency", type=float, default=None,
                           help="parallel efficiency of the threads (default: the best CPU/wall ratio seen / threads)")
    return p


def _command(args: argparse.Namespace) -> None:
    from .cells import available_ood
    from .files import is_complete, is_finished
    from .grid import cells_of, load_grid

    settings = parse_set(args.set)
    grid = load_grid(args.config, overrides=settings, data_dir=args.data_dir, output_dir=args.out,
                     methods=args.methods, datasets=args.datasets, seeds=args.seeds)
    if args.command == "pilot":
        from .pilot import pilot

        print(pilot(grid, steps=args.steps, examples=args.examples, budget_hours=args.budget_hours,
                    efficiency=args.efficiency, progress=not args.quiet))
    elif args.command == "report":
        from .report import report

        rows = report(grid)
        print(f"{len(rows)} rows -> {grid.report_dir}")
    elif args.command == "merge":
        from .merge import merge_results

        rows = merge_results(grid, args.sources)
        print(f"{len(rows)} rows -> {grid.report_dir}")
    elif args.dry_run:
        ood, _ = available_ood(grid) if grid.ood_datasets else ([], [])
        for i, cell in enumerate(cells_of(grid), 1):
            status = "done" if is_complete(cell, ood) else "trained, predictions to add" if is_finished(cell) else "to do"
            print(f"[{i}] {cell.label}: {status}  {cell.dir}")
    else:
        from .run import run_grid

        narrowed = args.methods or args.datasets or args.seeds
        whole = load_grid(args.config, overrides=settings, data_dir=args.data_dir,
                          output_dir=args.out) if narrowed else grid
        run_grid(grid, progress=not args.quiet, keep_going=args.keep_going, whole=whole)
        md = grid.report_dir / "results.md"
        print(md.read_text() if md.is_file() else "")


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    from blob_pyro.logs import quiet_library_logs

    quiet_library_logs()
    try:
        _command(args)
    except BlobPyroError as err:  # BenchError and the library's errors
        cause = err.__cause__
        bug = cause is not None and not isinstance(cause, BlobPyroError)
        if bug:  # a cell failed for a reason that is not the user's: show where
            traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
        print(f"{PROG}: error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 1 if bug else 2
    except KeyboardInterrupt:
        return 130
    return 0
