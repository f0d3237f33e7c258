"""Readers for the official data formats, each returning a list of dict rows.

GLUE ships TSV with a header row and no quoting (a sentence may hold a lone `"`), SuperGLUE and
WinoGrande ship JSONL. Errors name the file and the line, because these files are edited by hand.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from zo_scale.tasks.example import TaskDataError


@contextlib.contextmanager
def open_utf8(path: Path, **kwargs: Any) -> Iterator[IO[str]]:
    """``path`` opened as UTF-8 text; bytes that are not UTF-8, wherever they are read, raise a
    TaskDataError naming the file and the byte offset."""
    try:
        with open(path, encoding="utf-8", **kwargs) as f:
            yield f
    except UnicodeDecodeError as err:
        raise TaskDataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None


def _read_delimited(path: Path, **dialect: Any) -> list[dict]:
    with open_utf8(path, newline="") as f:
        reader = csv.DictReader(f, **dialect)
        if not reader.fieldnames:
            raise TaskDataError(f"{path}: empty file, expected a header row")
        rows = []
        for row in reader:
            # DictReader files surplus fields under the key None and fills missing ones with None.
            if None in row or None in row.values():
                raise TaskDataError(
                    f"{path}, line {reader.line_num}: expected {len(reader.fieldnames)} fields "
                    f"({', '.join(reader.fieldnames)})"
                )
            rows.append(row)
    return rows


def read_tsv(path: str | Path) -> list[dict]:
    """GLUE-style TSV: a header row, tab-delimited, no quoting."""
    return _read_delimited(Path(path), delimiter="\t", quoting=csv.QUOTE_NONE)


def read_csv(path: str | Path) -> list[dict]:
    """Ordinary CSV with a header row and "-quoting."""
    return _read_delimited(Path(path))


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per line; blank lines are skipped."""
    path = Path(path)
    rows = []
    with open_utf8(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskDataError(f"{path}, line {line_no}: malformed JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise TaskDataError(
                    f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    return rows


def read_json(path: str | Path) -> list[dict]:
    """A JSON file holding a list of row objects."""
    path = Path(path)
    with open_utf8(path) as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as err:
            raise TaskDataError(f"{path}, line {err.lineno}: malformed JSON ({err.msg})") from err
    if not isinstance(rows, list):
        raise TaskDataError(f"{path}: expected a JSON list of row objects, got {type(rows).__name__}")
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}, item {i}: expected a JSON object, got {type(row).__name__}")
    return rows


_READERS = {".tsv": read_tsv, ".csv": read_csv, ".jsonl": read_jsonl, ".json": read_json}


def read_rows(path: str | Path) -> list[dict]:
    """Read a data file, choosing the format by its extension (.tsv, .csv, .jsonl, .json)."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise TaskDataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(_READERS)}")
    return reader(path)


def load_hub_rows(path: str, name: str | None, split: str) -> list[dict]:
    """Rows of a dataset on the Hugging Face hub (needs network or a warm cache)."""
    import datasets  # lazy: heavy import, and only needed by users who have the hub

    return [dict(row) for row in datasets.load_dataset(path, name, split=split)]
