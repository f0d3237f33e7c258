"""SQuAD and DROP readers, answer rendering and prompt templates, on the demo files and hand-made rows."""

import json
from pathlib import Path

import pytest

from zo_scale.tasks import TaskDataError
from zo_scale.tasks.generation import (
    GenerationExample,
    drop,
    drop_answer_text,
    drop_rows,
    read_drop,
    read_squad,
    squad,
    squad_rows,
)

DEMO = Path(__file__).parents[2] / "zo_scale" / "demo_data"
SQUAD_DEMO, DROP_DEMO = DEMO / "squad_demo.json", DEMO / "drop_demo.json"


def test_squad_demo_rows_and_fields():
    rows = read_squad(SQUAD_DEMO)
    assert len(rows) == 30
    assert all(set(row) == {"id", "title", "context", "question", "answers"} for row in rows)
    assert len({row["id"] for row in rows}) == 30
    assert len({row["title"] for row in rows}) == 6
    assert sum(len(row["answers"]) > 1 for row in rows) >= 5
    first = rows[0]
    assert first["title"] == "Marrowby" and first["question"] == "When was Marrowby founded?"
    assert first["answers"] == ["1412"]


def test_squad_demo_answer_offsets_point_at_the_answer_text():
    doc = json.loads(SQUAD_DEMO.read_text(encoding="utf-8"))
    assert doc["version"] == "1.1"
    checked = 0
    for article in doc["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                for answer in qa["answers"]:
                    start, text = answer["answer_start"], answer["text"]
                    assert context[start : start + len(text)] == text, (qa["id"], text)
                    checked += 1
    assert checked > 30


def test_squad_template_renders_mezo_prompt():
    row = read_squad(SQUAD_DEMO)[1]
    ex = squad(row)
    assert ex.prompt == (
        f"Title: Marrowby\nContext: {row['context']}\nQuestion: Which river is Marrowby on?\nAnswer:"
    )
    assert ex.answers == ("the Tessel River", "Tessel River")
    assert ex.target == " the Tessel River"


def test_squad_hub_row_matches_official_row():
    official = read_squad(SQUAD_DEMO)[3]
    hub = {**official, "answers": {"text": official["answers"], "answer_start": [248, 251]}}
    assert squad(hub) == squad(official)


def test_squad_answers_are_stripped_and_deduplicated():
    row = {"id": "q", "title": "T", "context": "C", "question": "Q?", "answers": [" red ", "red", "a red"]}
    assert squad(row).answers == ("red", "a red")


def test_drop_demo_rows():
    rows = read_drop(DROP_DEMO)
    assert len(rows) == 13
    assert all(set(row) == {"id", "passage", "question", "answers"} for row in rows)
    by_id = {row["id"]: row["answers"] for row in rows}
    assert by_id["hist-1"] == ["50"]  # answer and validated answer agree: one gold
    assert by_id["hist-2"] == ["12 March 1611"]  # date
    assert by_id["hist-4"] == ["Saturday market", "the Saturday market"]  # answer, then validated
    assert by_id["match-4"] == ["Owen Hale Sam Kettle"]  # two spans, one text
    assert by_id["census-3"] == ["1800", "1,800"]
    assert by_id["census-4"] == ["1974"]  # a date with only the year


def test_drop_answer_text_precedence():
    date = {"day": "4", "month": "May", "year": "1974"}
    assert drop_answer_text({"number": "7", "date": date, "spans": ["x"]}) == "7"
    assert drop_answer_text({"number": "", "date": date, "spans": ["a", " b "]}) == "a b"
    assert drop_answer_text({"number": "", "date": date, "spans": []}) == "4 May 1974"
    assert drop_answer_text({"number": "", "date": {"day": "", "month": "May", "year": "1974"}, "spans": []}) == (
        "May 1974"
    )
    assert drop_answer_text({"number": " ", "date": {"day": "", "month": "", "year": ""}, "spans": [""]}) == ""


def test_drop_template_official_and_hub_rows():
    official = read_drop(DROP_DEMO)[5]
    ex = drop(official)
    question = "Who caught the touchdown pass from Lee Brant?"
    assert ex.prompt == f"Passage: {official['passage']}\nQuestion: {question}\nAnswer:"
    assert ex.answers == ("Owen Hale",)
    hub = {
        "section_id": "demo_match_1",
        "query_id": "match-2",
        "passage": official["passage"],
        "question": official["question"],
        "answers_spans": {"spans": ["Owen Hale"], "types": ["span"]},
    }
    assert drop(hub) == ex


def test_generation_example_validation():
    assert GenerationExample("Q:", ["a", "b"]).answers == ("a", "b")
    with pytest.raises(ValueError, match="at least one"):
        GenerationExample("Q:", [])
    with pytest.raises(ValueError, match="answer 1 is empty"):
        GenerationExample("Q:", ["a", "  "])
    with pytest.raises(ValueError, match="sequence of str"):
        GenerationExample("Q:", "abc")
    assert GenerationExample("Answer:\n", ["x"]).target == "x"


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"version": "1.1",\n "data": [\n  {"title": "x",,}\n ]}\n', encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"bad\.json, line 3: malformed JSON"):
        read_squad(path)
    with pytest.raises(TaskDataError, match=r"bad\.json, line 3: malformed JSON"):
        read_drop(path)


def test_drop_question_without_any_answer_names_passage_and_query(tmp_path):
    empty = {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": []}
    doc = {"p7": {"passage": "P.", "qa_pairs": [{"query_id": "q9", "question": "Q?", "answer": empty,
                                                  "validated_answers": [empty]}]}}
    path = tmp_path / "drop.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"drop\.json, passage p7, query q9: no non-empty answer"):
        read_drop(path)


def test_squad_question_without_answers_names_the_id():
    doc = {"data": [{"title": "T", "paragraphs": [{"context": "C", "qas": [
        {"id": "q1", "question": "Q?", "answers": []}]}]}]}
    (row,) = squad_rows(doc)
    with pytest.raises(TaskDataError, match=r"SQuAD row id=q1: no non-empty answer"):
        squad(row)


def test_missing_question_names_the_field():
    doc = {"data": [{"title": "T", "paragraphs": [{"context": "C", "qas": [{"id": "q1", "answers": []}]}]}]}
    with pytest.raises(TaskDataError, match=r"paragraph 0.*row id=q1: missing field 'question'"):
        squad_rows(doc)
    row = {"id": "q2", "passage": "P.", "answers": ["x"]}
    with pytest.raises(TaskDataError, match=r"DROP row id=q2: missing field 'question'"):
        drop(row)
    with pytest.raises(TaskDataError, match=r"field 'context' should be text"):
        squad({"id": "q3", "title": "T", "context": 5, "question": "Q?", "answers": ["x"]})


def test_wrong_top_level_shapes():
    with pytest.raises(TaskDataError, match="'data' list"):
        squad_rows({"version": "1.1"})
    with pytest.raises(TaskDataError, match="passages keyed by id"):
        drop_rows([{"passage": "P."}])
    with pytest.raises(TaskDataError, match="'spans' should be a list"):
        drop_rows({"p": {"passage": "P.", "qa_pairs": [{"query_id": "q", "question": "Q?",
                                                         "answer": {"number": "", "spans": "Ann"}}]}})
