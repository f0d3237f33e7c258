"""Each MeZO template renders exactly the expected prompt and continuations."""

import pytest

from zo_scale.tasks import Example, TaskDataError, continuation
from zo_scale.tasks import templates as t


def shared(context, words, label):
    return Example((context,) * len(words), tuple(words), label)


def test_continuation_space_rule():
    assert continuation("It was", "great") == " great"
    assert continuation("It was", " great") == " great"
    assert continuation("Yes or No?\n", " Yes") == "Yes"
    assert continuation("", "text") == "text"


def test_sst2():
    row = {"sentence": "a gorgeous , witty , seductive movie . ", "label": "1"}
    assert t.sst2(row) == shared("a gorgeous , witty , seductive movie . It was", (" terrible", " great"), 1)


def test_rte():
    row = {"premise": "Cats sleep.", "hypothesis": "Cats rest.", "label": "not_entailment", "idx": 3}
    expected = 'Cats sleep.\nDoes this mean that "Cats rest." is true? Yes or No?\n'
    assert t.rte(row) == shared(expected, ("Yes", "No"), 1)


def test_cb():
    row = {"premise": "He left.", "hypothesis": "he is gone", "label": "neutral", "idx": 0}
    expected = 'Suppose He left. Can we infer that "he is gone"? Yes, No, or Maybe?\n'
    assert t.cb(row) == shared(expected, ("Yes", "No", "Maybe"), 2)


def test_boolq():
    row = {"passage": "Water -- Water is wet.", "question": "is water wet", "label": True, "idx": 1}
    assert t.boolq(row) == shared("Water -- Water is wet. is water wet?", (" No", " Yes"), 1)


def test_wic():
    row = {"word": "bank", "sentence1": "A river bank.", "sentence2": "A savings bank.", "label": False}
    expected = (
        'Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
        "A river bank.\nA savings bank.\n"
    )
    assert t.wic(row) == shared(expected, ("No", "Yes"), 0)


def test_wsc_official_and_hub_rows():
    text = "Mark told Pete lies. He should have known."
    official = {"text": text, "target": {"span1_text": "Pete", "span2_text": "He"}, "label": True, "idx": 7}
    expected = f'{text}\nIn the previous sentence, does the pronoun "he" refer to Pete? Yes or No?\n'
    assert t.wsc(official) == shared(expected, ("No", "Yes"), 1)
    hub = {"text": text, "span1_text": "Pete", "span2_text": "He", "label": 1}
    assert t.wsc(hub) == t.wsc(official)


def test_multirc_flattens_passages():
    passage = {
        "idx": 4,
        "passage": {
            "text": "Sent one. Sent two.",
            "questions": [
                {"question": "Q1?", "idx": 0, "answers": [{"text": "A", "idx": 0, "label": 1}]},
                {
                    "question": "Q2?",
                    "idx": 1,
                    "answers": [{"text": "B", "idx": 1, "label": 0}, {"text": "C", "idx": 2}],
                },
            ],
        },
    }
    rows = t.multirc_rows(passage)
    assert [(r["question"], r["answer"], r.get("label")) for r in rows] == [
        ("Q1?", "A", 1),
        ("Q2?", "B", 0),
        ("Q2?", "C", None),
    ]
    expected = 'Sent one. Sent two.\nQuestion: Q2?\nI found this answer "B". Is that correct? Yes or No?\n'
    assert t.multirc(rows[1]) == shared(expected, ("No", "Yes"), 0)
    with pytest.raises(
        TaskDataError, match=r"MultiRC row idx=\{'paragraph': 4, 'question': 1, 'answer': 2\}.*'label'"
    ):
        t.multirc(rows[2])


def test_copa():
    effect = {
        "premise": "The girl found a bug in her cereal.",
        "choice1": "She poured milk in the bowl.",
        "choice2": "She lost her appetite.",
        "question": "effect",
        "label": 1,
        "idx": 1,
    }
    assert t.copa(effect) == shared(
        "The girl found a bug in her cereal so",
        (" she poured milk in the bowl.", " she lost her appetite."),
        1,
    )
    cause = {
        "premise": "I shivered.",
        "choice1": "I was cold.",
        "choice2": "The Sun set.",
        "question": "cause",
        "label": 0,
    }
    assert t.copa(cause) == shared("I shivered because", (" I was cold.", " the Sun set."), 0)
    with pytest.raises(TaskDataError, match="question 'why' is not 'cause' or 'effect'"):
        t.copa({**cause, "question": "why"})


def test_winogrande():
    row = {
        "sentence": "The trophy doesn't fit into the suitcase because the _ is too large.",
        "option1": "trophy",
        "option2": "suitcase",
        "answer": "1",
    }
    before = "The trophy doesn't fit into the suitcase because the "
    assert t.winogrande(row) == Example(
        (before + "trophy", before + "suitcase"), (" is too large.", " is too large."), 0
    )
    possessive = {
        "sentence": "Ann helped Beth because _'s car broke.",
        "option1": "Ann",
        "option2": "Beth",
        "answer": "2",
    }
    assert t.winogrande(possessive) == Example(
        ("Ann helped Beth because Ann", "Ann helped Beth because Beth"), ("'s car broke.", "'s car broke."), 1
    )
    with pytest.raises(TaskDataError, match="exactly one '_'"):
        t.winogrande({**row, "sentence": "no blank here"})


def test_hub_classlabel_ints_are_accepted_but_bools_are_not_ints():
    row = {"premise": "p", "hypothesis": "h", "idx": 5}
    assert t.rte({**row, "label": 0}).label == 0
    assert t.rte({**row, "label": 1}).label == 1
    assert t.boolq({"passage": "p", "question": "q", "label": 1}).label == 1
    with pytest.raises(TaskDataError, match=r"RTE row idx=5: label True is not one of"):
        t.rte({**row, "label": True})


@pytest.mark.parametrize(
    ("template", "row", "problem"),
    [
        (t.rte, {"premise": "p", "hypothesis": "h", "idx": 9}, "RTE row idx=9: missing field 'label'"),
        (
            t.rte,
            {"premise": "p", "label": "entailment", "idx": 9},
            "RTE row idx=9: missing field 'hypothesis'",
        ),
        (
            t.cb,
            {"premise": "p", "hypothesis": "h", "label": "maybe", "idx": 2},
            "CB row idx=2: label 'maybe' is not",
        ),
        (t.sst2, {"sentence": "s", "label": "2"}, "SST-2 row: label '2' is not one of"),
        (
            t.winogrande,
            {"sentence": "a _ b", "option1": "x", "option2": "y", "qID": "q7"},
            "WinoGrande row idx=q7",
        ),
        (
            t.wic,
            {"word": "w", "sentence1": 3, "sentence2": "s", "label": True},
            "field 'sentence1' should be text",
        ),
    ],
)
def test_bad_rows_name_task_row_and_problem(template, row, problem):
    with pytest.raises(TaskDataError) as err:
        template(row)
    assert problem in str(err.value)
