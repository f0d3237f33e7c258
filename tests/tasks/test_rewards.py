"""Built-in rewards, the user's own, the checks that stop a bad one, and the generated puzzles they score."""

import math
import textwrap

import pytest

from zo_scale.tasks.puzzles import arithmetic_rows, countdown_rows
from zo_scale.tasks.rewards import RewardError, checked, countdown_reward, equation_value, load_reward

PUZZLE = {"id": "p1", "numbers": [3, 5, 7], "target": 22}


@pytest.mark.parametrize(("completion", "reward"), [
    ("3 * 5 + 7</answer>", 1.0),  # the prompt opened the tag
    ("(7 + 5) * 3 - 14</answer>", 0.0),  # 14 is not one of the numbers
    ("7 * 3 + 5</answer>", 0.1),  # the right numbers, once each, but 26: the format reward
    ("5 * 3 + 7 = 22</answer> and more", 1.0),
    ("3 * 5</answer>", 0.0),  # 7 unused
    ("3 * 5 + 7 + 7</answer>", 0.0),  # 7 twice
    ("3 ** 5 + 7</answer>", 0.0),  # not an operator of the game
    ("I think it is 22", 0.0),
])
def test_countdown_rewards_an_equation_that_uses_each_number_once_and_hits_the_target(completion, reward):
    assert countdown_reward("... <answer>", completion, PUZZLE) == reward


def test_equations_are_exact_and_division_by_zero_is_no_equation():
    assert equation_value("(1 + 2) / 3 * 7") == (7, [1, 2, 3, 7])
    assert equation_value("1 / 3 + 1 / 3 + 1 / 3")[0] == 1  # fractions: no rounding
    with pytest.raises(ZeroDivisionError):
        equation_value("3 / (2 - 2)")
    with pytest.raises(ValueError):
        equation_value("__import__('os')")


def test_generated_puzzles_are_solvable_reproducible_and_split():
    rows = countdown_rows(50, seed=7, count=4, max_number=30)
    assert rows == countdown_rows(50, seed=7, count=4, max_number=30)
    assert rows != countdown_rows(50, seed=7, split="eval", count=4, max_number=30)
    for row in rows:  # the drawn solution earns the full reward
        assert countdown_reward(row["prompt"], row["solution"] + "</answer>", row) == 1.0
        assert len(row["numbers"]) == 4 and all(1 <= n <= 30 for n in row["numbers"])
    maths = arithmetic_rows(20, seed=7, operations=3)
    assert all(load_reward("numeric")(r["prompt"], f" {r['answer']}\nQuestion: ...", r) == 1.0 for r in maths)
    assert load_reward("numeric")("", " 3.0", {"answer": 3}) == 1.0


def test_the_users_reward_is_imported_and_a_bad_one_stops_naming_the_function_and_the_row(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length(prompt, completion, row):
            return len(completion) / 10
        def broken(prompt, completion, row):
            return row["missing"]
        def nan(prompt, completion, row):
            return float("nan")
        def word(prompt, completion, row):
            return "good"
    """))
    monkeypatch.chdir(tmp_path)
    assert checked(load_reward("my_rewards:length"), "my_rewards:length")("p", "abcde", {"id": 1}) == 0.5
    for name, message in [("broken", "raised KeyError on row 3"), ("nan", "returned nan on row 3"),
                          ("word", "returned 'good' on row 3")]:
        spec = f"my_rewards:{name}"
        with pytest.raises(RewardError, match=f"reward '{spec}' {message}"):
            checked(load_reward(spec), spec)("p", "x", {"id": 3})
    for spec, message in [("nowhere:f", "cannot import module 'nowhere'"), ("my_rewards:absent", "has no function"),
                          ("countdwn", "give a built-in reward")]:
        with pytest.raises(RewardError, match=message):
            load_reward(spec)
    with pytest.raises(RewardError, match="reward 'exact_match' on row 'q': the row has no 'answers' list"):
        checked(load_reward("exact_match"), "exact_match")("p", "x", {"id": "q"})
    assert math.isclose(load_reward("f1")("p", " red barn\n", {"answers": ["the big red barn"]}), 0.8)
