"""User-defined tasks from a YAML or JSON file.

    name: my_sentiment
    train_file: data/train.jsonl      # .jsonl, .json (list of rows), .tsv or .csv; relative to this file
    eval_file: data/test.jsonl        # may be the train file: the sampler then keeps the splits disjoint
    template: "Review: {text}\\nSentiment:"   # {field} placeholders filled from the row
    label_field: label
    label_words: {positive: " good", negative: " bad"}   # label value -> continuation; OR
    # candidates_field: choices       # a row field listing the continuations; label_field holds the index

Label values are matched as strings, so a row label 1 matches the YAML key "1" (and JSON, whose keys are
always strings). Beware that YAML reads bare yes/no/on/off as booleans: quote such keys.
Continuations follow the templates' rule: a leading space unless the prompt ends in whitespace.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zo_scale.tasks.example import Example, TaskDataError
from zo_scale.tasks.loaders import open_utf8
from zo_scale.tasks.task import Task
from zo_scale.tasks.templates import continuation

_REQUIRED = ("name", "train_file", "eval_file", "template", "label_field")
_OPTIONAL = ("label_words", "candidates_field")


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
        missing = [f for f in (*self.fields, self.label_field) if row.get(f) is None]
        if missing:
            raise TaskDataError(f"{self.where}: row has no field(s) {missing} (row has {sorted(row)})")
        context = self.template.format_map(row)
        label = row[self.label_field]
        if self.label_words is not None:
            words = list(self.label_words.values())
            keys = list(self.label_words)
            if str(label) not in keys:
                raise TaskDataError(f"{self.where}: label {label!r} is not in label_words {keys}")
            index = keys.index(str(label))
        else:
            words = row.get(self.candidates_field)
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise TaskDataError(
                    f"{self.where}: field {self.candidates_field!r} should be a list of strings"
                )
            index = _as_index(label)
            if index is None or not 0 <= index < len(words):
                raise TaskDataError(
                    f"{self.where}: label {label!r} is not an index into the {len(words)} candidates"
                )
        return Example(
            contexts=(context,) * len(words),
            continuations=tuple(continuation(context, w) for w in words),
            label=index,
        )


def _as_index(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
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
        try:
            config = json.load(f) if path.suffix.lower() == ".json" else yaml.safe_load(f)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise TaskDataError(f"{path}: cannot parse task definition ({err})") from err
    if not isinstance(config, dict):
        raise TaskDataError(f"{path}: task definition must be a mapping of keys, got {type(config).__name__}")
    return config


def load_custom_task(path: str | Path) -> Task:
    """Load and check a user-defined task; its data files are read later, by Task.examples."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task definition {path} not found")
    config = _read_config(path)
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
    return Task(
        name=config["name"],
        template=template,
        files={"train": config["train_file"], "eval": config["eval_file"]},
        root=path.resolve().parent,
    )
