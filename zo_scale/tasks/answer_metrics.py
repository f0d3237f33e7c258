"""SQuAD-style scoring of a free-text answer against its gold answers: exact match and token F1.

Both compare normalized texts (``normalize_answer``) and take the best score over the golds. Token F1
treats each text as a bag of whitespace tokens; with ``overlap`` the size of the bags' intersection,

    P = overlap / |pred|,   R = overlap / |gold|,   F1 = 2 P R / (P + R)   (0 when overlap = 0),

so "the big red barn" against "red barn" normalizes to [big, red, barn] vs [red, barn]: P = 2/3, R = 1,
F1 = 0.8. Two empty texts agree (F1 = 1); one empty text scores 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the whole words a/an/the, collapse whitespace to single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    # Punctuation goes first, so "the-river" becomes "theriver" and keeps its letters, as in SQuAD's scorer.
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(golds: str | Sequence[str]) -> Sequence[str]:
    golds = (golds,) if isinstance(golds, str) else golds
    if not golds:
        raise ValueError("no gold answers to compare against")
    return golds


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 when the normalized prediction equals some normalized gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _golds(golds)))


def _f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)
    overlap = sum((Counter(pred) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: str | Sequence[str]) -> float:
    """The best bag-of-tokens F1 (module docstring) of the prediction over the gold answers, in [0, 1]."""
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(g).split()) for g in _golds(golds))


def answer_text(generated: str) -> str:
    """The answer in a generated continuation: its text before the first newline, stripped (MeZO
    stops decoding at "\\n", and the prompt's "Answer:" leaves a leading space)."""
    return generated.split("\n", 1)[0].strip()
