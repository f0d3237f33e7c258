"""YAML and JSON parsed strictly: a key written twice in one mapping is an error.

PyYAML and ``json`` both keep the last of two equal keys without a word, so a config or task file
edited by hand (a section pasted twice, a key set again further down) would silently lose the first.
Callers turn :class:`DuplicateKeyError` into their own error type (a config or a task-file error).
"""

from __future__ import annotations

import json
from typing import Any

import yaml


class DuplicateKeyError(ValueError):
    """A key given twice in one mapping; the message names the key (and, for YAML, both lines)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen and key != "<<":  # '<<' merges another mapping in: not a key of this one
                raise DuplicateKeyError(f"{self.name}, line {line}: key {key!r} is given twice (first on line "
                                        f"{seen[key]}); keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, name: str) -> Any:
    """The YAML document ``text`` (safe types only); ``name`` (its file) heads the messages. Raises
    ``yaml.YAMLError`` for invalid YAML, DuplicateKeyError for a key given twice in one mapping."""
    loader = _UniqueKeyLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_json(text: str) -> Any:
    """The JSON document ``text``. Raises ``json.JSONDecodeError`` for invalid JSON, DuplicateKeyError for a
    key given twice in one object."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise DuplicateKeyError(f"key(s) {twice} given twice in one object; keep one of each")
        return dict(pairs)

    return json.loads(text, object_pairs_hook=unique)
