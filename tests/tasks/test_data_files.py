"""Every file in shared/data loads through its built-in task with the counts in shared/data/README.md."""

from collections import Counter

import pytest

from zo_scale.tasks import get_task, read_jsonl

# task, split -> number of Examples and how many have each label index (option order of the template).
EXPECTED = {
    ("sst2", "train"): (67_349, {0: 29_780, 1: 37_569}),  # terrible, great
    ("sst2", "eval"): (872, {0: 428, 1: 444}),
    ("rte", "train"): (2_490, {0: 1_249, 1: 1_241}),  # Yes=entailment, No
    ("rte", "eval"): (277, {0: 146, 1: 131}),
    ("wsc", "train"): (554, {0: 295, 1: 259}),  # No=False, Yes=True
    ("wsc", "eval"): (104, {0: 66, 1: 38}),
    ("cb", "train"): (250, {0: 115, 1: 119, 2: 16}),  # Yes=entailment, No=contradiction, Maybe=neutral
    ("cb", "eval"): (56, {0: 23, 1: 28, 2: 5}),
    ("copa", "train"): (400, {0: 195, 1: 205}),
    ("copa", "eval"): (100, {0: 55, 1: 45}),
    ("boolq", "eval"): (3_270, {0: 1_237, 1: 2_033}),  # No=False, Yes=True
    ("wic", "eval"): (638, {0: 319, 1: 319}),
    ("multirc", "eval"): (4_848, {0: 2_773, 1: 2_075}),  # one Example per answer option
}


@pytest.mark.parametrize(("task", "split"), sorted(EXPECTED))
def test_counts_and_label_balance(data_dir, task, split):
    examples = get_task(task).examples(split, data_dir)
    count, labels = EXPECTED[task, split]
    assert len(examples) == count
    assert Counter(ex.label for ex in examples) == labels


@pytest.mark.parametrize("task", ["boolq", "wic", "multirc"])
def test_tasks_without_a_train_file_use_the_val_file_for_both_splits(data_dir, task):
    t = get_task(task)
    assert t.path("train", data_dir) == t.path("eval", data_dir) == data_dir / t.files["eval"]
    assert t.path("eval", data_dir).name == "val.jsonl"


def test_multirc_structure(data_dir):
    passages = read_jsonl(data_dir / "superglue/MultiRC/val.jsonl")
    questions = [q for p in passages for q in p["passage"]["questions"]]
    assert (len(passages), len(questions), sum(len(q["answers"]) for q in questions)) == (83, 953, 4_848)


def test_sst2_train_keeps_the_readme_first_last_and_repaired_rows(data_dir):
    rows = get_task("sst2").examples("train", data_dir)
    assert rows[0].contexts[0] == "hide new secretions from the parental units It was"
    assert rows[-1].contexts[0].startswith("this new jangle of noise , mayhem and stupidity")
    # Rows repaired in shared/data (README caveats); the template strips the trailing space.
    assert [rows[i].contexts[0] for i in (17_688, 48_104)] == ["10 It was", "10,000 It was"]
