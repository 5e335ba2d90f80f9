"""blob_pyro.data on the real local benchmark copies (the data folder): split sizes, exact prompts, label ranges.

Everything that a small file can show is in tests/unit/test_data.py.
"""

from collections import Counter

import pytest

from blob_pyro.data import load_split

HEADER = "Return the label of the correct answer for the question below.\n\nQuestion: "

pytestmark = pytest.mark.data


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


def test_literal_split_names_match_roles(data_dir):
    assert load_split("arc_easy", "validation", data_dir).split == "dev"
    assert len(load_split("arc_easy", "val", data_dir)) == 570
    assert len(load_split("arc_easy", "test", data_dir)) == 2376
    assert len(load_split("winogrande_s", "train_s", data_dir)) == 640


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


def test_arc_numeric_labels_and_odd_choice_counts(data_dir):
    ts = load_split("arc_easy", "train", data_dir)
    ex = ts.examples[4]  # line 5: labels "1".."4", answerKey "3"
    assert ex.choices[2] == "how they formed" and ex.label == 2
    assert "\nA) their color\n" in ex.prompt and "1)" not in ex.prompt
    # every question is kept: 6 with 3 choices, 4 with 5 choices (README notes)
    counts = Counter(len(e.choices) for e in ts.examples)
    assert (counts[3], counts[5]) == (6, 4)


def test_openbookqa_prompt_fixed(data_dir):
    ex = load_split("openbookqa", "eval", data_dir, limit=1).examples[0]
    assert "\nChoices:\nA) " in ex.prompt and "Chioces" not in ex.prompt
