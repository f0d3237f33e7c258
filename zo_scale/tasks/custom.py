"""User-defined tasks from a YAML or JSON file.

    name: my_sentiment
    train_file: data/train.jsonl      # a data file or `datasets` folder (see below); relative to this file
    eval_file: data/test.jsonl        # may be the train file: the sampler then keeps the splits disjoint
    template: "Review: {text}\\nSentiment:"   # {field} placeholders filled from the row
    label_field: label
    label_words: {positive: " good", negative: " bad"}   # label value -> continuation; OR
    # candidates_field: choices       # a row field listing the continuations; label_field holds the index

A reward task (trained on a reward of the model's continuation, see docs/rewards.md) gives ``reward`` instead
of the label keys: the template renders the prompt, and the reward (a built-in, or ``module:function``
importable from the working directory or this file's folder) reads the row's fields::

    name: my_puzzles
    train_file: data/train.jsonl
    eval_file: data/test.jsonl
    template: "Question: {question}\nAnswer:"
    reward: my_rewards:score          # score(prompt, completion, row) -> float

Data files: .csv, .tsv, .jsonl, .json (a list of rows) or .parquet, text in UTF-8 (a byte-order mark, as
Excel writes, is dropped); or a folder written by `datasets`' ``save_to_disk``. A ``Dataset`` folder is read
whole. A ``DatasetDict`` folder is read one split at a time: ``folder/<split>`` names any split; the folder
itself means its only split if it has one, else train_file reads "train" and eval_file "validation", or
"test" when there is no "validation". Any other choice is an error listing the splits.

Label values are matched as strings, so a row label 1 matches the YAML key "1" (and JSON, whose keys are
always strings), and so do 1.0 and "1.0" (pandas writes an integer column holding a gap as floats).
Beware that YAML reads bare yes/no/on/off as booleans: quote such keys. A row without its label, or with
an empty one, is an error naming the file and the row.
Continuations follow the templates' rule: a leading space unless the prompt ends in whitespace.
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zo_scale.strict_files import DuplicateKeyError, parse_json, parse_yaml
from zo_scale.tasks.example import Example, TaskDataError
from zo_scale.tasks.loaders import dataset_dict_splits, open_utf8, read_located_rows
from zo_scale.tasks.rewards import RewardExample
from zo_scale.tasks.task import Task
from zo_scale.tasks.templates import continuation

_REQUIRED = ("name", "train_file", "eval_file", "template", "label_field")
_OPTIONAL = ("label_words", "candidates_field")
_REWARD_KEYS = ("name", "train_file", "eval_file", "template", "reward")  # a reward task: all required
# The split of a DatasetDict folder that train_file / eval_file read when the folder has several.
_DICT_SPLITS = {"train": ("train",), "eval": ("validation", "test")}


@dataclass(frozen=True)
class _CustomTemplate:
    """Renders rows of a custom task; `where` names the task and its definition file in errors."""

    where: str
    template: str
    fields: tuple[str, ...]
    label_field: str
    label_words: dict[str, str] | None
    candidates_field: str | None

    def __call__(self, row: dict) -> Example:
        _check_fields(self.where, self.fields, row)
        if self.label_field not in row:
            raise TaskDataError(f"{self.where}: the row has no label field {self.label_field!r} (it has "
                                f"{sorted(row)})")
        label = row[self.label_field]
        if _is_null(label) or (isinstance(label, str) and not label.strip()):
            raise TaskDataError(f"{self.where}: the label field {self.label_field!r} is empty; fill it in or "
                                "drop the row")
        context = self.template.format_map(row)
        if self.label_words is not None:
            words = list(self.label_words.values())
            keys = list(self.label_words)
            key = str(label)
            if key not in self.label_words and (number := _as_int(label)) is not None:
                key = str(number)
            if key not in self.label_words:
                raise TaskDataError(f"{self.where}: label {label!r} is not in label_words {keys}")
            index = keys.index(key)
        else:
            words = row.get(self.candidates_field)
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise TaskDataError(
                    f"{self.where}: field {self.candidates_field!r} should be a list of strings"
                )
            index = _as_int(label)
            if index is None or not 0 <= index < len(words):
                raise TaskDataError(
                    f"{self.where}: label {label!r} is not an index into the {len(words)} candidates"
                )
        return Example(
            contexts=(context,) * len(words),
            continuations=tuple(continuation(context, w) for w in words),
            label=index,
        )


@dataclass(frozen=True)
class _RewardTemplate:
    """Renders a reward task's rows: the prompt from the template, the row kept whole for the reward."""

    where: str
    template: str
    fields: tuple[str, ...]

    def __call__(self, row: dict) -> RewardExample:
        _check_fields(self.where, self.fields, row)
        return RewardExample(self.template.format_map(row), row)


class CustomTask(Task):
    """A user-defined task. It reads its files itself, so that a row's error names its line (or item) and
    so that a file may be a `datasets` folder (see the module docstring for which split is read)."""

    def path(self, split: str, data_dir: str | Path | None = None) -> Path:
        """The file or `datasets` folder holding `split`; for a DatasetDict folder, its split's subfolder."""
        path = super().path(split, data_dir)
        splits = dataset_dict_splits(path)
        return path if splits is None else path / _dict_split(path, splits, split)

    def examples(self, split: str, data_dir: str | Path | None = None) -> list[Example]:
        """All Examples of `split`; an error in a row names the file and the row."""
        path = self.path(split, data_dir)
        if not path.exists():
            return super().examples(split, data_dir)  # raises the not-found error, saying where files are looked for
        examples = []
        for where, row in read_located_rows(path):
            try:
                examples.append(self.template(row))
            except ValueError as err:
                raise TaskDataError(f"{path}, {where}: {err}") from err
        return examples


