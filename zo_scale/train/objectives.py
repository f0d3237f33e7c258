"""What a run scores its examples by: the loss of a training batch and the metrics of an evaluation.

- :class:`ChoiceObjective`, multiple choice: a causal LM scores each option's continuation, a masked
  LM the option's label word at the mask (:mod:`zo_scale.models.scoring`); loss ``ce`` or ``lm``,
  metric accuracy.
- :class:`GenerationObjective`, a free-text answer (SQuAD, DROP): loss ``lm`` on the first gold
  answer, or ``f1``, 1 - token F1 of the greedy answer (MeZO's non-differentiable objective);
  metrics token F1 and exact match of the greedy answer against every gold answer.
- :class:`RewardObjective`, a reward on the greedy continuation (Countdown, arithmetic, the user's): loss
  ``reward``, minus the mean reward (evolution strategies maximize it); metric the mean reward.

The recipe sees only ``encode``, ``loss`` and ``per_example``; :func:`make_objective` picks one
from the task's kind, the model's head and ``task.loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zo_scale.models.greedy import Sampling, greedy_decode
from zo_scale.models.masked_scoring import encode_masked
from zo_scale.models.scoring import LOSSES, EncodedExample, batch_loss, correct, encode, labels_of, option_scores
from zo_scale.tasks import Example
from zo_scale.tasks.answer_metrics import answer_text, exact_match, token_f1
from zo_scale.tasks.generation import GenerationExample
from zo_scale.tasks.rewards import Reward, RewardExample

GENERATION_LOSSES = ("lm", "f1")
REWARD_LOSSES = ("reward",)
DECODING_LOSSES = ("f1", "reward")  # decode inside every step: no gradient, greedy decoding per point


def group_means(values: list[float], size: int) -> list[float]:
    """The mean of each consecutive group of ``size`` values (a stacked batch's copies, in order)."""
    return [sum(values[k : k + size]) / size for k in range(0, len(values), size)]


def continuations(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  sampling: Sampling | None = None) -> list[str]:
    """The decoded text each prompt (token ids) is continued with: ``max_new_tokens`` tokens, greedy or sampled by
    ``sampling``, cut at the tokenizer's end of sequence, special tokens dropped."""
    eos = tokenizer.eos_token_id
    generated = greedy_decode(model, prompts, tokenizer.pad_token_id, max_new_tokens,
                              stop_ids=() if eos is None else (eos,), sampling=sampling)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]


def in_length_order(examples: Sequence[Any], batch_size: int, score: Callable[[list[Any]], list[Any]]) -> list[Any]:
    """``score`` of each example (any with a ``length``), in input order, computed ``batch_size`` examples at a
    time in order of length: less padding, the same results."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    out: list[Any] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, value in zip(chunk, score([examples[i] for i in chunk]), strict=True):
            out[i] = value
    return out


def stacked_loss(
    model: torch.nn.Module, batch: list[Any], pad_id: int, loss: str, groups: int | None = None
) -> torch.Tensor:
    """:func:`~zo_scale.models.scoring.batch_loss` of the batch's option scores, a 0-dim tensor; with
    ``groups`` = K (optim.perturb=in_forward) one forward over the batch stacked K times and each copy's
    loss, shape (K,)."""
    labels = labels_of(batch, next(model.parameters()).device)
    if groups is None:
        return batch_loss(option_scores(model, batch, pad_id), labels, loss)
    scores = option_scores(model, batch * groups, pad_id).chunk(groups)
    return torch.stack([batch_loss(s, labels, loss) for s in scores])


class ChoiceObjective:
    """Multiple choice: the loss of :func:`~zo_scale.models.scoring.batch_loss`, metric accuracy."""

    metrics = ("accuracy",)  # the first is the headline: the summary's zero_shot_/final_<metric>

    def __init__(self, tokenizer: Any, head: str, loss: str, max_length: int) -> None:
        if loss not in LOSSES:
            raise ValueError(f"task.loss: unknown {loss!r} for a multiple-choice task; choose one of {LOSSES}")
        self.tokenizer, self.loss_name, self.max_length = tokenizer, loss, max_length
        self._encode = encode_masked if head == "masked" else encode

    def encode(self, examples: Sequence[Example]) -> list[Any]:
        """Token ids of every example, once, up front."""
        return self._encode(self.tokenizer, examples, self.max_length)

    def loss(self, model: torch.nn.Module, batch: list[Any], groups: int | None = None) -> torch.Tensor:
        """The batch's loss, a 0-dim tensor; with ``groups`` = K (optim.perturb=in_forward) the batch
        stacked K times and each copy's loss, shape (K,)."""
        return stacked_loss(model, batch, self.tokenizer.pad_token_id, self.loss_name, groups)

    def per_example(self, model: torch.nn.Module, examples: list[Any], batch_size: int) -> dict[str, list[float]]:
        """Each metric's value on each example, in input order (1.0 / 0.0 for accuracy)."""
        hits = correct(model, examples, self.tokenizer.pad_token_id, batch_size)
        return {"accuracy": [float(h) for h in hits]}


