"""Readers for data files, each returning a list of dict rows.

GLUE ships TSV with a header row and no quoting (a sentence may hold a lone `"`), SuperGLUE and
WinoGrande ship JSONL. Users bring CSV (often from Excel, with a byte-order mark), JSON, Parquet and
folders written by `datasets`' ``save_to_disk``. Errors name the file and the line, because these files
are edited by hand; `read_located_rows` gives each row's place too, for errors found after reading.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from zo_scale.tasks.example import TaskDataError

# A row and where it is in its file: "line 8" (csv, tsv, jsonl), "item 3" (json, from 1) or
# "index 5" (parquet and `datasets` folders, from 0 like `dataset[5]`).
LocatedRow = tuple[str, dict]


@contextlib.contextmanager
def open_utf8(path: Path, **kwargs: Any) -> Iterator[IO[str]]:
    """``path`` opened as UTF-8 text, a leading byte-order mark dropped (Excel writes one); bytes that are
    not UTF-8, wherever they are read, raise a TaskDataError naming the file and the byte offset."""
    try:
        with open(path, encoding="utf-8-sig", **kwargs) as f:
            yield f
    except UnicodeDecodeError:
        # Text files decode in chunks, and the error counts its offset from the chunk's start; the whole file's
        # bytes give the offset in the file.
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise TaskDataError(
                f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
            ) from None
        raise  # the file changed while it was read


def _delimited(path: Path, **dialect: Any) -> list[LocatedRow]:
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
            rows.append((f"line {reader.line_num}", row))
    return rows


def _jsonl(path: Path) -> list[LocatedRow]:
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
            rows.append((f"line {line_no}", row))
    return rows


def _json(path: Path) -> list[LocatedRow]:
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
    return [(f"item {i}", row) for i, row in enumerate(rows, start=1)]


def _parquet(path: Path) -> list[LocatedRow]:
    import pyarrow.parquet  # lazy: comes with `datasets`, needed only for Parquet files

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise TaskDataError(f"{path}: cannot read it as Parquet ({err})") from err
    return [(f"index {i}", row) for i, row in enumerate(rows)]


def dataset_dict_splits(path: Path) -> list[str] | None:
    """The split names of a folder written by ``DatasetDict.save_to_disk`` (its dataset_dict.json lists
    them; each split is the subfolder of that name); None when `path` is not such a folder."""
    index = path / "dataset_dict.json"
    if not index.is_file():
        return None
    with open_utf8(index) as f:
        try:
            splits = json.load(f).get("splits")
        except (json.JSONDecodeError, AttributeError) as err:
            raise TaskDataError(f"{index}: not a DatasetDict index ({err}); save the dataset again") from err
    if not isinstance(splits, list) or not splits:
        raise TaskDataError(f"{index}: lists no splits; save the dataset again")
    return splits


def _saved_dataset(path: Path) -> list[LocatedRow]:
    splits = dataset_dict_splits(path)
    if splits is not None:
        raise TaskDataError(f"{path}: a DatasetDict folder with splits {splits}; name one split's folder, "
                            f"e.g. {path / splits[0]}")
    if not ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
        raise TaskDataError(f"{path}: a folder, but not one written by datasets' save_to_disk (it has no state.json "
                            "and dataset_info.json); give a data file or such a folder")
    import datasets  # lazy: heavy import, needed only for folders it wrote

    try:
        rows = datasets.load_from_disk(str(path)).to_list()
    except (OSError, ValueError) as err:
        raise TaskDataError(f"{path}: cannot read this datasets folder ({err}); save the dataset again") from err
    return [(f"index {i}", row) for i, row in enumerate(rows)]


_READERS: dict[str, Callable[[Path], list[LocatedRow]]] = {
    ".tsv": functools.partial(_delimited, delimiter="\t", quoting=csv.QUOTE_NONE),
    ".csv": _delimited,
    ".jsonl": _jsonl,
    ".json": _json,
    ".parquet": _parquet,
}


def read_located_rows(path: str | Path) -> list[LocatedRow]:
    """The rows of a data file, each with its place in the file (see `LocatedRow`). The format goes by
    the extension: .tsv (GLUE-style: a header row, tab-delimited, no quoting), .csv (a header row,
    "-quoting), .jsonl (one JSON object per line, blank lines skipped), .json (a list of row objects),
    .parquet; a folder must be one written by ``Dataset.save_to_disk``. Text is UTF-8, with or without
    a byte-order mark."""
    path = Path(path)
    if path.is_dir():
        return _saved_dataset(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise TaskDataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(_READERS)}, or a "
                            "folder written by datasets' save_to_disk")
    return reader(path)


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a data file or `datasets` folder, in the formats `read_located_rows` reads."""
    return _rows(read_located_rows, path)


def _rows(reader: Callable[[Path], list[LocatedRow]], path: str | Path) -> list[dict]:
    return [row for _, row in reader(Path(path))]


def read_tsv(path: str | Path) -> list[dict]:
    """GLUE-style TSV: a header row, tab-delimited, no quoting."""
    return _rows(_READERS[".tsv"], path)


def read_csv(path: str | Path) -> list[dict]:
    """Ordinary CSV with a header row and "-quoting."""
    return _rows(_READERS[".csv"], path)


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per line; blank lines are skipped."""
    return _rows(_jsonl, path)


def read_json(path: str | Path) -> list[dict]:
    """A JSON file holding a list of row objects."""
    return _rows(_json, path)


def load_hub_rows(path: str, name: str | None, split: str) -> list[dict]:
    """Rows of a dataset on the Hugging Face hub (needs network or a warm cache)."""
    import datasets  # lazy: heavy import, and only needed by users who have the hub

    return [dict(row) for row in datasets.load_dataset(path, name, split=split)]
