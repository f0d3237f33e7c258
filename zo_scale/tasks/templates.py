"""MeZO's prompt templates (Malladi et al. 2023, large_models/templates.py) as functions row -> Example.

Rows come either from the official files (SuperGLUE JSONL, GLUE TSV) or from the hub datasets. Labels
are accepted in both spellings: the official value ("entailment", true, "1") or the hub's ClassLabel
index (0, 1, ...), which lists the classes in the same order as our options.

MultiRC passages are kept as they are: the copy in shared/data has no HTML, and MeZO does not strip the
`<b>Sent 1: </b>`/`<br>` markup that other copies carry either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from zo_scale.tasks.example import Example, TaskDataError


def continuation(context: str, text: str) -> str:
    """The scored text of an option: a leading space only when the context does not already end in
    whitespace, so "...It was" + " great" but "...Yes or No?\\n" + "Yes" (as MeZO renders them)."""
    text = text.lstrip()
    if not context or context[-1].isspace():
        return text
    return " " + text


def _row_ref(row: dict) -> str:
    """How an error names a row: by its id field (SuperGLUE's idx, WinoGrande's qID, SQuAD's id, DROP's
    query_id), else just "row"."""
    key = next((k for k in ("idx", "qID", "id", "query_id") if row.get(k) is not None), None)
    return "row" if key is None else f"row {'idx' if key in ('idx', 'qID') else 'id'}={row[key]}"


def _field(task: str, row: dict, key: str) -> Any:
    if not isinstance(row, dict):
        raise TaskDataError(f"{task}: expected a row object, got {type(row).__name__}")
    if row.get(key) is None:
        raise TaskDataError(f"{task} {_row_ref(row)}: missing field {key!r} (row has {sorted(row)})")
    return row[key]


def _typed(task: str, row: dict, key: str, kind: type, what: str) -> Any:
    value = _field(task, row, key)
    if not isinstance(value, kind):
        raise TaskDataError(f"{task} {_row_ref(row)}: field {key!r} should be {what}, got {value!r}")
    return value


def _text(task: str, row: dict, key: str) -> str:
    return _typed(task, row, key, str, "text")


def _label_index(task: str, row: dict, accepted: Sequence[Sequence[Any]], key: str = "label") -> int:
    """Position of the option whose accepted values contain row[key]. Types must match exactly, so the
    bool True never passes for the int 1 (Python would call them equal)."""
    value = _field(task, row, key)
    for i, values in enumerate(accepted):
        if any(type(value) is type(v) and value == v for v in values):
            return i
    known = [v for values in accepted for v in values]
    raise TaskDataError(f"{task} {_row_ref(row)}: {key} {value!r} is not one of {known}")


def _verbalized(task: str, row: dict, context: str, words: Sequence[str], names: Sequence[Any]) -> Example:
    """The common MeZO pattern: one prompt, one label word per class (names[i] -> words[i])."""
    accepted = [(name, i) for i, name in enumerate(names)]  # official value or hub ClassLabel index
    return Example(
        contexts=(context,) * len(words),
        continuations=tuple(continuation(context, w) for w in words),
        label=_label_index(task, row, accepted),
    )


_NO_YES = ("No", "Yes")
_FALSE_TRUE = (False, True)


def sst2(row: dict) -> Example:
    sentence = _text("SST-2", row, "sentence").strip()
    return _verbalized("SST-2", row, f"{sentence} It was", ("terrible", "great"), ("0", "1"))


def rte(row: dict) -> Example:
    premise, hypothesis = _text("RTE", row, "premise"), _text("RTE", row, "hypothesis")
    context = f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n'
    return _verbalized("RTE", row, context, ("Yes", "No"), ("entailment", "not_entailment"))


def cb(row: dict) -> Example:
    premise, hypothesis = _text("CB", row, "premise"), _text("CB", row, "hypothesis")
    context = f'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n'
    return _verbalized("CB", row, context, ("Yes", "No", "Maybe"), ("entailment", "contradiction", "neutral"))


def boolq(row: dict) -> Example:
    passage, question = _text("BoolQ", row, "passage"), _text("BoolQ", row, "question")
    question = question if question.endswith("?") else question + "?"
    return _verbalized("BoolQ", row, f"{passage} {question}", _NO_YES, _FALSE_TRUE)


def wic(row: dict) -> Example:
    word, s1, s2 = (_text("WiC", row, k) for k in ("word", "sentence1", "sentence2"))
    context = f'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{s1}\n{s2}\n'
    return _verbalized("WiC", row, context, _NO_YES, _FALSE_TRUE)


def wsc(row: dict) -> Example:
    # The official JSONL nests the spans in "target"; the hub rows have them at the top level.
    fields = {**row, **_field("WSC", row, "target")} if "target" in row else row
    text, span1, span2 = (_text("WSC", fields, k) for k in ("text", "span1_text", "span2_text"))
    context = (
        f'{text}\nIn the previous sentence, does the pronoun "{span2.lower()}" refer to {span1}? Yes or No?\n'
    )
    return _verbalized("WSC", row, context, _NO_YES, _FALSE_TRUE)


def multirc(row: dict) -> Example:
    """One (paragraph, question, answer) row, as on the hub or as made by `multirc_rows`."""
    paragraph, question, answer = (_text("MultiRC", row, k) for k in ("paragraph", "question", "answer"))
    context = (
        f'{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? Yes or No?\n'
    )
    return _verbalized("MultiRC", row, context, _NO_YES, (0, 1))


def multirc_rows(row: dict) -> list[dict]:
    """Flatten one passage of the official MultiRC JSONL into the hub's one-row-per-answer form."""
    passage = _field("MultiRC", row, "passage")
    paragraph = _text("MultiRC", passage, "text")
    flat = []
    for question in _field("MultiRC", passage, "questions"):
        for answer in _field("MultiRC", question, "answers"):
            item = {
                "paragraph": paragraph,
                "question": question.get("question"),
                "answer": answer.get("text"),
                "idx": {
                    "paragraph": row.get("idx"),
                    "question": question.get("idx"),
                    "answer": answer.get("idx"),
                },
            }
            if "label" in answer:  # a missing label stays missing so the template reports it
                item["label"] = answer["label"]
            flat.append(item)
    return flat


