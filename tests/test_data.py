"""Behaviour of blob_pyro.data: split sizes, exact prompts, label mapping, file formats and error messages."""

import json
import sys
import types
from collections import Counter

import pytest

from blob_pyro.data import DATASET_NAMES, DataError, load_split, resolve_data_dir

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
# Real local benchmark copies
# ---------------------------------------------------------------------------------------------------

@pytest.mark.data
@pytest.mark.parametrize("dataset, role, split, size", [
    ("winogrande_s", "train", "train_s", 640),
    ("winogrande_s", "eval", "dev", 1267),
    ("winogrande_m", "train", "train_m", 2558),
    ("arc_easy", "train", "train", 2251),
    ("arc_easy", "eval", "dev", 570),
    ("arc_challenge", "train", "train", 1119),
    ("arc_challenge", "eval", "dev", 299),
    ("openbookqa", "train", "train", 4957),
    ("openbookqa", "eval", "dev", 500),
])
def test_real_split_sizes_and_label_ranges(data_dir, dataset, role, split, size):
    ts = load_split(dataset, role, data_dir)
    assert (ts.dataset, ts.split, len(ts)) == (dataset, split, size)
    assert ts.source.endswith(f"{split}.jsonl")
    assert len(ts.option_words) == ts.num_classes
    assert [ex.index for ex in ts.examples] == list(range(size))
    for ex in ts.examples:
        assert 2 <= len(ex.choices) <= ts.num_classes
        assert len(ex.mc_texts) == len(ex.choices)
        assert 0 <= ex.label < len(ex.choices)
    assert ts.labels == [ex.label for ex in ts.examples]


@pytest.mark.data
def test_literal_split_names_match_roles(data_dir):
    assert load_split("arc_easy", "validation", data_dir).split == "dev"
    assert len(load_split("arc_easy", "val", data_dir)) == 570
    assert len(load_split("arc_easy", "test", data_dir)) == 2376
    assert len(load_split("winogrande_s", "train_s", data_dir)) == 640


@pytest.mark.data
def test_winogrande_prompt_label_and_mc_texts(data_dir):
    ts = load_split("winogrande_s", "train", data_dir, limit=3)
    assert len(ts) == 3 and ts.num_classes == 2 and ts.option_words == ("A", "B")
    ex = ts.examples[0]
    sentence = ("Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised "
                "eating intestine.")
    assert ex.prompt == HEADER + sentence + "\nChoices:\nA) Ian\nB) Dennis\nAnswer:"
    assert ex.label == 1  # answer "2"
    assert ex.choices == ("Ian", "Dennis")
    assert ex.mc_texts[1] == (sentence.replace("_", "Dennis"), None)
    assert ts.examples[1].label == 0


@pytest.mark.data
def test_arc_prompt_has_letters_first(data_dir):
    ts = load_split("arc_easy", "train", data_dir, limit=1)
    assert ts.num_classes == 5 and ts.option_words == ("A", "B", "C", "D", "E")
    ex = ts.examples[0]
    assert ex.prompt == (
        HEADER + "Which factor will most likely cause a person to develop a fever?\nChoices:\n"
        "A) a leg muscle relaxing after exercise\nB) a bacterial population in the bloodstream\n"
        "C) several viral particles on the skin\nD) carbohydrates being digested in the stomach\nAnswer:")
    assert ex.label == 1
    assert ex.mc_texts[0] == ("Which factor will most likely cause a person to develop a fever?",
                              "a leg muscle relaxing after exercise")


@pytest.mark.data
def test_arc_numeric_labels_and_odd_choice_counts(data_dir):
    ts = load_split("arc_easy", "train", data_dir)
    ex = ts.examples[4]  # line 5: labels "1".."4", answerKey "3"
    assert ex.choices[2] == "how they formed" and ex.label == 2
    assert "\nA) their color\n" in ex.prompt and "1)" not in ex.prompt
    # every question is kept: 6 with 3 choices, 4 with 5 choices (README notes)
    counts = Counter(len(e.choices) for e in ts.examples)
    assert (counts[3], counts[5]) == (6, 4)


@pytest.mark.data
def test_openbookqa_prompt_fixed(data_dir):
    ex = load_split("openbookqa", "eval", data_dir, limit=1).examples[0]
    assert "\nChoices:\nA) " in ex.prompt and "Chioces" not in ex.prompt


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
