"""Rewards: a float for each generated completion, larger is better (the objective of evolution strategies).

A reward function is called as ``reward(prompt, completion, row)``: the prompt the model continued, the text
it generated after it (decoded, special tokens dropped) and the task's row (its fields: gold answers, a
Countdown puzzle's numbers and target, ...). Built in (:data:`BUILTIN`):

- ``exact_match``: 1.0 when the answer (the completion up to its first newline) equals one of the row's
  ``answers`` after SQuAD's normalization, else 0.0;
- ``f1``: the token F1 of that answer against the row's ``answers`` (:mod:`~zo_scale.tasks.answer_metrics`);
- ``numeric``: 1.0 when the last number in the answer equals the row's ``answer`` as a number ("3.0" is 3),
  else 0.0;
- ``countdown``: 1.0 when the equation in the completion (between ``<answer>`` and ``</answer>``, else its first
  line) uses each of the row's ``numbers`` exactly once, only ``+ - * /`` and parentheses, and equals its
  ``target`` exactly (in fractions: no rounding); 0.1 for an equation of that form that misses (a format
  reward, as TinyZero's Countdown reward gives); else 0.0.

The user's own: ``load_reward("package.module:function")``, importable from the working directory or the
``PYTHONPATH``. :func:`checked` wraps any reward so that a bad one (it raises, returns NaN or infinity, or
something that is not a number) stops with a :class:`RewardError` naming the function and the row.
"""

from __future__ import annotations

import ast
import importlib
import math
import numbers
import re
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from zo_scale.tasks.answer_metrics import answer_text, exact_match, token_f1

Reward = Callable[[str, str, Mapping[str, Any]], float]  # (prompt, completion, row) -> reward
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT_REWARD = 0.1  # countdown: a well-formed equation that misses


class RewardError(ValueError):
    """A reward function failed or returned something that is not a finite number."""


@dataclass(frozen=True)
class RewardExample:
    """One prompt to continue, and the row (its fields) the reward reads to score the continuation."""

    prompt: str
    row: Mapping[str, Any] = field(hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError(f"a reward example needs a non-empty prompt text, got {self.prompt!r}")


def reward_example(row: Mapping[str, Any]) -> RewardExample:
    """The template of a reward task: the row's ``prompt``, the row itself for the reward."""
    if "prompt" not in row:
        raise ValueError(f"a reward task's row needs a 'prompt' field (fields: {sorted(row)})")
    return RewardExample(row["prompt"], row)


def _answers(row: Mapping[str, Any]) -> list[str]:
    answers = row.get("answers")
    if not isinstance(answers, list | tuple) or not answers:
        raise RewardError(f"the row has no 'answers' list to compare with (fields: {sorted(row)})")
    return [str(a) for a in answers]


def exact_match_reward(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
    del prompt
    return exact_match(answer_text(completion), _answers(row))


def f1_reward(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
    del prompt
    return token_f1(answer_text(completion), _answers(row))


def numeric_reward(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
    del prompt
    if "answer" not in row:
        raise RewardError(f"the row has no 'answer' to compare with (fields: {sorted(row)})")
    found = NUMBER.findall(answer_text(completion))
    return float(bool(found) and Fraction(found[-1]) == Fraction(str(row["answer"])))


def _value(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
        left, right = _value(node.left, used), _value(node.right, used)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise ZeroDivisionError("division by zero")
        return left / right
    raise ValueError("not an equation of integers and + - * /")


def equation_value(text: str) -> tuple[Fraction, list[int]]:
    """The exact value of an equation of integers, + - * / and parentheses (usual precedence), and the integers
    it uses in order; ValueError (ZeroDivisionError) where it is not such an equation (divides by zero)."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, RecursionError) as e:
        raise ValueError(f"not an equation: {text!r}") from e
    used: list[int] = []
    return _value(tree.body, used), used


def countdown_reward(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
    if "numbers" not in row or "target" not in row:
        raise RewardError(f"the row has no 'numbers' and 'target' of a Countdown puzzle (fields: {sorted(row)})")
    text = ("<answer>" if prompt.rstrip().endswith("<answer>") else "") + completion  # the prompt opened the tag
    tagged = ANSWER_TAG.search(text)
    equation = tagged.group(1) if tagged else completion.split("\n", 1)[0]
    try:
        value, used = equation_value(equation.split("=", 1)[0])  # "3 + 4 = 7": the left side
    except (ValueError, RecursionError):
        return 0.0
    if Counter(used) != Counter(int(n) for n in row["numbers"]):
        return 0.0
    return 1.0 if value == Fraction(int(row["target"])) else FORMAT_REWARD


BUILTIN: dict[str, Reward] = {
    "exact_match": exact_match_reward,
    "f1": f1_reward,
    "numeric": numeric_reward,
    "countdown": countdown_reward,
}


def load_reward(spec: str, folders: Sequence[Path] = ()) -> Reward:
    """A built-in reward by name (:data:`BUILTIN`), or the user's ``module:function``, importable from the
    working directory and ``folders`` (a task file's folder). A RewardError names what could not be found."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise RewardError(f"task.reward={spec!r}: give a built-in reward ({', '.join(BUILTIN)}) or the import path "
                          "of your own function as module:function")
    for folder in (Path.cwd(), *folders):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"task.reward={spec!r}: cannot import module {module_name!r} ({e})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RewardError(f"task.reward={spec!r}: module {module_name!r} has no function {function_name!r}")
    return function


def checked(reward: Reward, name: str) -> Reward:
    """``reward`` that stops with a RewardError naming ``name`` and the row (its ``id`` where it has one) where
    the function raises or returns anything but a finite number (a bool is not a number here)."""

    def call(prompt: str, completion: str, row: Mapping[str, Any]) -> float:
        where = f"row {row['id']!r}" if "id" in row else f"the row with prompt {prompt[:60]!r}"
        try:
            value = reward(prompt, completion, row)
        except RewardError as e:
            raise RewardError(f"reward {name!r} on {where}: {e}") from None
        except Exception as e:  # the user's code: any failure ends the run, named
            raise RewardError(f"reward {name!r} raised {type(e).__name__} on {where}: {e}") from e
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(f"reward {name!r} returned {value!r} on {where} (completion {completion[:60]!r}); "
                              "a reward must be a finite number")
        return float(value)

    return call
