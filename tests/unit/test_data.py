"""blob_pyro.data on small files written here and a stand-in hub: prompts, label mapping, file formats, one-line
errors, the minibatch stream. (The real benchmark copies: tests/integration/test_data.py.)"""

import json
import sys
import types

import pytest

from blob_pyro.data import (
    DATASET_NAMES,
    DataError,
    batches,
    dataset_info,
    load_eval,
    load_split,
    load_splits,
    resolve_data_dir,
)

HEADER = "Return the label of the correct answer for the question below.\n\nQuestion: "


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def wg(answer="1", **over):
    rec = {"qID": "q", "sentence": "The cup beat the jug because _ was bigger.", "option1": "cup",
           "option2": "jug", "answer": answer}
    rec.update(over)
    return rec


def arc(labels=("A", "B", "C", "D"), key="B"):
    choices = [{"text": f"opt{i}", "label": lab} for i, lab in enumerate(labels)]
    return {"id": "x", "question": {"stem": "Why?", "choices": choices}, "answerKey": key}


def boolq(answer=True, passage="Water boils at 100 C at sea level.", question="does water boil at 100 c"):
    return {"question": question, "passage": passage, "answer": answer, "title": "Water"}


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------------
# Small files written to tmp_path
# ---------------------------------------------------------------------------------------------------

def test_arc_numeric_labels_on_small_file(tmp_path):
    write_jsonl(tmp_path / "arc_challenge" / "dev.jsonl",
                [arc(("1", "2", "3", "4"), "3"), arc(("A", "B", "C"), "C"), arc(tuple("ABCDE"), "E")])
    ts = load_split("arc_challenge", "eval", tmp_path)
    assert ts.labels == [2, 2, 4]
    assert ts.examples[0].prompt.endswith("A) opt0\nB) opt1\nC) opt2\nD) opt3\nAnswer:")
    assert [len(e.choices) for e in ts.examples] == [4, 3, 5]


def test_boolq_format(tmp_path):
    long_passage = "x" * 1500
    write_jsonl(tmp_path / "boolq" / "train.jsonl", [boolq(True), boolq(False, passage=long_passage)])
    write_jsonl(tmp_path / "boolq" / "dev.jsonl", [{"question": "q", "passage": "p", "answer": False}])
    ts = load_split("boolq", "train", tmp_path)
    assert ts.num_classes == 2 and ts.option_words == ("False", "True")
    assert ts.labels == [1, 0]  # class k is scored by option_words[k]: gold true -> "True"
    assert ts.examples[0].prompt == (
        "Read the passage below and answer the question with the words 'true' or 'false'.\n\n"
        "Passage: Water boils at 100 C at sea level.\nQuestion: does water boil at 100 c\n"
        "Answer (true or false):")
    assert ts.examples[0].mc_texts == (
        ("Water boils at 100 C at sea level. does water boil at 100 c", "false"),
        ("Water boils at 100 C at sea level. does water boil at 100 c", "true"))
    assert "Passage: " + "x" * 1024 + "\nQuestion" in ts.examples[1].prompt
    assert ts.examples[1].mc_texts[0][0] == "x" * 1024 + " does water boil at 100 c"
    dev = load_split("boolq", "eval", tmp_path)
    assert (dev.split, dev.labels) == ("dev", [0])


