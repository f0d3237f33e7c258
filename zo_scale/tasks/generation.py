"""Generation tasks (SQuAD v1.1, DROP): the example type, readers of the official JSON files, and MeZO's prompts.

A generation example is a prompt and its gold answers. Training scores ``answers[0]`` after the prompt
with the LM loss; evaluation decodes greedily and compares the text against every gold answer
(exact match and token F1, see ``zo_scale.tasks.answer_metrics``).

The official files nest their questions (SQuAD: articles > paragraphs > qas; DROP: passages > qa_pairs),
so each reader flattens them into one row per question. The templates also take the hub's rows,
which are flat already: ``squad`` rows carry ``answers: {"text": [...], "answer_start": [...]}`` and
``ucinlp/drop`` rows carry ``answers_spans: {"spans": [...], "types": [...]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zo_scale.tasks.example import TaskDataError
from zo_scale.tasks.loaders import open_utf8
from zo_scale.tasks.templates import _field, _row_ref, _text, _typed, continuation


@dataclass(frozen=True)
class GenerationExample:
    """One question to answer in free text: ``prompt`` followed by any of ``answers`` is correct."""

    prompt: str
    answers: tuple[str, ...]  # the gold answers, the first one being the training target

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"GenerationExample prompt is {type(self.prompt).__name__}, not str")
        if isinstance(self.answers, str):  # a bare string would pass as a sequence of one-letter answers
            raise ValueError(f"GenerationExample answers should be a sequence of str, got the str {self.answers!r}")
        # Accept any sequence but store a tuple, so examples stay hashable and immutable.
        object.__setattr__(self, "answers", tuple(self.answers))
        if not self.answers:
            raise ValueError("GenerationExample needs at least one gold answer")
        for i, answer in enumerate(self.answers):
            if not isinstance(answer, str):
                raise ValueError(f"GenerationExample answer {i} is {type(answer).__name__}, not str")
            if not answer.strip():
                raise ValueError(f"GenerationExample answer {i} is empty")

    @property
    def target(self) -> str:
        """The continuation the LM loss scores: ``answers[0]`` with the space rule of
        ``templates.continuation``, e.g. "...\\nAnswer:" + " 1412"."""
        return continuation(self.prompt, self.answers[0])


# ---- field access; messages name the task, the row's id and the field ----


def _gold(task: str, row: dict, texts: Any, key: str) -> tuple[str, ...]:
    """The distinct non-empty answer texts, stripped, in their first-seen order."""
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise TaskDataError(f"{task} {_row_ref(row)}: {key} should be a list of texts, got {texts!r}")
    golds = tuple(dict.fromkeys(t.strip() for t in texts if t.strip()))
    if not golds:
        raise TaskDataError(f"{task} {_row_ref(row)}: no non-empty answer in {key} {texts!r}")
    return golds


# ---- readers ----


def _load_json(path: Path) -> Any:
    with open_utf8(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise TaskDataError(f"{path}, line {err.lineno}: malformed JSON ({err.msg})") from err


def squad_rows(doc: dict, source: str = "SQuAD") -> list[dict]:
    """One flat row ``{"id", "title", "context", "question", "answers": [texts]}`` per question of a
    parsed SQuAD v1.1 document ``{"version", "data": [{"title", "paragraphs": [{"context", "qas"}]}]}``.
    ``source`` (e.g. the file name) starts every error message."""
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise TaskDataError(f"{source}: expected a SQuAD object with a 'data' list of articles")
    rows = []
    for a, article in enumerate(doc["data"]):
        where = f"{source}, article {a}"
        title = _text(where, article, "title")
        for p, paragraph in enumerate(_typed(where, article, "paragraphs", list, "a list")):
            where = f"{source}, article {a} ({title!r}), paragraph {p}"
            context = _text(where, paragraph, "context")
            for qa in _typed(where, paragraph, "qas", list, "a list"):
                answers = _typed(where, qa, "answers", list, "a list")
                rows.append({
                    "id": _field(where, qa, "id"),
                    "title": title,
                    "context": context,
                    "question": _text(where, qa, "question"),
                    "answers": [_text(f"{where}, qa {_row_ref(qa)} answer", ans, "text") for ans in answers],
                })
    return rows


def read_squad(path: str | Path) -> list[dict]:
    """The questions of an official SQuAD v1.1 JSON file, as flat rows (see ``squad_rows``)."""
    path = Path(path)
    return squad_rows(_load_json(path), source=str(path))


def drop_answer_text(answer: dict, where: str = "DROP answer") -> str:
    """One DROP answer ``{"number", "date": {"day", "month", "year"}, "spans"}`` as text: the number when
    set, else the spans joined by spaces, else the date as "day month year" without its empty parts;
    "" when all are empty."""
    if not isinstance(answer, dict):
        raise TaskDataError(f"{where}: expected an answer object, got {answer!r}")
    number, spans, date = answer.get("number", ""), answer.get("spans", []), answer.get("date", {})
    if not isinstance(number, str):
        raise TaskDataError(f"{where}: 'number' should be text, got {number!r}")
    if not isinstance(spans, list) or not all(isinstance(s, str) for s in spans):
        raise TaskDataError(f"{where}: 'spans' should be a list of texts, got {spans!r}")
    if not isinstance(date, dict) or not all(isinstance(date.get(k, ""), str) for k in ("day", "month", "year")):
        raise TaskDataError(f"{where}: 'date' should be an object of texts day, month, year, got {date!r}")
    if number.strip():
        return number.strip()
    if any(s.strip() for s in spans):
        return " ".join(s.strip() for s in spans if s.strip())
    return " ".join(date.get(k, "").strip() for k in ("day", "month", "year") if date.get(k, "").strip())


def drop_rows(doc: dict, source: str = "DROP") -> list[dict]:
    """One flat row ``{"id", "passage", "question", "answers": [texts]}`` per question of a parsed DROP
    document ``{passage_id: {"passage", "qa_pairs": [{"query_id", "question", "answer",
    "validated_answers"}]}}``. The answers are ``answer`` then ``validated_answers``, rendered by
    ``drop_answer_text``, deduplicated in order, empty ones dropped; a question left with none is an error."""
    if not isinstance(doc, dict):
        raise TaskDataError(f"{source}: expected a DROP object of passages keyed by id, got {type(doc).__name__}")
    rows = []
    for passage_id, entry in doc.items():
        where = f"{source}, passage {passage_id}"
        passage = _text(where, entry, "passage")
        for qa in _typed(where, entry, "qa_pairs", list, "a list"):
            query_id = _field(where, qa, "query_id")
            here = f"{where}, query {query_id}"
            validated = qa.get("validated_answers") or []
            if not isinstance(validated, list):
                raise TaskDataError(f"{here}: 'validated_answers' should be a list, got {validated!r}")
            texts = [drop_answer_text(a, f"{here} answer") for a in [_field(here, qa, "answer"), *validated]]
            answers = list(dict.fromkeys(t for t in texts if t))
            if not answers:
                raise TaskDataError(f"{here}: no non-empty answer (number, spans and date are all empty)")
            rows.append({"id": query_id, "passage": passage, "question": _text(here, qa, "question"),
                         "answers": answers})
    return rows


def read_drop(path: str | Path) -> list[dict]:
    """The questions of an official DROP JSON file, as flat rows (see ``drop_rows``)."""
    path = Path(path)
    return drop_rows(_load_json(path), source=str(path))


# ---- MeZO's templates ----


def squad(row: dict) -> GenerationExample:
    """A SQuAD row, from ``read_squad`` (answers: list of texts) or the hub (answers: {"text": [...]})."""
    title, context, question = (_text("SQuAD", row, k) for k in ("title", "context", "question"))
    answers = _field("SQuAD", row, "answers")
    key = "answers"
    if isinstance(answers, dict):  # the hub's layout; a missing "text" is reported by _gold
        answers, key = answers.get("text"), "answers['text']"
    prompt = f"Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:"
    return GenerationExample(prompt, _gold("SQuAD", row, answers, key))


def drop(row: dict) -> GenerationExample:
    """A DROP row, from ``read_drop`` (answers: list of texts) or ``ucinlp/drop`` (answers_spans: {"spans": [...]})."""
    passage, question = _text("DROP", row, "passage"), _text("DROP", row, "question")
    if row.get("answers") is None and isinstance(row.get("answers_spans"), dict):  # the hub's layout
        answers, key = row["answers_spans"].get("spans"), "answers_spans['spans']"
    else:
        answers, key = _field("DROP", row, "answers"), "answers"
    prompt = f"Passage: {passage}\nQuestion: {question}\nAnswer:"
    return GenerationExample(prompt, _gold("DROP", row, answers, key))