@dataclass(frozen=True)
class EncodedGeneration:
    """Token ids of one generation example: the prompt greedy decoding continues, the prompt and target
    the LM loss scores (as a one-option :class:`EncodedExample`), and the gold answers."""

    prompt: tuple[int, ...]
    scored: EncodedExample
    answers: tuple[str, ...]

    @property
    def length(self) -> int:
        return len(self.prompt)


class GenerationObjective:
    """A free-text answer: trained by ``lm`` (the mean log-likelihood of the first gold answer's tokens,
    then a newline, after the prompt; averaged over the batch) or by ``f1``; evaluated by greedy decoding.

    The answer is the decoded text up to its first newline (MeZO stops generating there); the newline
    the LM loss also scores teaches the model to stop, where MeZO scores the answer's tokens alone. A
    prompt keeps its last ``max_length - max_new_tokens`` tokens, so that prompt and answer fit in
    ``max_length`` (a target longer than ``max_new_tokens`` tokens is cut too: decoding could not
    produce more). Greedy decoding runs ``max_new_tokens`` forwards per batch, whatever it generates.
    """

    metrics = ("f1", "em")

    def __init__(self, tokenizer: Any, loss: str, max_length: int, max_new_tokens: int) -> None:
        if loss not in GENERATION_LOSSES:
            raise ValueError(f"task.loss: unknown {loss!r} for a generation task; choose one of {GENERATION_LOSSES}")
        if not 0 < max_new_tokens < max_length:
            raise ValueError(f"task.max_new_tokens must be in [1, task.max_length={max_length}), got {max_new_tokens}")
        self.tokenizer, self.loss_name = tokenizer, loss
        self.max_length, self.max_new_tokens = max_length, max_new_tokens

    def encode(self, examples: Sequence[GenerationExample]) -> list[EncodedGeneration]:
        """Token ids of every example, once, up front."""
        out = []
        for ex in examples:
            prompt = self.tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
            prompt = tuple(prompt[-(self.max_length - self.max_new_tokens) :])
            target = self.tokenizer(ex.target + "\n", add_special_tokens=False)["input_ids"]
            out.append(EncodedGeneration(prompt, EncodedExample(((prompt, tuple(target[: self.max_new_tokens])),), 0),
                                         ex.answers))
        return out

    def answers(self, model: torch.nn.Module, batch: Sequence[EncodedGeneration]) -> list[str]:
        """The greedy answer to each example of ``batch``: its decoded text up to the first newline."""
        texts = continuations(model, self.tokenizer, [ex.prompt for ex in batch], self.max_new_tokens)
        return [answer_text(text) for text in texts]

    def loss(self, model: torch.nn.Module, batch: list[EncodedGeneration], groups: int | None = None) -> torch.Tensor:
        """The batch's loss, a 0-dim tensor; with ``groups`` = K (optim.perturb=in_forward) the batch stacked K
        times and each copy's loss, shape (K,): for ``f1`` one greedy decoding over the K x B rows, which the
        perturbed forward runs with row group k at point k at every decoding step (each row's KV cache is its
        own)."""
        if self.loss_name == "f1":  # one greedy decoding over the K stacked copies: every row keeps its own cache
            stacked = list(batch) * (groups or 1)
            answers = self.answers(model, stacked)
            f1 = [token_f1(answer, ex.answers) for answer, ex in zip(answers, stacked, strict=True)]
            losses = [1.0 - mean for mean in group_means(f1, len(batch))]
            return torch.tensor(losses if groups is not None else losses[0], dtype=torch.float64)
        return stacked_loss(model, [ex.scored for ex in batch], self.tokenizer.pad_token_id, "lm", groups)

    def per_example(
        self, model: torch.nn.Module, examples: list[EncodedGeneration], batch_size: int
    ) -> dict[str, list[float]]:
        """Token F1 and exact match of each example's greedy answer (best over its gold answers), in input order."""
        answers = in_length_order(examples, batch_size, lambda batch: self.answers(model, batch))
        return {"f1": [token_f1(a, ex.answers) for a, ex in zip(answers, examples, strict=True)],
                "em": [exact_match(a, ex.answers) for a, ex in zip(answers, examples, strict=True)]}


