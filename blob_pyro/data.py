"""Benchmark loading for BLoB: the paper's zero-shot prompts, with its prompt bugs fixed.

Every dataset becomes a :class:`TaskSplit` of :class:`Example` records. Each record has a prompt for
letter/word scoring by a causal LM, (text_a, text_b) pairs for an encoder multiple-choice head, and a
0-based label. Data comes from a local folder laid out like ``shared/data`` (``data_dir`` argument or
``$BLOB_DATA_DIR``); with neither set, it comes from the Hugging Face hub. Every problem with the data
raises :class:`DataError`, whose message is one line naming the file (and line) at fault.

Example
-------
    from blob_pyro.data import load_split
    train = load_split("winogrande_s", "train", data_dir="../shared/data")  # winogrande/train_s.jsonl
    test = load_split("winogrande_s", "eval", data_dir="../shared/data")    # winogrande/dev.jsonl
    print(len(train), train.num_classes, train.option_words)                 # 640 2 ('A', 'B')
    print(test.examples[0].prompt, test.labels[:5])

Differences from the official code (Wang-ML-Lab/bayesian-peft, ``dataset/utils/dsets.py``):

- ARC/OBQA choices are printed as ``"A) text"``, not ``"text) A"``, and the header reads ``"Choices:"``
  everywhere (OBQA had ``"Chioces:"``).
- BoolQ class k is scored by ``option_words[k]`` with ``option_words = ("False", "True")``, so gold
  "true" (class 1) goes with the word "True". The official code maps it to the "False" token.
- ARC keeps every question (3, 4 or 5 options), scored over K = 5 letters A-E, so split sizes are the
  official ones (shared/data/README.md says the official code keeps 4-choice questions only).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError as _DataError

__all__ = [
    "DATASET_NAMES",
    "DataError",
    "Example",
    "MMLU_SUBJECTS",
    "TaskSplit",
    "boolq_prompt",
    "dataset_info",
    "batches",
    "load_eval",
    "load_split",
    "load_splits",
    "local_split_path",
    "mc_prompt",
    "resolve_data_dir",
]


class DataError(_DataError):
    """A problem with the user's data.

    ``str(err)`` is one line that names the file (and the 1-based line number where relevant) and says
    what is wrong. Line breaks in the message are replaced by spaces.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


MMLU_SUBJECTS: tuple[str, ...] = (
    "college_chemistry",
    "college_physics",
    "high_school_chemistry",
    "high_school_physics",
)
"""MMLU subjects listed in :data:`DATASET_NAMES`; any other ``mmlu_<subject>`` is accepted too."""

DATASET_NAMES: tuple[str, ...] = (
    "winogrande_s",
    "winogrande_m",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "boolq",
) + tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS)
"""Known dataset names. Any ``mmlu_<subject>`` (a ``cais/mmlu`` config name) is also valid."""

_MMLU_NAME = re.compile(r"mmlu_([a-z][a-z0-9_]*)")

LETTERS = "ABCDE"
MC_INSTRUCTION = "Return the label of the correct answer for the question below."
BOOLQ_INSTRUCTION = "Read the passage below and answer the question with the words 'true' or 'false'."
BOOLQ_PASSAGE_CHARS = 1024
"""BoolQ passages are cut to this many characters, as in the official code."""


@dataclass(frozen=True)
class Example:
    """One labelled question.

    Attributes
    ----------
    index : int
        Position in its split, 0..n-1.
    prompt : str
        Zero-shot prompt for letter/word scoring (causal LM or sequence-classification head).
    choices : tuple of str
        The option texts actually present (``len(choices) <= num_classes``).
    mc_texts : tuple of (str, str or None)
        For each choice, the (text_a, text_b) pair for an encoder multiple-choice head.
    label : int
        0-based gold class.
    """

    index: int
    prompt: str
    choices: tuple[str, ...]
    mc_texts: tuple[tuple[str, str | None], ...]
    label: int


