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

Damage: ``trainer_state.json`` lists every other file of the checkpoint with its size. A resume first
checks them all (:func:`check_checkpoint`: there, of that size, and where a cheap look can tell, readable),
so a file deleted, cut short, emptied or overwritten is named before any model loads; the reads
themselves go through :func:`reading`, which names the file too. Either way a :class:`CheckpointReadError`,
and nothing in the run folder is changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

STATE_FILE = "trainer_state.json"  # written last: its presence marks a whole checkpoint
FILES = "files"  # in the trainer state: {path relative to the checkpoint: size in bytes} of every other file


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
    ``trainer_state.json`` (``state``, with the list of the files beside it) is written last, then the renames.
    """
    tmp, old = staging_dir(directory), directory.with_name(directory.name + ".old")
    if adapter_model is not None:
        adapter_model.save_pretrained(tmp / folder)
    tokenizer.save_pretrained(tmp / folder)
    files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / STATE_FILE).write_text(json.dumps({**state, FILES: files}, indent=2))
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


class CheckpointReadError(ValueError):
    """A checkpoint file that is missing, cut short or not what this trainer wrote; the message names it and
    what to do."""


def _damaged(path: Path, checkpoint: Path, what: str) -> CheckpointReadError:
    return CheckpointReadError(f"{path}: {what}. Nothing was changed; move {checkpoint} away to start the run "
                               "afresh, or restore it from a backup")


def latest_checkpoint(directory: Path) -> Path | None:
    """The whole checkpoint at ``directory`` (or its ``.old`` twin left by a crash), else None.

    Every commit renames a folder that holds its trainer state, so a checkpoint folder without one has
    been damaged since (starting afresh would delete it at the first save): a CheckpointReadError."""
    old = directory.with_name(directory.name + ".old")
    if (directory / STATE_FILE).is_file():
        return directory
    if directory.exists():  # (a ``.old`` without one is a deletion cut short: ignored)
        raise _damaged(directory / STATE_FILE, directory, "missing, so this checkpoint cannot be resumed")
    return old if (old / STATE_FILE).is_file() else None


def _first_line(err: BaseException) -> str:
    """A reader's complaint in one line (torch's run to paragraphs), or its type when it says nothing."""
    return next(iter(str(err).strip().splitlines()), "") or type(err).__name__


# What the readers of a checkpoint (json, torch.load, safetensors, zipfile, peft) raise for a file
# that is missing, cut short or overwritten.
_READ_ERRORS = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
                SafetensorError)


@contextlib.contextmanager
def reading(path: Path, checkpoint: Path) -> Iterator[None]:
    """Around a read of ``path``, a file (or folder) of ``checkpoint``: the reader's failure becomes a
    CheckpointReadError naming the file."""
    try:
        yield
    except _READ_ERRORS as err:
        reason = "missing" if isinstance(err, FileNotFoundError) else f"cannot be read ({_first_line(err)})"
        raise _damaged(path, checkpoint, reason) from None


def torch_load(path: Path, checkpoint: Path) -> Any:
    """``torch.load`` of a file of ``checkpoint`` onto the CPU, tensors and plain data only (no code runs);
    CheckpointReadError naming the file when it is not whole."""
    with reading(path, checkpoint):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_trainer_state(checkpoint: Path) -> dict:
    """The ``trainer_state.json`` of ``checkpoint``; CheckpointReadError naming the file if it is not whole."""
    path = checkpoint / STATE_FILE
    with reading(path, checkpoint):
        state = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in ("step", "config", "world_size") if not isinstance(state, dict) or k not in state]
    if missing:
        raise _damaged(path, checkpoint, f"lacks {missing}: not a checkpoint written by this trainer")
    return state


def check_checkpoint(checkpoint: Path) -> dict:
    """The trainer state of ``checkpoint``, once every file it lists is there, of the size written, and
    readable where a cheap look can tell (JSON parses, a safetensors header, a torch file's zip directory).

    Catches a damaged checkpoint before any model loads. A checkpoint written before the trainer state
    listed its files has the files it holds looked at: one deleted from it is named when it is read.
    """
    state = load_trainer_state(checkpoint)
    listed = state.get(FILES)
    if listed is None:
        listed = {f.relative_to(checkpoint).as_posix(): None for f in sorted(checkpoint.rglob("*"))
                  if f.is_file() and f.name != STATE_FILE}
    for name, size in listed.items():
        path = checkpoint / name
        if not path.is_file():
            while not path.parent.exists():  # a whole folder gone (e.g. model/): name the folder
                path = path.parent
            raise _damaged(path, checkpoint, "missing")
        if size is not None and path.stat().st_size != size:
            raise _damaged(path, checkpoint, f"{path.stat().st_size} bytes where {size} were written (cut short or "
                           "overwritten)")
        with reading(path, checkpoint):
            _look_into(path)
    return state


def _look_into(path: Path) -> None:
    """Parse what is cheap to parse of ``path``: a reader raises if it is not whole. Other formats
    (a sentencepiece model, merges.txt) go by their size alone."""
    if path.suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
    elif path.suffix == ".safetensors":
        with safe_open(path, "pt"):  # parses the header and checks the file covers every tensor it lists
            pass
    elif path.suffix == ".pt":  # torch.save writes a zip: its directory is at the end, and a cut loses it
        zipfile.ZipFile(path).close()
