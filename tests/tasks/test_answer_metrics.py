"""Exact match and token F1 on hand-computed cases; the answer cut of a generation."""

import pytest

from zo_scale.tasks.answer_metrics import answer_text, exact_match, normalize_answer, token_f1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Tessel River", "tessel river"),
        ("  an  Apple,  a pear!  ", "apple pear"),
        ("Theory of the anthem", "theory of anthem"),  # articles only as whole words
        ("the-river", "theriver"),  # punctuation goes before articles are looked for
        ("1,800", "1800"),
        ("A", ""),
        ("Line one\n\tline two.", "line one line two"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The Tessel River.", ["Tessel river"]) == 1.0
    assert exact_match("the big red barn", ["red barn"]) == 0.0
    assert exact_match("red barn", ["blue barn", "a red barn"]) == 1.0  # best over the golds
    assert exact_match("1800", "1,800") == 1.0  # a single gold may be a plain string


def test_token_f1_hand_computed():
    # pred [big, red, barn] vs gold [red, barn]: P = 2/3, R = 1
    assert token_f1("the big red barn", ["red barn"]) == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
    assert token_f1("the big red barn", ["red barn"]) == pytest.approx(0.8)
    # pred [red] vs gold [red, barn, door]: P = 1, R = 1/3 -> 0.5
    assert token_f1("red", ["red barn door"]) == pytest.approx(0.5)
    assert token_f1("green house", ["red barn"]) == 0.0


def test_token_f1_counts_repeated_tokens_once_each():
    # pred [red, red] vs gold [red]: overlap 1, P = 1/2, R = 1 -> 2/3
    assert token_f1("red red", ["red"]) == pytest.approx(2 / 3)


def test_token_f1_takes_the_best_gold():
    assert token_f1("red barn", ["green door", "red barn door", "red"]) == pytest.approx(0.8)
    assert token_f1("red barn", ["green door", "Red Barn."]) == 1.0


def test_empty_answers():
    assert token_f1("", [""]) == 1.0
    assert token_f1("the", ["a"]) == 1.0  # both normalize to nothing
    assert token_f1("", ["red"]) == 0.0
    assert token_f1("red", ["the"]) == 0.0
    assert exact_match("", ["an"]) == 1.0
    with pytest.raises(ValueError, match="no gold answers"):
        token_f1("red", [])


def test_answer_text_cuts_at_the_first_newline():
    assert answer_text(" 1412\nQuestion: When") == "1412"
    assert answer_text("  Port Evany  ") == "Port Evany"
    assert answer_text("\nnext") == ""
