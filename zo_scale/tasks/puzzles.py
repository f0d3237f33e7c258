"""Tasks generated from a seed, for rewards that check an answer: Countdown puzzles and multi-step arithmetic.

No download: a split is a function of (seed, split, size, difficulty), so every machine and every rank builds
the same rows. Each row is a dict with its ``id``, the ``prompt`` and the fields its reward reads
(:mod:`~zo_scale.tasks.rewards`).

- **Countdown** (``countdown_rows``; reward ``countdown``): ``numbers`` (``count`` integers in 1 ..
  ``max_number``) and a ``target`` reachable by combining all of them with + - * /: the generator draws the
  numbers, then a random bracketing and operators over them, and keeps a draw whose value is a positive
  integer, so every puzzle has a solution (the drawn ``solution``, kept in the row). The prompt asks for the
  equation between ``<answer>`` tags.
- **Arithmetic** (``arithmetic_rows``; reward ``numeric``): an expression of ``operations`` operators (+ - *)
  over integers in 0 .. ``max_number``, evaluated left to right with the usual precedence; ``answer`` is its
  value. The prompt ends in "Answer:" so that the answer is the completion's first line.

Train and eval splits use different streams of the same seed, so no eval puzzle is drawn for training on
purpose (two draws can still coincide on small ranges).
"""

from __future__ import annotations

import random

from zo_scale.tasks.rewards import equation_value

SPLIT_STREAMS = {"train": 0, "eval": 1}


def _rng(seed: int, split: str, task: str) -> random.Random:
    if split not in SPLIT_STREAMS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_STREAMS)}")
    return random.Random(f"{task}:{seed}:{SPLIT_STREAMS[split]}")


def _combine(rng: random.Random, numbers: list[int]) -> str:
    """A random bracketing and choice of operators over ``numbers``, each used once, as text."""
    terms = [str(n) for n in numbers]
    while len(terms) > 1:
        i = rng.randrange(len(terms) - 1)
        terms[i : i + 2] = [f"({terms[i]} {rng.choice('+-*/')} {terms[i + 1]})"]
    return terms[0][1:-1]  # the outer brackets dropped


def countdown_rows(size: int, seed: int, split: str = "train", count: int = 3, max_number: int = 20) -> list[dict]:
    """``size`` Countdown puzzles (module docstring); ``count`` numbers each, in 1 .. ``max_number``."""
    if count < 2 or max_number < 1:
        raise ValueError(f"countdown needs count >= 2 and max_number >= 1, got count={count}, max_number={max_number}")
    rng = _rng(seed, split, "countdown")
    rows = []
    while len(rows) < size:
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        order = numbers[:]
        rng.shuffle(order)
        solution = _combine(rng, order)
        try:
            value = equation_value(solution)[0]
        except ZeroDivisionError:
            continue
        if value.denominator != 1 or value <= 0:
            continue
        target = int(value)
        listed = ", ".join(map(str, numbers))
        prompt = (f"Using the numbers [{listed}], write an equation that equals {target}. Use +, -, * and / and "
                  f"each number exactly once. Give the equation between <answer> and </answer>, for example "
                  f"<answer>(1 + 2) * 3</answer>.\n<answer>")
        rows.append({"id": f"countdown-{split}-{len(rows)}", "prompt": prompt, "numbers": numbers,
                     "target": target, "solution": solution})
    return rows


def arithmetic_rows(size: int, seed: int, split: str = "train", operations: int = 2,
                    max_number: int = 10) -> list[dict]:
    """``size`` arithmetic questions (module docstring) of ``operations`` operators over 0 .. ``max_number``."""
    if operations < 1 or max_number < 1:
        raise ValueError(f"arithmetic needs operations >= 1 and max_number >= 1, got operations={operations}, "
                         f"max_number={max_number}")
    rng = _rng(seed, split, "arithmetic")
    rows = []
    for i in range(size):
        parts = [str(rng.randint(0, max_number))]
        for _ in range(operations):
            parts += [rng.choice("+-*"), str(rng.randint(0, max_number))]
        expression = " ".join(parts)
        answer = int(equation_value(expression)[0])
        rows.append({"id": f"arithmetic-{split}-{i}", "prompt": f"Question: What is {expression}?\nAnswer:",
                     "expression": expression, "answer": answer})
    return rows
