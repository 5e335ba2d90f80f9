"""Several methods on one task: one table, one figure. What ``blob-pyro compare`` runs.

::

    from blob_pyro import RunConfig
    from blob_pyro.compare import compare

    cfg = RunConfig.from_file("configs/recipes/quickstart.json", {"data_dir": "../shared/data"})
    result = compare(cfg, ["mle", "blob"], "runs/quickstart")
    print(result.table())             # accuracy, ECE, NLL, Brier, mean confidence, confidence - accuracy
    result.rows["mle"]["ece"]         # each method's metrics.json

An entry is a method name (``mle``, ``blob``, ...) or a method with settings of its own, written
``METHOD,key=value,...`` (``blob,preset=paper``, ``blob,bayesian_factor=A``): every entry shares the base
settings (data, budget, batch, seed), so a row differs from another only by what its entry changes. Each entry
is an ordinary run folder under ``out_dir`` (``mle/``, ``blob/``, ``blob_preset_paper/``); the comparison adds
``compare.json`` (the settings and every row's metrics), ``compare.md`` (the table) and ``reliability.png`` (one
reliability diagram per entry, side by side). Running the same comparison again reuses finished entries and
resumes an interrupted one; a folder that holds another comparison is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig
from .errors import ConfigError, RunError
from .io import atomic_write_text

__all__ = ["Comparison", "compare", "parse_entry", "COMPARE_FILE"]

COMPARE_FILE = "compare.json"
COLUMNS = (("accuracy", "accuracy %", 100), ("ece", "ECE %", 100), ("nll", "NLL", 1), ("brier", "Brier", 1),
           ("confidence", "confidence %", 100))


def parse_entry(text: str) -> tuple[str, dict]:
    """``"blob,preset=paper"`` -> ``("blob,preset=paper", {"method": "blob", "preset": "paper"})``.

    Values are read as JSON where they parse (numbers, true/false), else as strings.
    """
    parts = [p.strip() for p in str(text).split(",")]
    if not parts[0] or "=" in parts[0]:
        raise ConfigError(f"compare entry {text!r} must start with a method name (e.g. mle, blob, blob,preset=paper)")
    settings = {"method": parts[0]}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"compare entry {text!r}: {part!r} is not key=value")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value.strip()
    return str(text).strip(), settings


def _folder_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


@dataclass
class Comparison:
    """The rows of a comparison: ``rows[label]`` is that entry's metrics.json; ``dirs[label]`` its run folder."""

    out_dir: Path
    rows: dict[str, dict] = field(default_factory=dict)
    dirs: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        """A plain-text table, one line per entry (accuracy, ECE and confidence in %; NLL and Brier as numbers);
        the last column is mean confidence minus accuracy (> 0: over-confident)."""
        any_row = next(iter(self.rows.values()), {})
        head = [f"{any_row.get('dataset', '?')} / {any_row.get('split', '?')}  (N={any_row.get('num_examples', '?')}, "
                f"ECE bins={any_row.get('ece_bins', '?')})"]
        width = max([len("method")] + [len(k) for k in self.rows])
        cols = [name for _, name, _ in COLUMNS] + ["conf - acc", "samples"]
        header = f"{'method':<{width}}" + "".join(f"{c:>14}" for c in cols)
        lines = head + [header, "-" * len(header)]
        for label, m in self.rows.items():
            cells = _cells(m)
            cells[-2] += " pt"
            lines.append(f"{label:<{width}}" + "".join(f"{c:>14}" for c in cells))
        return "\n".join(lines)

    def markdown(self) -> str:
        cols = [name for _, name, _ in COLUMNS] + ["conf − acc (pt)", "samples"]
        lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for label, m in self.rows.items():
            lines.append(f"| {label} | " + " | ".join(_cells(m)) + " |")
        return "\n".join(lines) + "\n"


def _cells(m: dict) -> list[str]:
    """One entry's cells: the COLUMNS, confidence minus accuracy in points, and the number of draws."""
    gap = m.get("confidence", float("nan")) - m["accuracy"]
    return [_cell(m.get(key), scale) for key, _, scale in COLUMNS] + [f"{100 * gap:+.2f}", str(m.get("num_samples", "?"))]