@dataclass(frozen=True)
class TaskSplit:
    """One split of one dataset.

    Attributes
    ----------
    dataset : str
        Dataset name, e.g. ``"winogrande_s"``.
    split : str
        The split actually read: a local file stem (``"train_s"``, ``"dev"``, ``"val"``, ``"test"``)
        or a hub split name (``"validation"``).
    examples : tuple of Example
    num_classes : int
        Number of scored classes K: WinoGrande 2, ARC 5, OBQA 4, BoolQ 2, MMLU 4.
    option_words : tuple of str
        The K words a causal LM scores; class k is scored by ``option_words[k]``.
    source : str
        Path of the local file, or the hub id the data came from.
    """

    dataset: str
    split: str
    examples: tuple[Example, ...]
    num_classes: int
    option_words: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def labels(self) -> list[int]:
        """list of int: the gold class of every example, in order."""
        return [ex.label for ex in self.examples]


# --------------------------------------------------------------------------------------------------
# Dataset table
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """How to find and parse one dataset. ``splits`` maps an accepted split name to (file stem, hub split)."""

    kind: str  # "winogrande" | "arc" | "openbookqa" | "boolq" | "mmlu"
    folder: str
    num_classes: int
    option_words: tuple[str, ...]
    hub_id: str
    hub_config: str | None
    splits: dict[str, tuple[str, str]]


_EVAL = ("dev", "validation")
_EVAL_ALIASES = {"eval": _EVAL, "dev": _EVAL, "validation": _EVAL, "val": _EVAL}
_TRAIN_EVAL_TEST = {"train": ("train", "train"), **_EVAL_ALIASES, "test": ("test", "test")}


def _winogrande_spec(size: str) -> _Spec:
    train = (f"train_{size}", "train")
    return _Spec("winogrande", "winogrande", 2, ("A", "B"), "allenai/winogrande", f"winogrande_{size}",
                 {"train": train, f"train_{size}": train, **_EVAL_ALIASES})


def _arc_spec(folder: str, config: str) -> _Spec:
    return _Spec("arc", folder, 5, tuple(LETTERS), "allenai/ai2_arc", config, _TRAIN_EVAL_TEST)


_SPECS: dict[str, _Spec] = {
    "winogrande_s": _winogrande_spec("s"),
    "winogrande_m": _winogrande_spec("m"),
    "arc_easy": _arc_spec("arc_easy", "ARC-Easy"),
    "arc_challenge": _arc_spec("arc_challenge", "ARC-Challenge"),
    "openbookqa": _Spec("openbookqa", "openbookqa", 4, tuple(LETTERS[:4]), "allenai/openbookqa", "main",
                        _TRAIN_EVAL_TEST),
    "boolq": _Spec("boolq", "boolq", 2, ("False", "True"), "google/boolq", None,
                   {"train": ("train", "train"), **_EVAL_ALIASES}),
}

# MMLU: "train" is the validation split, "eval" the test split; "dev" is the 5-shot split.
_MMLU_SPLITS = {
    "train": ("val", "validation"),
    "val": ("val", "validation"),
    "validation": ("val", "validation"),
    "eval": ("test", "test"),
    "test": ("test", "test"),
    "dev": ("dev", "dev"),
}


def _spec_for(dataset: str) -> _Spec:
    if dataset in _SPECS:
        return _SPECS[dataset]
    m = _MMLU_NAME.fullmatch(dataset) if isinstance(dataset, str) else None
    if m:
        return _Spec("mmlu", "mmlu", 4, tuple(LETTERS[:4]), "cais/mmlu", m.group(1), _MMLU_SPLITS)
    raise DataError(f"unknown dataset {dataset!r}; valid names: {', '.join(_SPECS)}, "
                    f"or mmlu_<subject> (e.g. {', '.join('mmlu_' + s for s in MMLU_SUBJECTS)})")