def _lower_first(choice: str) -> str:
    # MeZO's "correct" capitalization: the choice continues the sentence, but the pronoun I stays upper.
    first_word = choice.split(" ", 1)[0]
    if first_word == "I" or first_word.startswith("I'"):
        return choice
    return choice[:1].lower() + choice[1:]


def copa(row: dict) -> Example:
    premise = _text("COPA", row, "premise").rstrip()
    premise = premise[:-1] if premise.endswith(".") else premise
    question = _field("COPA", row, "question")
    if question not in ("cause", "effect"):
        raise TaskDataError(f"COPA {_row_ref(row)}: question {question!r} is not 'cause' or 'effect'")
    context = premise + (" because" if question == "cause" else " so")
    choices = (_text("COPA", row, "choice1"), _text("COPA", row, "choice2"))
    return Example(
        contexts=(context, context),
        continuations=tuple(continuation(context, _lower_first(c)) for c in choices),
        label=_label_index("COPA", row, [(0,), (1,)]),
    )


def winogrande(row: dict) -> Example:
    """Partial scoring (GPT-3 style): each option fills the blank in the context, and both options
    score the same rest of the sentence. The rest keeps the sentence's own spacing, so a blank
    followed by "'s" continues with "'s", not " 's"."""
    sentence = _text("WinoGrande", row, "sentence")
    if sentence.count("_") != 1:
        raise TaskDataError(f"WinoGrande {_row_ref(row)}: sentence should have exactly one '_' blank")
    before, after = sentence.split("_")
    options = (_text("WinoGrande", row, "option1"), _text("WinoGrande", row, "option2"))
    rest = after.rstrip()
    rest = " " + rest.lstrip() if rest[:1].isspace() else rest
    return Example(
        contexts=tuple(before + option for option in options),
        continuations=(rest, rest),
        label=_label_index("WinoGrande", row, [("1",), ("2",)], key="answer"),
    )


# MeZO's medium-model tasks beyond our data (hub only; LM-BFF's label words, its masked prompts in
# masked_templates). MeZO has no causal prompts for them: these follow its SST-2 and CB prompts.
SST5_WORDS = ("terrible", "bad", "okay", "good", "great")
NLI_WORDS = ("Yes", "Maybe", "No")  # entailment, neutral, contradiction: the hub's label order
TREC_WORDS = ("Expression", "Entity", "Description", "Human", "Location", "Number")  # ABBR ENTY DESC HUM LOC NUM


def sst5(row: dict) -> Example:
    sentence = _text("SST-5", row, "text").strip()
    return _verbalized("SST-5", row, f"{sentence} It was", SST5_WORDS, tuple(range(5)))


def mnli(row: dict) -> Example:
    premise, hypothesis = _text("MNLI", row, "premise"), _text("MNLI", row, "hypothesis")
    context = f'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n'
    return _verbalized("MNLI", row, context, NLI_WORDS, tuple(range(3)))


def trec(row: dict) -> Example:
    return trec_with(row, lambda question: f"{question}\nThe answer is a")


def trec_with(row: dict, prompt: Callable[[str], str]) -> Example:
    """A TREC row (the hub's: text, coarse_label) as the Example of ``prompt(question)``."""
    question = _text("TREC", row, "text").strip()
    row = {**row, "label": _field("TREC", row, "coarse_label")}
    return _verbalized("TREC", row, prompt(question), TREC_WORDS, tuple(range(6)))
