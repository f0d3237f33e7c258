import json

import pytest

from zo_scale.tasks import TaskDataError, read_csv, read_json, read_jsonl, read_rows, read_tsv


def test_tsv_keeps_quotes_and_trailing_spaces(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\na "quoted title \t1\nplain \t0\n', encoding="utf-8")
    assert read_tsv(path) == [
        {"sentence": 'a "quoted title ', "label": "1"},
        {"sentence": "plain ", "label": "0"},
    ]


@pytest.mark.parametrize("body", ["only one field\n", "a\t1\textra\n"])
def test_tsv_wrong_field_count_names_file_and_line(tmp_path, body):
    path = tmp_path / "bad.tsv"
    path.write_text("sentence\tlabel\nfine\t1\n" + body, encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"bad\.tsv, line 3: expected 2 fields"):
        read_tsv(path)


def test_csv_uses_quoting(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('text,label\n"hello, world",pos\n', encoding="utf-8")
    assert read_csv(path) == [{"text": "hello, world", "label": "pos"}]


def test_jsonl_skips_blank_lines_and_names_malformed_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert read_jsonl(good) == [{"a": 1}, {"a": 2}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"bad\.jsonl, line 2: malformed JSON"):
        read_jsonl(bad)
    not_object = tmp_path / "list.jsonl"
    not_object.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"line 1: expected a JSON object, got list"):
        read_jsonl(not_object)


def test_json_list(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2}]), encoding="utf-8")
    assert read_json(path) == [{"a": 1}, {"a": 2}]
    path.write_text(json.dumps({"a": 1}), encoding="utf-8")
    with pytest.raises(TaskDataError, match="expected a JSON list"):
        read_json(path)


def test_read_rows_dispatches_on_extension(tmp_path):
    path = tmp_path / "rows.JSONL"
    path.write_text('{"a": 1}\n', encoding="utf-8")
    assert read_rows(path) == [{"a": 1}]
    with pytest.raises(TaskDataError, match=r"unsupported file type '\.txt'"):
        read_rows(tmp_path / "rows.txt")


def test_bytes_that_are_not_utf8_are_named_by_their_offset_in_the_file(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"text,label\n" + b"a" * 20000 + b",1\n\xff,0\n")  # far past the text layer's first chunk
    with pytest.raises(TaskDataError, match=r"rows\.csv: not UTF-8 text \(invalid start byte at byte 20014\)"):
        read_csv(path)
