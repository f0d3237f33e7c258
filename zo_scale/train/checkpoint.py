"""Checkpoints written atomically: a crash mid-write never leaves a checkpoint that looks complete.

Layout of ``<output_dir>/checkpoint``: ``model/`` (``save_pretrained`` of the full weights, in the
training dtype, gathered on rank 0 under ZeRO-3: safetensors + config + tokenizer; loads with
``from_pretrained`` for inference, or partitioned again on any number of ranks) or, for a PEFT run,
``adapter/`` (peft's ``adapter_config.json`` + ``adapter_model.safetensors`` + tokenizer; loads with
``PeftModel.from_pretrained(base, folder)``),
``optimizer.pt`` (ZO counters and rule buffers), ``schedule.pt``, for a hybrid ZO-FO run the FO
optimizer's state (see :mod:`zo_scale.train.run_optimizer`), and ``trainer_state.json`` (step and
the non-finite counter). Data order and noise are functions of the step, so these restart the run
on the same trajectory.

Atomicity: everything goes into ``checkpoint.tmp``; then the old checkpoint is renamed aside, the new
one renamed into place, and the old one deleted. Directory renames are atomic on one filesystem, so
at any moment either ``checkpoint`` or ``checkpoint.old`` is whole; :func:`latest_checkpoint` takes
whichever is.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.json"  # written last: its presence marks a whole checkpoint


def staging_dir(directory: Path) -> Path:
    """Where the next checkpoint is written before it is renamed into place."""
    return directory.with_name(directory.name + ".tmp")


def stage_checkpoint(directory: Path) -> Path:
    """An empty staging folder for the next checkpoint (for files every rank writes before rank 0
    calls ``save_checkpoint(..., staged=True)``)."""
    tmp = staging_dir(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(
    directory: Path, model: Any, tokenizer: Any, files: dict[str, Any], state: dict,
    model_state: dict[str, torch.Tensor] | None = None, folder: str = "model", staged: bool = False,
) -> Path:
    """Write the checkpoint to ``directory`` atomically and return its path.

    ``files``: file name -> object to ``torch.save`` (the optimizer states, consolidated so that the
    checkpoint loads on any number of ranks: see :mod:`zo_scale.train.sharded_state`).
    ``model_state``: the full weights when the model itself holds only a partition (ZeRO-3); the
    model's own state_dict by default. ``folder``: 'model', or 'adapter' for a peft model (whose
    ``save_pretrained`` writes the adapter only, in peft's format). ``staged``: add to the folder
    :func:`stage_checkpoint` made (it holds per-rank files) instead of starting an empty one.
    """
    tmp, old = staging_dir(directory), directory.with_name(directory.name + ".old")
    if not staged:
        stage_checkpoint(directory)
    model.save_pretrained(tmp / folder, state_dict=model_state)
    tokenizer.save_pretrained(tmp / folder)
    for name, obj in files.items():
        torch.save(obj, tmp / name)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def latest_checkpoint(directory: Path) -> Path | None:
    """The whole checkpoint at ``directory`` (or its ``.old`` twin left by a crash), else None."""
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def load_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())
