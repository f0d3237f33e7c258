"""User-defined tasks from YAML/JSON: a good definition loads, every bad one fails with a precise message."""

import json

import pytest

from zo_scale.tasks import Example, TaskDataError, get_task, sample_splits

GOOD = """\
name: my_sentiment
train_file: data/train.jsonl
eval_file: data/test.jsonl
template: "Review: {text}\\nSentiment:"
label_field: label
label_words: {positive: " good", negative: " bad"}
"""


def write_task(tmp_path, definition=GOOD, train=None, test=None, filename="task.yaml"):
    (tmp_path / "data").mkdir(exist_ok=True)
    rows = [{"text": f"review {i}", "label": "positive" if i % 2 else "negative"} for i in range(10)]
    for name, content in (("train.jsonl", train), ("test.jsonl", test)):
        lines = content if content is not None else "".join(json.dumps(r) + "\n" for r in rows)
        (tmp_path / "data" / name).write_text(lines, encoding="utf-8")
    path = tmp_path / filename
    path.write_text(definition, encoding="utf-8")
    return path


def test_good_yaml_loads(tmp_path, monkeypatch):
    path = write_task(tmp_path)
    monkeypatch.chdir(tmp_path.parent)  # files are relative to the YAML file, not to the current directory
    task = get_task(str(path))
    assert task.name == "my_sentiment"
    examples = task.examples("train", data_dir="/ignored")
    assert len(examples) == 10
    assert examples[1] == Example(("Review: review 1\nSentiment:",) * 2, (" good", " bad"), 0)
    assert examples[0].label == 1
    train, dev, test = sample_splits(task, num_train=4, num_dev=2, num_eval=3, seed=1)
    assert (len(train), len(dev), len(test)) == (4, 2, 3)


def test_json_definition_with_candidates_and_tsv_data(tmp_path):
    (tmp_path / "rows.tsv").write_text("question\tanswer\tgold\nWhich?\tx\t1\n", encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"question": "Pick one:", "choices": ["red", "blue", "green"], "gold": 2}) + "\n",
        encoding="utf-8",
    )
    definition = {
        "name": "pick",
        "train_file": "rows.jsonl",
        "eval_file": "rows.jsonl",
        "template": "Q: {question}\nA:",
        "label_field": "gold",
        "candidates_field": "choices",
    }
    path = tmp_path / "pick.json"
    path.write_text(json.dumps(definition), encoding="utf-8")
    [example] = get_task(str(path)).examples("eval")
    assert example == Example(("Q: Pick one:\nA:",) * 3, (" red", " blue", " green"), 2)
    # Integer label keys in the definition match the string labels of a TSV.
    words = {
        **definition,
        "eval_file": "rows.tsv",
        "template": "{question}\n",
        "label_field": "gold",
        "label_words": {0: "No", 1: "Yes"},
    }
    del words["candidates_field"]
    path.write_text(json.dumps(words), encoding="utf-8")
    assert get_task(str(path)).examples("eval") == [Example(("Which?\n",) * 2, ("No", "Yes"), 1)]


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (GOOD + "labels: [a]\n", "unknown key(s) ['labels']"),
        (GOOD.replace("label_field: label\n", ""), "missing required key(s) ['label_field']"),
        (GOOD + "candidates_field: choices\n", "exactly one of label_words or candidates_field"),
        (GOOD.replace("label_words", "other"), "unknown key(s) ['other']"),
        (GOOD.replace('" bad"', '" good"'), "same continuation to two labels"),
        (GOOD.replace("{text}", "{text.upper}"), "plain field names"),
        (GOOD.replace("{text}", "{text"), "not a valid format string"),
        ("- just\n- a list\n", "must be a mapping"),
        ("name: [unclosed\n", "cannot parse task definition"),
        (GOOD + "template: other\n", "line 7: key 'template' is given twice (first on line 4)"),  # YAML keeps the last
    ],
)
def test_bad_definitions_name_the_file_and_problem(tmp_path, edit, problem):
    path = write_task(tmp_path, definition=edit)
    with pytest.raises(TaskDataError) as err:
        get_task(str(path))
    assert "task.yaml" in str(err.value)
    assert problem in str(err.value)


@pytest.mark.parametrize(
    ("test_rows", "problem"),
    [
        ('{"text": "a", "label": "positive"}\n{"text": "b"}\n', "the row has no label field 'label'"),
        (
            '{"text": "a", "label": "positive"}\n{"text": "b", "label": "meh"}\n',
            "label 'meh' is not in label_words",
        ),
        (
            '{"text": "a", "label": "positive"}\n{"review": "b", "label": "negative"}\n',
            "the template's field 'text' is missing",
        ),
    ],
)
def test_bad_rows_name_data_file_row_and_problem(tmp_path, test_rows, problem):
    task = get_task(str(write_task(tmp_path, test=test_rows)))
    with pytest.raises(TaskDataError) as err:
        task.examples("eval")
    message = str(err.value)
    assert "test.jsonl, line 2: task 'my_sentiment'" in message
    assert problem in message


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    task = get_task(str(write_task(tmp_path, train='{"text": "a", "label": "positive"}\n{"text": "b", \n')))
    with pytest.raises(TaskDataError, match=r"train\.jsonl, line 2: malformed JSON"):
        task.examples("train")


def test_candidate_label_must_index_the_candidates(tmp_path):
    definition = GOOD.replace(
        'label_words: {positive: " good", negative: " bad"}', "candidates_field: choices"
    )
    rows = '{"text": "a", "choices": ["x", "y"], "label": 2}\n'
    task = get_task(str(write_task(tmp_path, definition=definition, test=rows)))
    with pytest.raises(TaskDataError, match="label 2 is not an index into the 2 candidates"):
        task.examples("eval")