def _dict_split(folder: Path, splits: list[str], split: str) -> str:
    if len(splits) == 1:
        return splits[0]
    for name in _DICT_SPLITS[split]:
        if name in splits:
            return name
    raise TaskDataError(
        f"{folder}: a DatasetDict folder with splits {splits}, none of them {' or '.join(_DICT_SPLITS[split])}, "
        f"so {split}_file does not say which to read; name the split's folder, e.g. {folder.name}/{splits[0]}"
    )


def _check_fields(where: str, fields: tuple[str, ...], row: dict) -> None:
    """Every template field of ``row`` is there and not null; else a TaskDataError naming the field."""
    for field in fields:
        if _is_null(row.get(field)):
            state = "null" if field in row else "missing"
            raise TaskDataError(f"{where}: the template's field {field!r} is {state} (the row has {sorted(row)}); "
                                "fill it in or drop the row")


def _is_null(value: Any) -> bool:
    """Absent, JSON null, or NaN (a gap in a pandas float column)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_int(value: Any) -> int | None:
    """`value` as an int when it is one: 1, "1", and the 1.0 and "1.0" pandas writes for an integer column
    with a gap; None for anything else (1.5, "one", True)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _placeholders(template: str, config: Path) -> tuple[str, ...]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise TaskDataError(f"{config}: template is not a valid format string ({err})") from err
    fields = tuple(name for _, name, _, _ in parsed if name is not None)
    bad = [name for name in fields if not name.isidentifier()]
    if bad:
        raise TaskDataError(
            f"{config}: template placeholders must be plain field names like {{text}}, got {bad}"
        )
    return fields


def _read_config(path: Path) -> dict:
    with open_utf8(path) as f:
        text = f.read()
    try:
        config = parse_json(text) if path.suffix.lower() == ".json" else parse_yaml(text, str(path))
    except DuplicateKeyError as err:
        raise TaskDataError(f"{path}: {err}" if path.suffix.lower() == ".json" else str(err)) from None
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise TaskDataError(f"{path}: cannot parse task definition ({err})") from err
    if not isinstance(config, dict):
        raise TaskDataError(f"{path}: task definition must be a mapping of keys, got {type(config).__name__}")
    return config


def load_custom_task(path: str | Path) -> CustomTask:
    """Load and check a user-defined task; its data files are read later, by CustomTask.examples."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task definition {path} not found")
    config = _read_config(path)
    if "reward" in config:
        return _reward_task(config, path)
    unknown = sorted(set(config) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise TaskDataError(f"{path}: unknown key(s) {unknown}; allowed: {[*_REQUIRED, *_OPTIONAL]}")
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise TaskDataError(f"{path}: missing required key(s) {missing}")
    not_text = [
        key for key in (*_REQUIRED, "candidates_field") if key in config and not isinstance(config[key], str)
    ]
    if not_text:
        raise TaskDataError(f"{path}: key(s) {not_text} must be strings")
    if ("label_words" in config) == ("candidates_field" in config):
        raise TaskDataError(f"{path}: give exactly one of label_words or candidates_field")
    label_words = config.get("label_words")
    if label_words is not None:
        if not isinstance(label_words, dict) or len(label_words) < 2:
            raise TaskDataError(f"{path}: label_words must map at least 2 label values to continuations")
        if not all(isinstance(w, str) and w.strip() for w in label_words.values()):
            raise TaskDataError(f"{path}: every label_words value must be non-empty text")
        if len(set(label_words.values())) != len(label_words):
            raise TaskDataError(f"{path}: label_words gives the same continuation to two labels")
        as_text = {str(key): word for key, word in label_words.items()}
        if len(as_text) != len(label_words):
            raise TaskDataError(f"{path}: label_words has two keys with the same text, e.g. 1 and '1'")
        label_words = as_text
    template = _CustomTemplate(
        where=f"task {config['name']!r} ({path})",
        template=config["template"],
        fields=_placeholders(config["template"], path),
        label_field=config["label_field"],
        label_words=label_words,
        candidates_field=config.get("candidates_field"),
    )
    return CustomTask(
        name=config["name"],
        template=template,
        files={"train": config["train_file"], "eval": config["eval_file"]},
        root=path.resolve().parent,
    )


def _reward_task(config: dict, path: Path) -> CustomTask:
    """A reward task's definition (``reward`` given: no label keys), checked."""
    unknown = sorted(set(config) - set(_REWARD_KEYS))
    if unknown:
        raise TaskDataError(f"{path}: unknown key(s) {unknown} for a reward task (it has a reward, no labels); "
                            f"allowed: {list(_REWARD_KEYS)}")
    missing = [key for key in _REWARD_KEYS if key not in config]
    if missing:
        raise TaskDataError(f"{path}: missing required key(s) {missing}")
    not_text = [key for key in _REWARD_KEYS if not isinstance(config[key], str)]
    if not_text:
        raise TaskDataError(f"{path}: key(s) {not_text} must be strings")
    template = _RewardTemplate(f"task {config['name']!r} ({path})", config["template"],
                               _placeholders(config["template"], path))
    return CustomTask(name=config["name"], template=template, kind="reward", reward=config["reward"],
                      files={"train": config["train_file"], "eval": config["eval_file"]}, root=path.resolve().parent)