@dataclass(frozen=True)
class EncodedReward:
    """Token ids of a reward example's prompt, and the example (its prompt text and row, for the reward)."""

    prompt: tuple[int, ...]
    example: RewardExample

    @property
    def length(self) -> int:
        return len(self.prompt)


class RewardObjective:
    """A reward on the model's continuation of each prompt (``task.loss=reward``): ``max_new_tokens`` tokens
    decoded (cut at the tokenizer's end of sequence), greedily, or for training with ``temperature`` > 0 sampled
    with one seed a step that every point of the step shares (common random numbers:
    :class:`~zo_scale.models.greedy.Sampling`), decoded to text and scored by ``reward(prompt, completion, row)``
    (:mod:`~zo_scale.tasks.rewards`, checked: a failing reward ends the run naming itself and the row). The loss
    is minus the batch's mean reward; metric ``reward``, the mean reward of greedy continuations."""

    metrics = ("reward",)

    def __init__(self, tokenizer: Any, reward: Reward, max_length: int, max_new_tokens: int,
                 temperature: float = 0.0) -> None:
        if not 0 < max_new_tokens < max_length:
            raise ValueError(f"task.max_new_tokens must be in [1, task.max_length={max_length}), got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"task.temperature must be >= 0 (0: greedy), got {temperature}")
        self.tokenizer, self.reward, self.temperature = tokenizer, reward, temperature
        self.max_length, self.max_new_tokens = max_length, max_new_tokens

    def encode(self, examples: Sequence[RewardExample]) -> list[EncodedReward]:
        """Token ids of every prompt (its last ``max_length - max_new_tokens``), once, up front."""
        keep = self.max_length - self.max_new_tokens
        return [EncodedReward(tuple(self.tokenizer(ex.prompt, add_special_tokens=True)["input_ids"][-keep:]), ex)
                for ex in examples]

    def rewards(self, model: torch.nn.Module, batch: Sequence[EncodedReward], sampling: Sampling | None = None
                ) -> list[float]:
        """The reward of each example's continuation: greedy, or sampled by ``sampling``."""
        texts = continuations(model, self.tokenizer, [ex.prompt for ex in batch], self.max_new_tokens, sampling)
        return [self.reward(ex.example.prompt, text, ex.example.row) for text, ex in zip(texts, batch, strict=True)]

    def loss(self, model: torch.nn.Module, batch: list[EncodedReward], groups: int | None = None, seed: int = 0
             ) -> torch.Tensor:
        """Minus the batch's mean reward, a 0-dim tensor; with ``groups`` = K (optim.perturb=in_forward) one
        decoding of the batch stacked K times and each copy's, shape (K,). ``seed``: the step's sampling seed
        (with a temperature)."""
        sampling = Sampling(self.temperature, seed) if self.temperature > 0 else None
        rewards = self.rewards(model, list(batch) * (groups or 1), sampling)
        losses = [-mean for mean in group_means(rewards, len(batch))]
        return torch.tensor(losses if groups is not None else losses[0], dtype=torch.float64)

    def per_example(self, model: torch.nn.Module, examples: list[EncodedReward], batch_size: int
                    ) -> dict[str, list[float]]:
        """Each example's reward at theta, in input order."""
        return {"reward": in_length_order(examples, batch_size, lambda batch: self.rewards(model, batch))}


Objective = ChoiceObjective | GenerationObjective | RewardObjective


def task_loss(kind: str, loss: str) -> str:
    """``task.loss`` for a task of `kind`, checked; ``auto`` is ce for multiple choice, lm for generation, reward
    for a reward task."""
    losses = {"choice": LOSSES, "generation": GENERATION_LOSSES, "reward": REWARD_LOSSES}[kind]
    if loss == "auto":
        return losses[0]
    if loss not in losses:
        raise ValueError(f"task.loss={loss!r} does not apply to a {kind} task; choose one of {('auto', *losses)}")
    return loss


def make_objective(
    kind: str, tokenizer: Any, head: str, loss: str, max_length: int, max_new_tokens: int,
    reward: Reward | None = None, temperature: float = 0.0,
) -> Objective:
    """The objective of a run on a task of `kind` ('choice', 'generation' or 'reward'), whose model has `head`
    ('causal' or 'masked') and whose task.loss is `loss` (resolved: not 'auto'); a reward task's ``reward`` and
    training ``temperature``."""
    if kind == "reward":
        if reward is None:
            raise ValueError("a reward task needs a reward function (task.reward)")
        return RewardObjective(tokenizer, reward, max_length, max_new_tokens, temperature)
    if kind == "generation":
        return GenerationObjective(tokenizer, loss, max_length, max_new_tokens)
    return ChoiceObjective(tokenizer, head, loss, max_length)
