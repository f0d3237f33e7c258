"""MeZO's data protocol: small train and dev sets sampled from the train split, plus an eval sample.

MeZO (Malladi et al. 2023) trains on 1,000 examples, selects checkpoints on 500 dev examples drawn
from the same train split, and tests on 1,000 examples of the validation split.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

from zo_scale.tasks.example import Example, TaskDataError
from zo_scale.tasks.task import Task


def _count(name: str, value: int | None, allow_all: bool) -> int | None:
    """Validate a requested size; None means "all" (as does -1, the CLI spelling)."""
    if allow_all and (value is None or value == -1):
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        allowed = "an int >= 0, or None/-1 for all" if allow_all else "an int >= 0"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def sample_splits(
    task: Task,
    num_train: int | None = 1000,
    num_dev: int = 500,
    num_eval: int | None = 1000,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, dev, eval) Examples, deterministic for a seed and pairwise disjoint.

    Train and dev are drawn without replacement from the train split; eval is a sample of the eval split
    (all of it when num_eval is None/-1 or larger than the split). When both splits are one file (BoolQ,
    WiC and MultiRC here), eval is drawn first and train/dev come from the remaining rows.
    When the train split is too small, dev keeps its size and train gets what is left (as in MeZO, where
    CB and COPA runs ask for more than exists), with a warning.
    """
    num_train = _count("num_train", num_train, allow_all=True)
    num_dev = _count("num_dev", num_dev, allow_all=False)
    num_eval = _count("num_eval", num_eval, allow_all=True)

    train_pool, eval_ex, shared_file = _train_pool_and_eval(task, num_eval, seed, data_dir)
    available = len(train_pool)
    if num_dev > available or (num_dev == available and num_train != 0):
        where = (f"{available + len(eval_ex)} rows in its one file, {len(eval_ex)} of them the eval sample "
                 f"(num_eval), leave {available}" if shared_file else f"its train split has {available} rows")
        raise ValueError(f"{task.name}: {where}, and num_dev={num_dev} takes "
                         f"{'all' if num_dev == available else 'more than all'} of them: no training examples; "
                         "lower num_dev" + (" or num_eval" if shared_file else ""))
    train_size = available - num_dev if num_train is None else min(num_train, available - num_dev)
    if num_train is not None and train_size < num_train:
        warnings.warn(
            f"{task.name}: asked for {num_train} train + {num_dev} dev examples but only {available} "
            f"are available; training on {train_size}",
            stacklevel=2,
        )
    picked = random.Random(seed).sample(train_pool, num_dev + train_size)
    return picked[num_dev:], picked[:num_dev], eval_ex


def _train_pool_and_eval(
    task: Task, num_eval: int | None, seed: int, data_dir: str | Path | None
) -> tuple[list[Example], list[Example], bool]:
    """(the train-split Examples left for train and dev, the eval sample, whether both splits are one
    file: then the eval sample's rows are not in the first list)."""
    eval_pool = task.examples("eval", data_dir)
    shared_file = task.path("train", data_dir) == task.path("eval", data_dir)
    train_pool = eval_pool if shared_file else task.examples("train", data_dir)
    for split, pool in (("train", train_pool), ("eval", eval_pool)):
        if not pool:
            raise TaskDataError(f"{task.path(split, data_dir)}: no data rows, so task {task.name} has no {split} "
                                "examples")

    # Separate generators, so that for two-file tasks the train/dev draw does not depend on num_eval.
    eval_idx = list(range(len(eval_pool)))
    if num_eval is not None and num_eval < len(eval_idx):
        eval_idx = random.Random(seed).sample(eval_idx, num_eval)
    taken = set(eval_idx) if shared_file else set()
    candidates = [train_pool[i] for i in range(len(train_pool)) if i not in taken]
    return candidates, [eval_pool[i] for i in eval_idx], shared_file


def sample_k_shot(
    task: Task, k: int, num_eval: int | None = 1000, seed: int = 0, data_dir: str | Path | None = None
) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, dev, eval) for few-shot fine-tuning: k train and k dev examples per class.

    LM-BFF's protocol (Gao et al. 2021), which MeZO's medium-model experiments follow with k = 16
    and k = 512: train and dev hold k examples of every label, drawn without replacement from the
    train split, disjoint; eval is drawn as :func:`sample_splits` draws it. Departs from LM-BFF in
    where eval comes from: its test set is the original dev set, whole; here that is num_eval=-1.
    Each list is in a seeded random order (not grouped by class).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k (examples per class) must be an int >= 1, got {k!r}")
    if task.kind != "choice":
        raise ValueError(f"{task.name} is a {task.kind} task: it has no classes to draw k examples of; use "
                         "task.num_train and task.num_dev")
    num_eval = _count("num_eval", num_eval, allow_all=True)
    pool, eval_ex, _ = _train_pool_and_eval(task, num_eval, seed, data_dir)
    by_label: dict[int, list[Example]] = {}
    for ex in pool:
        by_label.setdefault(ex.label, []).append(ex)
    short = {label: len(exs) for label, exs in sorted(by_label.items()) if len(exs) < 2 * k}
    if short:
        raise ValueError(f"{task.name}: k={k} per class takes {2 * k} examples of each label (train + dev), but "
                         f"label(s) {short} have fewer in the train split; lower task.k_shot")
    rng = random.Random(seed)
    train, dev = [], []
    for label in sorted(by_label):
        picked = rng.sample(by_label[label], 2 * k)
        train += picked[:k]
        dev += picked[k:]
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev, eval_ex