def test_mmlu_csv_with_commas_quotes_and_roles(tmp_path):
    folder = tmp_path / "mmlu"
    folder.mkdir()
    (folder / "college_physics_val.csv").write_text(
        '"What is 1,2 and ""3""?",one,"two, too","say ""three""",four,C\n'
        '"A second\nline",a,b,c,d,A\n', encoding="utf-8")
    (folder / "college_physics_test.csv").write_text("Q,a,b,c,d,D\n", encoding="utf-8")
    ts = load_split("mmlu_college_physics", "train", tmp_path)
    assert ts.split == "val" and ts.num_classes == 4 and ts.option_words == ("A", "B", "C", "D")
    ex = ts.examples[0]
    assert ex.choices == ("one", "two, too", 'say "three"', "four") and ex.label == 2
    assert ex.prompt == (HEADER + 'What is 1,2 and "3"?\nChoices:\nA) one\nB) two, too\n'
                         'C) say "three"\nD) four\nAnswer:')
    assert ex.mc_texts[1] == ('What is 1,2 and "3"?', "two, too")
    assert ts.examples[1].choices[0] == "a" and ts.examples[1].label == 0
    test = load_split("mmlu_college_physics", "eval", tmp_path)
    assert (test.split, test.labels) == ("test", [3])
    assert "mmlu_college_chemistry" in DATASET_NAMES and "mmlu_high_school_physics" in DATASET_NAMES


def test_limit_keeps_first_examples(tmp_path):
    write_jsonl(tmp_path / "winogrande" / "dev.jsonl", [wg("1"), wg("2"), wg("2")])
    ts = load_split("winogrande_m", "eval", tmp_path, limit=2)
    assert ts.labels == [0, 1]


def test_holdout_is_the_end_of_the_train_split_and_never_trained_on(tmp_path):
    write_jsonl(tmp_path / "winogrande" / "train_s.jsonl", [wg("1") for _ in range(10)])
    write_jsonl(tmp_path / "winogrande" / "dev.jsonl", [wg("2")])

    def idx(split):
        return [e.index for e in split.examples]

    train, held = load_splits("winogrande_s", tmp_path, holdout=3)
    assert idx(train) == list(range(7)) and idx(held) == [7, 8, 9] and held.split == "train_s[-3:]"
    assert held.labels == [0, 0, 0]
    train, held = load_splits("winogrande_s", tmp_path, holdout=3, train_limit=2, eval_limit=1)
    assert idx(train) == [0, 1] and idx(held) == [7]
    assert idx(load_eval("winogrande_s", tmp_path, holdout=3)) == [7, 8, 9]
    # without holdout the evaluation split is dev (label 1), as before
    assert load_splits("winogrande_s", tmp_path)[1].labels == [1]
    assert load_eval("winogrande_s", tmp_path).labels == [1] and load_eval("winogrande_s", tmp_path).split == "dev"
    with pytest.raises(DataError, match="leaves none of the 10"):
        load_splits("winogrande_s", tmp_path, holdout=10)
    with pytest.raises(DataError, match="non-negative integer"):
        load_splits("winogrande_s", tmp_path, holdout=-1)


def test_blob_data_dir_env_var(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "winogrande" / "train_s.jsonl", [wg("2")])
    monkeypatch.setenv("BLOB_DATA_DIR", str(tmp_path))
    ts = load_split("winogrande_s")
    assert ts.labels == [1] and ts.source == str(tmp_path / "winogrande" / "train_s.jsonl")
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"  # explicit wins
    monkeypatch.delenv("BLOB_DATA_DIR")
    assert resolve_data_dir(None) is None


# ---------------------------------------------------------------------------------------------------
# Hub path, with a stand-in `datasets` module (no network)
# ---------------------------------------------------------------------------------------------------

def fake_datasets(monkeypatch, rows=None, error=None):
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        if error is not None:
            raise error
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("BLOB_DATA_DIR", raising=False)
    return calls


def test_hub_failure_is_one_line_data_error(monkeypatch):
    fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach 'allenai/winogrande'\non the Hub"))
    with pytest.raises(DataError) as excinfo:
        load_split("winogrande_s", "eval")
    msg = one_line_error(excinfo)
    assert "allenai/winogrande" in msg and "unreachable" in msg
    assert "--data-dir" in msg and "BLOB_DATA_DIR" in msg