def _split_for(dataset: str, spec: _Spec, split: str) -> tuple[str, str]:
    if split in spec.splits:
        return spec.splits[split]
    literal = [s for s in spec.splits if s not in ("train", "eval")]
    raise DataError(f"unknown split {split!r} for {dataset}; use the role 'train' or 'eval', "
                    f"or a split name: {', '.join(literal)}")


# --------------------------------------------------------------------------------------------------
# Field access and prompts
# --------------------------------------------------------------------------------------------------


def _field(record: Any, key: str, where: str, parent: str = "") -> Any:
    """``record[key]``, or a DataError naming the field (as ``parent.key`` when nested)."""
    name = parent + key
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object holding field {name!r}, got {type(record).__name__}")
    if key not in record:
        raise DataError(f"{where}: record has no field {name!r}")
    return record[key]


def _text(record: Any, key: str, where: str, parent: str = "") -> str:
    value = _field(record, key, where, parent)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {parent + key!r} must be a string, got {type(value).__name__}")
    return value


def mc_prompt(question: str, choices: tuple[str, ...]) -> str:
    """Build the multiple-choice prompt, letters first.

    Parameters
    ----------
    question : str
    choices : tuple of str
        Option texts, shown as ``A) ...``, ``B) ...`` in order.

    Returns
    -------
    str
        ``"Return the label ...\\n\\nQuestion: q\\nChoices:\\nA) x\\nB) y\\nAnswer:"``.
    """
    lines = [MC_INSTRUCTION, "", f"Question: {question}", "Choices:"]
    lines += [f"{LETTERS[i]}) {text}" for i, text in enumerate(choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def boolq_prompt(passage: str, question: str) -> str:
    """Build the BoolQ prompt; the passage is cut to :data:`BOOLQ_PASSAGE_CHARS` characters."""
    return (f"{BOOLQ_INSTRUCTION}\n\nPassage: {passage[:BOOLQ_PASSAGE_CHARS]}\n"
            f"Question: {question}\nAnswer (true or false):")


def _choice_index(label: Any) -> int | None:
    """Map a choice label "A".."Z" or "1".."9" to a 0-based index; None if it is neither."""
    label = str(label).strip()
    if len(label) == 1 and "A" <= label <= "Z":
        return ord(label) - ord("A")
    if label.isdigit() and int(label) >= 1:
        return int(label) - 1
    return None


# --------------------------------------------------------------------------------------------------
# One record -> Example. Records use the local file formats (hub rows are converted first).
# --------------------------------------------------------------------------------------------------


def _winogrande_example(rec: dict, where: str, index: int, spec: _Spec) -> Example:
    sentence = _text(rec, "sentence", where)
    options = (_text(rec, "option1", where), _text(rec, "option2", where))
    answer = str(_field(rec, "answer", where)).strip()
    if answer not in ("1", "2"):
        raise DataError(f"{where}: answer {answer!r} is out of range (expected '1' or '2')")
    if "_" not in sentence:
        raise DataError(f"{where}: sentence has no '_' blank to fill")
    mc_texts = tuple((sentence.replace("_", option, 1), None) for option in options)
    return Example(index, mc_prompt(sentence, options), options, mc_texts, int(answer) - 1)


def _multiple_choice_example(rec: dict, where: str, index: int, spec: _Spec) -> Example:
    """ARC / OpenBookQA: question{stem, choices[{text, label}]}, answerKey."""
    question = _field(rec, "question", where)
    stem = _text(question, "stem", where, "question.")
    raw_choices = _field(question, "choices", where, "question.")
    if not isinstance(raw_choices, list) or len(raw_choices) < 2:
        raise DataError(f"{where}: question.choices must be a list of at least 2 choices")
    if len(raw_choices) > spec.num_classes:
        raise DataError(f"{where}: {len(raw_choices)} choices, more than the {spec.num_classes} "
                        f"this dataset scores")
    labels = [str(_field(c, "label", where, f"question.choices[{i}].")) for i, c in enumerate(raw_choices)]
    if [_choice_index(lab) for lab in labels] != list(range(len(labels))):
        raise DataError(f"{where}: choice labels {', '.join(labels)} are not A, B, C... "
                        f"(or 1, 2, 3...) in order")
    choices = tuple(_text(c, "text", where, f"question.choices[{i}].") for i, c in enumerate(raw_choices))
    key = str(_field(rec, "answerKey", where)).strip()
    label = _choice_index(key)
    if label is None or label >= len(choices):
        raise DataError(f"{where}: answerKey {key!r} is out of range (choices are {', '.join(labels)})")
    return Example(index, mc_prompt(stem, choices), choices, tuple((stem, c) for c in choices), label)


def _boolq_example(rec: dict, where: str, index: int, spec: _Spec) -> Example:
    question = _text(rec, "question", where)
    passage = _text(rec, "passage", where)
    answer = _field(rec, "answer", where)
    if not isinstance(answer, bool):
        raise DataError(f"{where}: answer {answer!r} is out of range (expected JSON true or false)")
    context = passage[:BOOLQ_PASSAGE_CHARS] + " " + question
    choices = ("false", "true")
    return Example(index, boolq_prompt(passage, question), choices,
                   tuple((context, c) for c in choices), int(answer))


def _mmlu_example(rec: dict, where: str, index: int, spec: _Spec) -> Example:
    """MMLU record {question, choices[4], answer letter} (built from a CSV row or a hub row)."""
    question = _text(rec, "question", where)
    choices = tuple(rec["choices"])
    answer = str(rec["answer"]).strip()
    if answer not in LETTERS[:4]:
        raise DataError(f"{where}: answer {answer!r} is out of range (expected A, B, C or D)")
    return Example(index, mc_prompt(question, choices), choices, tuple((question, c) for c in choices),
                   LETTERS.index(answer))


_BUILDERS: dict[str, Callable[[dict, str, int, _Spec], Example]] = {
    "winogrande": _winogrande_example,
    "arc": _multiple_choice_example,
    "openbookqa": _multiple_choice_example,
    "boolq": _boolq_example,
    "mmlu": _mmlu_example,
}


# --------------------------------------------------------------------------------------------------
# Readers: each yields (where, record), where = "file:line" or "hub row" for error messages.
# --------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: malformed JSON line ({err.msg} at column {err.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                yield where, record
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


_MMLU_COLUMNS = "question, A, B, C, D, answer"


def _read_mmlu_csv(path: Path) -> Iterator[tuple[str, dict]]:
    """Header-less MMLU CSV: question, A, B, C, D, answer letter. Quoted fields may span lines."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            start = 1  # first physical line of the next record
            for row in reader:
                where = f"{path}:{start}"
                start = reader.line_num + 1
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != 6:
                    raise DataError(f"{where}: expected 6 columns ({_MMLU_COLUMNS}), got {len(row)}")
                yield where, {"question": row[0], "choices": row[1:5], "answer": row[5]}
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise DataError(f"{path}:{start}: malformed CSV ({err})") from None


def _hub_record(kind: str, row: dict, where: str) -> dict:
    """Convert one hub row to the local record format read by the builders."""
    if kind in ("arc", "openbookqa"):
        stem = _field(row, "question" if kind == "arc" else "question_stem", where)
        choices = _field(row, "choices", where)
        texts, labels = _field(choices, "text", where), _field(choices, "label", where)
        return {"question": {"stem": stem,
                             "choices": [{"text": t, "label": lab} for t, lab in zip(texts, labels)]},
                "answerKey": _field(row, "answerKey", where)}
    if kind == "mmlu":
        choices = _field(row, "choices", where)
        if len(choices) != 4:
            raise DataError(f"{where}: expected 4 choices, got {len(choices)}")
        answer = _field(row, "answer", where)  # ClassLabel int 0..3
        if isinstance(answer, int) and 0 <= answer < 4:
            answer = LETTERS[answer]
        return {"question": _field(row, "question", where), "choices": list(choices), "answer": answer}
    return dict(row)  # winogrande and boolq use the same field names as the local files


def _read_hub(spec: _Spec, hub_split: str) -> Iterator[tuple[str, dict]]:
    name = spec.hub_id + (f" ({spec.hub_config})" if spec.hub_config else "")
    advice = "pass --data-dir or set BLOB_DATA_DIR to a local folder laid out like shared/data"
    try:
        import datasets  # lazy: only the hub path needs it
    except ImportError:
        raise DataError(f"cannot load {name} from the Hugging Face hub: the 'datasets' package is not "
                        f"installed; {advice}") from None
    try:
        ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=hub_split)
    except Exception as err:  # network, offline mode, missing config: all mean "no hub data"
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(f"cannot load {name} split {hub_split!r}: the Hugging Face hub is unreachable or "
                        f"refused ({type(err).__name__}: {reason}); {advice}") from None
    for i, row in enumerate(ds):
        where = f"{name} {hub_split} row {i}"
        yield where, _hub_record(spec.kind, row, where)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """Choose the local data folder.

    Parameters
    ----------
    data_dir : str, os.PathLike or None
        An explicit folder (``--data-dir``).

    Returns
    -------
    pathlib.Path or None
        ``data_dir`` if given, else ``$BLOB_DATA_DIR`` if set and non-empty, else None (use the hub).
        The folder is not checked here; :func:`load_split` reports a missing one.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("BLOB_DATA_DIR", "")
    return Path(env).expanduser() if env else None


def local_split_path(data_dir: str | os.PathLike, dataset: str, split: str = "train") -> Path:
    """Path of the file that :func:`load_split` reads for ``dataset``/``split`` under ``data_dir``.

    Layout: ``winogrande/{train_s,train_m,dev}.jsonl``, ``{arc_easy,arc_challenge,openbookqa}/
    {train,dev,test}.jsonl``, ``boolq/{train,dev}.jsonl``, ``mmlu/<subject>_{dev,val,test}.csv``.
    """
    spec = _spec_for(dataset)
    stem, _ = _split_for(dataset, spec, split)
    if spec.kind == "mmlu":
        return Path(data_dir) / spec.folder / f"{spec.hub_config}_{stem}.csv"
    return Path(data_dir) / spec.folder / f"{stem}.jsonl"


def load_split(dataset: str, split: str = "train", data_dir: str | os.PathLike | None = None, *,
               limit: int | None = None) -> TaskSplit:
    """Load one split of one benchmark as prompts and labels.

    Parameters
    ----------
    dataset : str
        One of :data:`DATASET_NAMES`, or any ``mmlu_<subject>``.
    split : str, default "train"
        The role: ``"train"`` (train split; WinoGrande ``train_s``/``train_m``; MMLU ``val``) or
        ``"eval"`` (the validation/dev split the paper reports; MMLU ``test``). Literal split names are
        accepted too: ``"train_s"``/``"train_m"``, ``"dev"``, ``"validation"``, ``"val"``, ``"test"``
        (ARC/OBQA/MMLU only), and ``"dev"`` for MMLU's 5-shot split.
    data_dir : str, os.PathLike or None
        Local folder laid out like ``shared/data`` (see :func:`local_split_path`). None means
        ``$BLOB_DATA_DIR``, and if that is unset, the Hugging Face hub.
    limit : int, optional
        Keep only the first ``limit`` examples (the rest of the file is not read or checked).

    Returns
    -------
    TaskSplit

    Raises
    ------
    DataError
        Unknown dataset or split, missing folder or file, malformed line, missing field, label out of
        range, empty split, or hub unreachable. The message is one line naming the file and line.
    """
    spec = _spec_for(dataset)
    stem, hub_split = _split_for(dataset, spec, split)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")

    root = resolve_data_dir(data_dir)
    if root is None:
        records, source, split_read = _read_hub(spec, hub_split), spec.hub_id, hub_split
    else:
        if not root.is_dir():
            origin = "$BLOB_DATA_DIR" if data_dir is None else "data_dir / --data-dir"
            raise DataError(f"data folder {root} (from {origin}) does not exist or is not a folder")
        path = local_split_path(root, dataset, split)
        if not path.is_file():
            raise DataError(f"{path}: expected split file for {dataset} split {split!r} is missing")
        reader = _read_mmlu_csv if spec.kind == "mmlu" else _read_jsonl
        records, source, split_read = reader(path), str(path), stem

    build = _BUILDERS[spec.kind]
    examples: list[Example] = []
    for where, record in records:
        examples.append(build(record, where, len(examples), spec))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{source}: split {split_read!r} of {dataset} is empty (no examples)")
    return TaskSplit(dataset, split_read, tuple(examples), spec.num_classes, spec.option_words, source)


def load_splits(dataset: str, data_dir: str | os.PathLike | None = None, *, train_limit: int | None = None,
                eval_limit: int | None = None, holdout: int | None = None) -> tuple[TaskSplit, TaskSplit]:
    """``(train, eval)`` of a run: the train split and the split it is evaluated on.

    Without ``holdout`` that is the dev split (:func:`load_split` ``"eval"``). With ``holdout = M`` the last
    M examples of the *training* split are set aside and returned as the evaluation split (named
    ``"train[-M:]"``); training then draws only from the examples before them (the first ``train_limit`` of
    those), so budgets and recipes can be chosen without ever looking at the dev split. ``eval_limit`` keeps
    the first examples of whichever evaluation split it is.

    Raises DataError when the held-out slice would leave nothing to train on.
    """
    if holdout is None or holdout == 0:
        return (load_split(dataset, "train", data_dir, limit=train_limit),
                load_split(dataset, "eval", data_dir, limit=eval_limit))
    if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0:
        raise DataError(f"holdout must be a non-negative integer or None, got {holdout!r}")
    full = load_split(dataset, "train", data_dir)
    if holdout >= len(full):
        raise DataError(f"{full.source}: holdout={holdout} leaves none of the {len(full)} training examples of "
                        f"{dataset} to train on")
    keep = full.examples[:-holdout]
    held = full.examples[-holdout:]
    if train_limit is not None:
        keep = keep[:train_limit]
    if eval_limit is not None:
        held = held[:eval_limit]
    from dataclasses import replace

    return (replace(full, examples=keep),
            replace(full, split=f"{full.split}[-{holdout}:]", examples=held))


def load_eval(dataset: str, data_dir: str | os.PathLike | None = None, *, eval_limit: int | None = None,
              holdout: int | None = None) -> TaskSplit:
    """The evaluation split of :func:`load_splits` alone (dev, or the held-out end of the train split)."""
    if holdout is None or holdout == 0:
        return load_split(dataset, "eval", data_dir, limit=eval_limit)
    return load_splits(dataset, data_dir, eval_limit=eval_limit, holdout=holdout)[1]


def dataset_info(dataset: str) -> tuple[int, tuple[str, ...]]:
    """``(num_classes, option_words)`` of a named dataset, without reading any file."""
    spec = _spec_for(dataset)
    return spec.num_classes, spec.option_words


def batches(examples, batch_size: int, *, seed: int, shuffle: bool = True, start: int = 0) -> Iterator[tuple[int, list]]:
    """Endless epochs of minibatches (drop_last), reshuffled every epoch from ``seed``; yields (position, batch).

    ``start`` skips the first ``start`` batches, which makes a resumed run see the same data order.
    """
    import torch

    n = len(examples)
    if n < batch_size:
        raise DataError(f"the training split has {n} examples, fewer than batch_size={batch_size}")
    per_epoch = n // batch_size
    pos = start
    while True:
        epoch, i = divmod(pos, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)) if shuffle else torch.arange(n)
        idx = order[i * batch_size:(i + 1) * batch_size].tolist()
        yield pos, [examples[j] for j in idx]
        pos += 1