def _cell(value, scale) -> str:
    if value is None:
        return "-"
    return f"{scale * value:.2f}" if scale != 1 else f"{value:.4f}"


def compare(cfg: RunConfig, entries, out_dir, *, progress: bool = True, overwrite: bool = False,
            figure: bool = True) -> Comparison:
    """Train (or reuse) one run per entry on ``cfg``'s task and compare them; see the module docstring.

    Every entry's settings are checked before anything is trained or written (a conflicting entry, e.g.
    ``mle,guide=lowrank``, is refused with one line).
    """
    from .training import read_run_config, resume_run, train_run

    entries = list(entries)
    if not entries:
        raise ConfigError("compare needs at least one method")
    parsed = [parse_entry(e) for e in entries]
    labels = [label for label, _ in parsed]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"compare: an entry is given twice: {labels}")
    folders = [_folder_name(label) for label in labels]
    if len(set(folders)) != len(folders):
        raise ConfigError(f"compare: two entries map to the same folder name: {folders}")
    base = cfg.flat_dict()
    configs = [cfg.replace(**settings).resolve() for _, settings in parsed]
    record = {"entries": labels, "base": base}

    out = Path(out_dir)
    marker = out / COMPARE_FILE
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        previous = _read_record(marker) if marker.is_file() else None
        if previous is None:
            if not overwrite or not marker.is_file():
                raise RunError(f"output folder {out} exists and is not a comparison folder (no {COMPARE_FILE}); "
                               f"choose another --output-dir")
        same = previous is not None and previous.get("entries") == labels and previous.get("base") == base
        if not same:
            if not overwrite:
                raise RunError(f"{out} holds another comparison (other methods or settings); pass --overwrite to "
                               f"replace it or choose another --output-dir")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        atomic_write_text(marker, json.dumps(record, indent=2) + "\n")

    result = Comparison(out)
    for label, folder, mcfg in zip(labels, folders, configs):
        d = out / folder
        if (d / "metrics.json").is_file():
            if read_run_config(d).to_dict() != mcfg.to_dict():
                raise RunError(f"{d} holds a run with other settings than entry {label!r}; pass --overwrite")
        elif (d / "config.json").is_file():
            resume_run(d, progress=progress)
        else:
            if d.exists():  # an entry folder without config.json: stopped before it started
                shutil.rmtree(d)
            train_run(mcfg, d, progress=progress)
        result.rows[label] = json.loads((d / "metrics.json").read_text())
        result.dirs[label] = d

    record["rows"] = result.rows
    atomic_write_text(marker, json.dumps(record, indent=2) + "\n")
    atomic_write_text(out / "compare.md", result.markdown())
    if figure:
        reliability_figure(result, out / "reliability.png")
    return result


def _read_record(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def reliability_figure(result: Comparison, path) -> Path:
    """One reliability diagram per entry, side by side, from each run's predictions.safetensors.

    Drawn on a figure outside pyplot, so calling it from a notebook leaves the notebook's backend alone."""
    from matplotlib.figure import Figure
    from safetensors.torch import load_file

    from .plots import reliability_diagram, save_figure
    from .training import PREDICTIONS

    n = len(result.rows)
    fig = Figure(figsize=(4.8 * n, 4.8))
    axes = fig.subplots(1, n, squeeze=False)
    for ax, (label, m) in zip(axes[0], result.rows.items()):
        saved = load_file(str(result.dirs[label] / PREDICTIONS))
        reliability_diagram(saved["probs"], saved["labels"], n_bins=int(m.get("ece_bins", 15)), ax=ax)
        gap = 100 * (m["confidence"] - m["accuracy"]) if "confidence" in m else float("nan")
        ax.set_title(f"{label}\naccuracy {100 * m['accuracy']:.1f}%, confidence − accuracy {gap:+.1f} pt", fontsize=10)
    any_row = next(iter(result.rows.values()))
    fig.suptitle(f"{any_row.get('dataset')} / {any_row.get('split')} (N={any_row.get('num_examples')})")
    return save_figure(fig, path)
