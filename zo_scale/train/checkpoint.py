"""Checkpoints written atomically: a crash mid-write never leaves a checkpoint that looks complete.

Layout of ``<output_dir>/checkpoint``: ``model/`` (an HF folder of the full weights in the training
dtype: config, sharded safetensors of at most ``run.save_shard_size`` each with their index, tokenizer;
under ZeRO-3 streamed, one parameter gathered at a time, see ``Zero3Runtime.save_model``; loads with
``from_pretrained`` for inference, or partitioned again on any number of ranks) or, for a PEFT run,
``adapter/`` (peft's ``adapter_config.json`` + ``adapter_model.safetensors`` + tokenizer; loads with
``PeftModel.from_pretrained(base, folder)``),
``optimizer.pt`` + ``optimizer_state.rank<r>.safetensors`` (ZO counters; each rank's slices of the
rule buffers), ``schedule.pt``, for a hybrid ZO-FO run the FO
optimizer's state (see :mod:`zo_scale.train.run_optimizer`), and ``trainer_state.json`` (step and
the non-finite counter). Data order and noise are functions of the step, so these restart the run
on the same trajectory.

Atomicity: everything goes into ``checkpoint.tmp``; then the old checkpoint is renamed aside, the new
one renamed into place, and the old one deleted. Directory renames are atomic on one filesystem, so
at any moment either ``checkpoint`` or ``checkpoint.old`` is whole; :func:`latest_checkpoint` takes
whichever is. A write that fails (a full disk, a permission) removes the staged folder and raises
:class:`CheckpointWriteError`, which says which checkpoint is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"  # written last: its presence marks a whole checkpoint


def staging_dir(directory: Path) -> Path:
    """Where the next checkpoint is written before it is renamed into place."""
    return directory.with_name(directory.name + ".tmp")


def stage_checkpoint(directory: Path) -> Path:
    """An empty staging folder for the next checkpoint, where every rank writes its files before rank 0
    calls :func:`commit_checkpoint`."""
    tmp = staging_dir(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(directory: Path, tokenizer: Any, state: dict, folder: str = "model",
                      adapter_model: Any = None) -> Path:
    """Complete the checkpoint staged by :func:`stage_checkpoint` (where every rank has written its files:
    the model's weights, the optimizer state) and move it to ``directory`` atomically; returns its path.

    ``folder``: 'model', or 'adapter' for a peft model, whose ``save_pretrained`` (``adapter_model``)
    writes the adapter only, in peft's format, here. The tokenizer joins the weights, then
    ``trainer_state.json`` (``state``) is written last, then the renames.
    """
    tmp, old = staging_dir(directory), directory.with_name(directory.name + ".old")
    if adapter_model is not None:
        adapter_model.save_pretrained(tmp / folder)
    tokenizer.save_pretrained(tmp / folder)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the cause and the checkpoint left intact."""


@contextlib.contextmanager
def writing_checkpoint(directory: Path, step: int) -> Iterator[None]:
    """Around the writes of step ``step``'s checkpoint: an OSError (ENOSPC, EACCES, ...) inside removes the
    partial staged folder, giving its space back, and becomes a :class:`CheckpointWriteError`."""
    try:
        yield
    except OSError as err:
        shutil.rmtree(staging_dir(directory), ignore_errors=True)
        kept = latest_checkpoint(directory)
        left = (f"the last checkpoint ({kept}, step {load_trainer_state(kept)['step']}) is intact" if kept is not None
                else "no earlier checkpoint exists")
        raise CheckpointWriteError(
            f"writing the checkpoint of step {step} into {directory.parent} failed: {err.strerror or err}; {left}. "
            "Free space (or fix the permissions) and run the same command: it resumes from the last checkpoint"
        ) from err


def latest_checkpoint(directory: Path) -> Path | None:
    """The whole checkpoint at ``directory`` (or its ``.old`` twin left by a crash), else None."""
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


class CheckpointReadError(ValueError):
    """A checkpoint whose trainer state is not one this trainer wrote (truncated, edited, another format)."""


def load_trainer_state(checkpoint: Path) -> dict:
    """The ``trainer_state.json`` of ``checkpoint``; CheckpointReadError naming the file if it is not whole."""
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointReadError(f"{path}: not a whole trainer state ({err}); move {checkpoint} away to start "
                                  "the run afresh, or restore it") from None
    missing = [k for k in ("step", "config", "world_size") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointReadError(f"{path}: lacks {missing}: not a checkpoint written by this trainer")
    return state
