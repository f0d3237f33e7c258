"""Data as people bring it, written by the tools that make it (Excel-style CSV, pandas, pyarrow, `datasets`),
loads as a custom task; a row without its label is refused naming the file and the row."""

import csv
import json

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zo_scale.tasks import Example, TaskDataError, get_task, sample_splits
from zo_scale.train.cli import main

WORDS = "label_words: {0: ' bad', 1: ' good'}\n"
CANDIDATES = "candidates_field: choices\n"


def define(folder, train, eval_file=None, answer=WORDS, name="task.yaml"):
    path = folder / name
    path.write_text(f"name: mine\ntrain_file: {train}\neval_file: {eval_file or train}\n"
                    f"template: 'Review: {{text}} It was'\nlabel_field: label\n{answer}", encoding="utf-8")
    return get_task(str(path))


def example(text, label):
    return Example((f"Review: {text} It was",) * 2, (" bad", " good"), label)


def rows(n, prefix="film"):
    return [{"text": f"{prefix} {i}", "label": i % 2} for i in range(n)]


def test_an_excel_csv_with_a_byte_order_mark_loads(tmp_path):
    with open(tmp_path / "reviews.csv", "w", encoding="utf-8-sig", newline="") as f:  # as Excel's "CSV UTF-8"
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows(6))
    assert (tmp_path / "reviews.csv").read_bytes()[:3] == b"\xef\xbb\xbf"
    task = define(tmp_path, "reviews.csv")
    assert task.examples("train") == [example(f"film {i}", i % 2) for i in range(6)]
    train, dev, test = sample_splits(task, num_train=3, num_dev=1, num_eval=2, seed=0)
    assert (len(train), len(dev), len(test)) == (3, 1, 2)


def test_a_json_definition_and_jsonl_data_with_byte_order_marks_load(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(2)), encoding="utf-8-sig")
    definition = {"name": "mine", "train_file": "rows.jsonl", "eval_file": "rows.jsonl", "template": "{text}:",
                  "label_field": "label", "label_words": {"0": "no", "1": "yes"}}
    (tmp_path / "task.json").write_text(json.dumps(definition), encoding="utf-8-sig")
    assert get_task(str(tmp_path / "task.json")).examples("eval") == [
        Example(("film 0:",) * 2, (" no", " yes"), 0), Example(("film 1:",) * 2, (" no", " yes"), 1)]


def write_pandas(frame, path):
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        frame.to_json(path, orient="records")
    else:
        frame.to_parquet(path, index=False)


@pytest.mark.parametrize("file", ["reviews.csv", "reviews.jsonl", "reviews.json", "reviews.parquet"])
def test_pandas_float_labels_match_integer_label_words_and_candidates(tmp_path, file):
    # A label column with a gap is float64 in pandas; dropping the gap leaves 1.0 and 0.0 (and "1.0" in a CSV).
    frame = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": [1, None, 0, 1]}).dropna()
    assert frame["label"].dtype == "float64"
    frame["choices"] = [[" bad", " good"]] * len(frame)
    write_pandas(frame.drop(columns="choices") if file.endswith(".csv") else frame, tmp_path / file)
    expected = [example("a", 1), example("c", 0), example("d", 1)]
    assert define(tmp_path, file).examples("train") == expected
    if not file.endswith(".csv"):  # the candidates' index, 1.0 -> 1
        assert define(tmp_path, file, answer=CANDIDATES).examples("train") == expected


@pytest.mark.parametrize("label", [1.5, "1.5", "one"])
def test_a_label_that_is_no_integer_is_named(tmp_path, label):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "a", "label": 0}) + "\n" +
                                         json.dumps({"text": "b", "label": label}) + "\n")
    with pytest.raises(TaskDataError) as err:
        define(tmp_path, "rows.jsonl").examples("train")
    definition = tmp_path / "task.yaml"
    assert f"rows.jsonl, line 2: task 'mine' ({definition}): label {label!r} is not in label_words" in str(err.value)


def test_parquet_written_by_datasets_loads_with_its_candidate_lists(tmp_path):
    data = datasets.Dataset.from_list([{**r, "choices": [" bad", " good"]} for r in rows(5)])
    data.to_parquet(str(tmp_path / "rows.parquet"))
    assert define(tmp_path, "rows.parquet", answer=CANDIDATES).examples("train") == [
        example(f"film {i}", i % 2) for i in range(5)]


def test_a_dataset_folder_is_read_whole(tmp_path):
    datasets.Dataset.from_list(rows(10)).save_to_disk(str(tmp_path / "saved"))
    task = define(tmp_path, "saved")
    assert task.examples("train") == [example(f"film {i}", i % 2) for i in range(10)]
    train, dev, test = sample_splits(task, num_train=5, num_dev=2, num_eval=3, seed=0)
    assert len({id(e) for e in train + dev + test}) == 10  # one folder for both: the sampler keeps them apart


