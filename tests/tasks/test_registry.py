import random
from pathlib import Path

import pytest

from zo_scale.tasks import BUILTIN_TASKS, DEMO_DATA_DIR, TaskDataError, find_data_dir, get_task, read_tsv

BUILTIN_NAMES = ["sst2", "sst2-demo", "rte", "cb", "boolq", "wic", "wsc", "multirc", "copa", "winogrande",
                 "sst5", "mnli", "trec", "squad", "squad-demo", "drop", "drop-demo", "countdown", "arithmetic"]


def test_builtin_names_case_insensitive():
    assert sorted(BUILTIN_TASKS) == sorted(BUILTIN_NAMES)
    assert get_task("RTE") is get_task("rte")
    assert get_task("SST2-Demo").name == "sst2-demo"


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown task 'snli'") as err:
        get_task("snli")
    assert all(name in str(err.value) for name in BUILTIN_NAMES)


def test_definition_file_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        get_task(tmp_path / "nope.yaml")


def test_data_dir_discovery_prefers_env_var_then_cwd(monkeypatch, tmp_path):
    monkeypatch.setenv("ZO_SCALE_DATA", str(tmp_path))
    assert find_data_dir() == tmp_path
    monkeypatch.delenv("ZO_SCALE_DATA")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")  # walks up from the working directory first
    assert find_data_dir() == tmp_path / "shared" / "data"


def test_data_dir_discovery_falls_back_to_package_location(monkeypatch, data_dir):
    monkeypatch.delenv("ZO_SCALE_DATA", raising=False)
    root = Path("/")
    assert not (root / "shared" / "data").is_dir(), "a /shared/data folder would shadow the package fallback"
    monkeypatch.chdir(root)  # nothing above "/": found from the package location instead
    assert find_data_dir().resolve() == data_dir.resolve()


def test_default_data_dir_is_used_when_none_given(data_dir):
    task = get_task("rte")
    assert task.path("eval") == data_dir / "superglue/RTE/val.jsonl"
    assert task.examples("eval") == task.examples("eval", data_dir)


def test_missing_file_says_to_set_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        get_task("rte").examples("train", tmp_path)
    assert str(tmp_path / "superglue/RTE/train.jsonl") in str(err.value)
    assert "set task.data_dir" in str(err.value)


def test_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        get_task("rte").path("validation")


def test_row_without_label_names_task_file_and_row(tmp_path):
    folder = tmp_path / "superglue" / "RTE"
    folder.mkdir(parents=True)
    (folder / "val.jsonl").write_text(
        '{"premise": "p", "hypothesis": "h", "label": "entailment", "idx": 0}\n'
        '{"premise": "p", "hypothesis": "h", "idx": 1}\n',
        encoding="utf-8",
    )
    with pytest.raises(TaskDataError) as err:
        get_task("rte").examples("eval", tmp_path)
    message = str(err.value)
    assert "val.jsonl, data row 2" in message and "RTE row idx=1: missing field 'label'" in message


def test_multirc_answer_without_label(tmp_path):
    folder = tmp_path / "superglue" / "MultiRC"
    folder.mkdir(parents=True)
    (folder / "val.jsonl").write_text(
        '{"idx": 0, "passage": {"text": "t", "questions": [{"question": "q", "idx": 0, '
        '"answers": [{"text": "a", "idx": 0}]}]}}\n',
        encoding="utf-8",
    )
    with pytest.raises(TaskDataError, match=r"data row 1: MultiRC row idx=.*missing field 'label'"):
        get_task("multirc").examples("eval", tmp_path)


def test_winogrande_official_jsonl(tmp_path):
    folder = tmp_path / "winogrande"
    folder.mkdir()
    (folder / "dev.jsonl").write_text(
        '{"qID": "a-1", "sentence": "Sam gave Kim a gift because _ was kind.", "option1": "Sam", '
        '"option2": "Kim", "answer": "1"}\n'
        '{"qID": "a-2", "sentence": "Sam thanked Kim because _ was kind.", "option1": "Sam", '
        '"option2": "Kim", "answer": "2"}\n',
        encoding="utf-8",
    )
    examples = get_task("winogrande").examples("eval", tmp_path)
    assert [ex.label for ex in examples] == [0, 1]
    assert examples[1].contexts == ("Sam thanked Kim because Sam", "Sam thanked Kim because Kim")
    assert examples[1].continuations == (" was kind.", " was kind.")
    (folder / "dev.jsonl").write_text(
        '{"qID": "a-3", "sentence": "_ ran.", "option1": "A", "option2": "B"}\n'
    )
    with pytest.raises(TaskDataError, match="WinoGrande row idx=a-3: missing field 'answer'"):
        get_task("winogrande").examples("eval", tmp_path)


def test_sst2_demo_loads_from_the_package_whatever_the_data_dir(tmp_path, data_dir):
    task = get_task("sst2-demo")
    assert task.path("train", tmp_path).parent == DEMO_DATA_DIR
    train, dev = task.examples("train", tmp_path), task.examples("eval", tmp_path)
    assert (len(train), len(dev)) == (512, 872)
    assert dev == get_task("sst2").examples("eval", data_dir)


def test_sst2_demo_sample_is_the_documented_one(data_dir):
    # The recipe written in registry.py's docstring.
    full = read_tsv(data_dir / "glue_sst2/train.tsv")
    picked = sorted(random.Random(0).sample(range(len(full)), 512))
    assert read_tsv(DEMO_DATA_DIR / "sst2_train_sample.tsv") == [full[i] for i in picked]


def test_hub_examples_use_the_hub_names_and_flat_rows(monkeypatch):
    calls = []

    def fake_hub(path, name, split):
        calls.append((path, name, split))
        return [{"paragraph": "P.", "question": "Q?", "answer": "A", "label": 1, "idx": {"answer": 0}}]

    monkeypatch.setattr("zo_scale.tasks.task.load_hub_rows", fake_hub)
    [example] = get_task("multirc").hub_examples("train")
    assert calls == [("aps/super_glue", "multirc", "train")]
    assert example.label == 1 and example.continuations == ("No", "Yes")
    assert get_task("wsc").hub.name == "wsc.fixed"
    assert get_task("sst2").hub.splits == {"train": "train", "eval": "validation"}
    with pytest.raises(ValueError, match="no hub dataset"):
        get_task("sst2-demo").hub_examples("eval")