@pytest.mark.parametrize("dataset, rows, hub_id, config, split, labels", [
    ("arc_easy", [{"id": "1", "question": "Why?", "answerKey": "2",
                   "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}}],
     "allenai/ai2_arc", "ARC-Easy", "validation", [1]),
    ("openbookqa", [{"id": "1", "question_stem": "Why?", "answerKey": "D",
                     "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]}}],
     "allenai/openbookqa", "main", "validation", [3]),
    ("mmlu_college_chemistry", [{"question": "Q?", "subject": "college_chemistry",
                                 "choices": ["a", "b", "c", "d"], "answer": 1}],
     "cais/mmlu", "college_chemistry", "test", [1]),
    ("boolq", [{"question": "q", "passage": "p", "answer": True}], "google/boolq", None, "validation", [1]),
    ("winogrande_m", [wg("2")], "allenai/winogrande", "winogrande_m", "validation", [1]),
])
def test_hub_rows_are_converted(monkeypatch, dataset, rows, hub_id, config, split, labels):
    calls = fake_datasets(monkeypatch, rows=rows)
    ts = load_split(dataset, "eval")
    assert calls == [(hub_id, config, {"split": split})]  # never trust_remote_code
    assert (ts.split, ts.source, ts.labels) == (split, hub_id, labels)
    assert ts.examples[0].prompt.endswith("Answer:") or ts.examples[0].prompt.endswith("(true or false):")


# ---------------------------------------------------------------------------------------------------
# Errors: one line, naming the file, line and field
# ---------------------------------------------------------------------------------------------------

def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_split("winogrande_xl", "train", tmp_path)
    msg = one_line_error(excinfo)
    assert "winogrande_xl" in msg
    assert all(name in msg for name in ("winogrande_s", "arc_easy", "openbookqa", "boolq"))
    assert "mmlu_<subject>" in msg


def test_unknown_split_role(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_split("winogrande_s", "test", tmp_path)
    msg = one_line_error(excinfo)
    assert "'test'" in msg and "'train'" in msg and "'eval'" in msg and "train_s" in msg


def test_missing_data_folder(tmp_path, monkeypatch):
    with pytest.raises(DataError) as excinfo:
        load_split("arc_easy", "train", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in one_line_error(excinfo)
    monkeypatch.setenv("BLOB_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="BLOB_DATA_DIR"):
        load_split("arc_easy", "train")


@pytest.mark.parametrize("dataset, role, expected", [
    ("winogrande_s", "train", "winogrande/train_s.jsonl"),
    ("openbookqa", "eval", "openbookqa/dev.jsonl"),
    ("mmlu_college_chemistry", "eval", "mmlu/college_chemistry_test.csv"),
])
def test_missing_split_file_names_expected_file(tmp_path, dataset, role, expected):
    with pytest.raises(DataError) as excinfo:
        load_split(dataset, role, tmp_path)
    msg = one_line_error(excinfo)
    assert str(tmp_path / expected) in msg and "missing" in msg


def test_malformed_json_line_number(tmp_path):
    path = tmp_path / "winogrande" / "train_s.jsonl"
    write_jsonl(path, [wg(), wg()])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"sentence": "broken\n')
    with pytest.raises(DataError) as excinfo:
        load_split("winogrande_s", "train", tmp_path)
    msg = one_line_error(excinfo)
    assert f"{path}:3:" in msg and "malformed JSON" in msg


def without(record, field):
    return {k: v for k, v in record.items() if k != field}


@pytest.mark.parametrize("dataset, folder, good, field", [
    ("winogrande_s", "winogrande/train_s.jsonl", wg(), "option2"),
    ("arc_easy", "arc_easy/train.jsonl", arc(), "answerKey"),
    ("boolq", "boolq/train.jsonl", boolq(), "passage"),
])
def test_missing_field_is_named(tmp_path, dataset, folder, good, field):
    path = write_jsonl(tmp_path / folder, [good, without(good, field)])
    with pytest.raises(DataError) as excinfo:
        load_split(dataset, "train", tmp_path)
    msg = one_line_error(excinfo)
    assert f"{path}:2:" in msg and f"'{field}'" in msg


def test_missing_nested_field_is_named_with_its_path(tmp_path):
    bad = arc()
    del bad["question"]["choices"][1]["text"]
    path = write_jsonl(tmp_path / "openbookqa" / "train.jsonl", [bad])
    with pytest.raises(DataError) as excinfo:
        load_split("openbookqa", "train", tmp_path)
    msg = one_line_error(excinfo)
    assert f"{path}:1:" in msg and "'question.choices[1].text'" in msg


@pytest.mark.parametrize("dataset, folder, records, needle", [
    ("winogrande_s", "winogrande/train_s.jsonl", [wg("1"), wg("3")], "'3'"),
    ("arc_easy", "arc_easy/train.jsonl", [arc(), arc(key="E")], "'E'"),
    ("arc_easy", "arc_easy/train.jsonl", [arc(), arc(tuple("ABCDEF"), "A")], "6 choices"),
    ("arc_easy", "arc_easy/train.jsonl", [arc(), arc(("A", "C", "B", "D"))], "A, C, B, D"),
    ("openbookqa", "openbookqa/train.jsonl", [arc(), arc(tuple("ABCDE"), "A")], "5 choices"),
    ("boolq", "boolq/train.jsonl", [boolq(), boolq("yes")], "'yes'"),
])
def test_out_of_range_label(tmp_path, dataset, folder, records, needle):
    path = write_jsonl(tmp_path / folder, records)
    with pytest.raises(DataError) as excinfo:
        load_split(dataset, "train", tmp_path)
    msg = one_line_error(excinfo)
    assert f"{path}:2:" in msg and needle in msg


def test_mmlu_bad_answer_and_column_count(tmp_path):
    path = tmp_path / "mmlu" / "college_physics_val.csv"
    path.parent.mkdir()
    path.write_text("Q,a,b,c,d,A\nQ,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_split("mmlu_college_physics", "train", tmp_path)
    msg = one_line_error(excinfo)
    assert f"{path}:2:" in msg and "'E'" in msg
    path.write_text('"multi\nline",a,b,c,d,A\nQ,a,b,c\n', encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_split("mmlu_college_physics", "train", tmp_path)
    msg = one_line_error(excinfo)
    assert f"{path}:3:" in msg and "6 columns" in msg and "got 4" in msg


def test_empty_split(tmp_path):
    path = tmp_path / "openbookqa" / "dev.jsonl"
    path.parent.mkdir()
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_split("openbookqa", "eval", tmp_path)
    msg = one_line_error(excinfo)
    assert str(path) in msg and "empty" in msg


# ---------------------------------------------------------------------------------------------------
# Minibatches
# ---------------------------------------------------------------------------------------------------

def test_batches_resume_at_the_same_data_position():
    data = list(range(10))
    full = batches(data, 3, seed=5)
    skipped = [next(full) for _ in range(7)]
    resumed = batches(data, 3, seed=5, start=4)
    assert [next(resumed) for _ in range(3)] == skipped[4:]
    assert skipped[3][1] != skipped[0][1]  # reshuffled each epoch, not one fixed order
    assert [pos for pos, _ in skipped] == list(range(7))
    for _, batch in skipped[:3]:  # drop_last: an epoch is 3 batches of 3 distinct examples
        assert len(batch) == 3
    assert len({x for _, b in skipped[:3] for x in b}) == 9


def test_batches_without_shuffle_and_too_small_data():
    stream = batches([1, 2, 3, 4], 2, seed=0, shuffle=False)
    assert [next(stream)[1] for _ in range(3)] == [[1, 2], [3, 4], [1, 2]]
    with pytest.raises(DataError, match="fewer than batch_size=4"):
        next(batches([1, 2], 4, seed=0))


def test_dataset_info_needs_no_files():
    assert dataset_info("winogrande_s") == (2, ("A", "B"))
    assert dataset_info("arc_easy") == (5, ("A", "B", "C", "D", "E"))
    assert dataset_info("boolq") == (2, ("False", "True"))
    assert dataset_info("mmlu_college_physics")[0] == 4
    with pytest.raises(DataError, match="winogrande_xl"):
        dataset_info("winogrande_xl")