def test_a_dataset_dict_folder_gives_train_to_train_file_and_validation_to_eval_file(tmp_path):
    splits = {"train": rows(6, "train"), "validation": rows(4, "validation"), "test": rows(2, "test")}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "saved"))
    task = define(tmp_path, "saved")
    assert task.path("train") == tmp_path / "saved" / "train"
    assert task.examples("train") == [example(f"train {i}", i % 2) for i in range(6)]
    assert task.examples("eval") == [example(f"validation {i}", i % 2) for i in range(4)]
    train, dev, test = sample_splits(task, num_train=4, num_dev=2, num_eval=4, seed=0)
    assert sorted(e.contexts[0] for e in test) == [f"Review: validation {i} It was" for i in range(4)]
    assert all("train" in e.contexts[0] for e in train + dev)
    # A split named by its folder; with no validation split, eval_file reads test.
    assert define(tmp_path, "saved", "saved/test").examples("eval") == [example(f"test {i}", i % 2) for i in range(2)]
    datasets.DatasetDict({k: datasets.Dataset.from_list(splits[k]) for k in ("train", "test")}).save_to_disk(
        str(tmp_path / "no_validation"))
    assert define(tmp_path, "no_validation").examples("eval") == [example(f"test {i}", i % 2) for i in range(2)]


def test_a_dataset_dict_with_one_split_serves_both_files(tmp_path):
    datasets.DatasetDict({"full": datasets.Dataset.from_list(rows(8))}).save_to_disk(str(tmp_path / "saved"))
    task = define(tmp_path, "saved")
    assert task.path("train") == task.path("eval") == tmp_path / "saved" / "full"
    train, dev, test = sample_splits(task, num_train=4, num_dev=1, num_eval=3, seed=0)
    assert len({id(e) for e in train + dev + test}) == 8


def test_a_dataset_dict_without_the_split_a_file_reads_is_named_with_its_splits(tmp_path):
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows(2)) for name in ("train", "extra")}).save_to_disk(
        str(tmp_path / "saved"))
    task = define(tmp_path, "saved")
    assert len(task.examples("train")) == 2
    with pytest.raises(TaskDataError) as err:
        task.examples("eval")
    assert (f"{tmp_path / 'saved'}: a DatasetDict folder with splits ['train', 'extra'], none of them validation "
            "or test, so eval_file does not say which to read; name the split's folder, e.g. saved/train"
            ) in str(err.value)


def test_a_folder_not_written_by_datasets_is_refused_by_name(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text('{"text": "a", "label": 0}\n')
    with pytest.raises(TaskDataError, match="data: a folder, but not one written by datasets' save_to_disk"):
        define(tmp_path, "data").examples("train")


def write_null_label(folder, file):
    """Three rows whose middle one has an empty (null) label, written by the format's usual tool; the place
    the error gives for that row."""
    data = [{"text": "a", "label": 1}, {"text": "b", "label": None}, {"text": "c", "label": 0}]
    path = folder / file
    if file.endswith(".csv"):
        pd.DataFrame(data).to_csv(path, index=False)  # the gap is an empty cell, on line 3 after the header
        return "line 3"
    if file.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        return "line 2"
    if file.endswith(".json"):
        path.write_text(json.dumps(data, indent=1))
        return "item 2"
    if file.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(data), path)
        return "index 1"
    datasets.Dataset.from_list(data).save_to_disk(str(path))
    return "index 1"


@pytest.mark.parametrize("file", ["rows.csv", "rows.jsonl", "rows.json", "rows.parquet", "saved"])
def test_a_null_label_names_the_file_and_the_row(tmp_path, file):
    where = write_null_label(tmp_path, file)
    with pytest.raises(TaskDataError) as err:
        define(tmp_path, file).examples("train")
    assert f"{tmp_path / file}, {where}: task 'mine'" in str(err.value)
    assert "the label field 'label' is empty; fill it in or drop the row" in str(err.value)


@pytest.mark.parametrize(("row", "problem"), [
    ({"label": 1}, "the template's field 'text' is missing (the row has ['label'])"),
    ({"text": None, "label": 1}, "the template's field 'text' is null"),
    ({"text": "b"}, "the row has no label field 'label' (it has ['text'])"),
    ({"text": "b", "label": " "}, "the label field 'label' is empty"),
])
def test_a_row_missing_a_field_names_the_file_and_the_row(tmp_path, row, problem):
    (tmp_path / "rows.json").write_text(json.dumps([{"text": "a", "label": 0}, row]))
    with pytest.raises(TaskDataError) as err:
        define(tmp_path, "rows.json").examples("train")
    assert "rows.json, item 2: task 'mine'" in str(err.value) and problem in str(err.value)


def cli_train(task_file, out):
    return main(["train", "model.name=tiny-llama", f"task.name={task_file}", "run.steps=2", "run.batch_size=2",
                 "task.num_train=8", "task.num_dev=2", "task.num_eval=4", "task.max_length=32", "run.progress=false",
                 f"run.output_dir={out}"])


def test_the_cli_trains_on_a_dataset_dict_folder_of_pandas_float_labels(tmp_path):
    frames = {split: pd.DataFrame({"text": [f"{split} {i}" for i in range(n + 1)],
                                   "label": [i % 2 for i in range(n)] + [None]}).dropna()
              for split, n in (("train", 12), ("validation", 4))}
    datasets.DatasetDict({k: datasets.Dataset.from_pandas(v, preserve_index=False) for k, v in frames.items()}
                         ).save_to_disk(str(tmp_path / "saved"))
    define(tmp_path, "saved")
    assert cli_train(tmp_path / "task.yaml", tmp_path / "run") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["final_accuracy"] <= 1.0


def test_the_cli_exits_2_naming_the_file_and_row_of_a_null_label(tmp_path, capsys):
    where = write_null_label(tmp_path, "rows.csv")
    define(tmp_path, "rows.csv")
    assert cli_train(tmp_path / "task.yaml", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'rows.csv'}, {where}: " in err and "the label field 'label' is empty" in err
    assert not (tmp_path / "run").exists()
