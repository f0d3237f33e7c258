"""The seed log: a whole ZO fine-tune as a few bytes per step.

A JSONL file: a header line (the resolved config) then one line per step with the fields of
:class:`~zo_scale.core.optimizer.StepRecord`: step, seed, projected gradient(s), lr(s), weight
decay(s), loss and, for ZO-SGD-Cons, the move taken. Directions are functions of (seed, step), so
base weights + this log determine the fine-tuned weights: :func:`replay` rebuilds them by running
the optimizer's passes with the logged scalars instead of forwards, bit for bit equal to the trained
weights in fp32. Every rule and sampler replays (stateful rules rebuild their buffers as they go);
what cannot replay is a run whose parameter set or order differs from the base model's, or a hybrid
ZO-FO run (its backprop part is not logged). A PEFT run replays to its adapter.

The header also records the sweep's arithmetic version (:data:`zo_scale.core.sweep.ARITHMETIC_VERSION`):
a log written by another version replays to weights equal to rounding error, not bit for bit, and
:func:`replay` says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zo_scale.core.optimizer import StepRecord
from zo_scale.core.sweep import ARITHMETIC_VERSION

log = logging.getLogger(__name__)


def write_header(path: Path, config: dict[str, Any], keep_steps_below: int = 0) -> None:
    """Start the log, or on resume keep the records of steps < ``keep_steps_below`` (atomic rewrite)."""
    kept = [r for r in read_records(path) if r.step < keep_steps_below] if keep_steps_below and path.exists() else []
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps({"header": config, "sweep_arithmetic": ARITHMETIC_VERSION}) + "\n")
        for record in kept:
            f.write(json.dumps(dataclasses.asdict(record)) + "\n")
    os.replace(tmp, path)


def append(path: Path, record: StepRecord) -> None:
    with path.open("a") as f:
        f.write(json.dumps(dataclasses.asdict(record)) + "\n")


def read_header(path: Path) -> dict[str, Any]:
    """The logged config; warns when the log was written with another sweep arithmetic (logs from
    before the version was recorded are version 1), and refuses a log whose directions have changed since."""
    with path.open() as f:
        line = f.readline()
    try:
        first = json.loads(line)
    except json.JSONDecodeError:
        first = {}
    if not isinstance(first, dict) or "header" not in first:
        raise ValueError(f"{path}: not a zo-scale seed log (first line has no header)")
    version, header = first.get("sweep_arithmetic", 1), first["header"]
    optim = header.get("optim", {}) if isinstance(header, dict) else {}
    changed = {3: ("sparse directions", optim.get("sampler") == "sparse"),  # other masks before version 3
               4: ("LOZO directions", optim.get("sampler") == "lowrank")}  # other steps before version 4
    for since, (what, applies) in changed.items():
        if version < since and applies:
            raise ValueError(f"{path}: written with sweep arithmetic version {version}; {what} take other steps "
                             f"since version {since} (this zo-scale: {ARITHMETIC_VERSION}), so it cannot be replayed")
    if version != ARITHMETIC_VERSION:
        log.warning("%s was written with sweep arithmetic version %s, this zo-scale uses %s: the replayed weights "
                    "equal the trained ones to rounding error, not bit for bit", path, version, ARITHMETIC_VERSION)
    return header


def read_records(path: Path) -> Iterator[StepRecord]:
    """The logged steps in order; ValueError naming the line for one that is cut short, malformed, or
    out of sequence (the step numbers must run 0, 1, 2, ...)."""
    fields = {f.name for f in dataclasses.fields(StepRecord)}
    required = {f.name for f in dataclasses.fields(StepRecord)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    with path.open() as f:
        next(f)
        for line_no, line in enumerate(f, start=2):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or not required <= set(row) <= fields:
                raise ValueError(f"{path}, line {line_no}: not a whole step record (cut short when the run was "
                                 "killed, or edited); rerun the training command to rewrite the log from its "
                                 "checkpoint")
            if row["step"] != line_no - 2:
                raise ValueError(f"{path}, line {line_no}: step {row['step']} where step {line_no - 2} belongs: "
                                 "the log has lost or repeated steps")
            yield StepRecord(**row)


def replay(log: Path, output: Path) -> Path:
    """Rebuild the fine-tuned model (or adapter, for a PEFT run) from its base model and the seed log;
    save it to ``output``."""
    from zo_scale.backends.runtime import Runtime
    from zo_scale.train.build import build_optimizer
    from zo_scale.train.config import load_config
    from zo_scale.train.trainable import load_trainable

    header = read_header(log)
    cfg = load_config(overrides=[f"{s}.{k}={json.dumps(v)}" for s, sec in header.items() for k, v in sec.items()])
    if cfg.hybrid.fo_layers:
        raise ValueError(f"{log}: a hybrid ZO-FO run (hybrid.fo_layers={cfg.hybrid.fo_layers}) cannot be replayed: "
                         "its backprop part is not in the seed log")
    trainable = load_trainable(cfg, Runtime(), checkpoint=None)
    optimizer, _ = build_optimizer(trainable.named, cfg.optim, cfg.run.seed, cfg.run.steps, model=trainable.model)
    for record in read_records(log):
        optimizer.step(replay=record)
    optimizer.flush()
    trainable.model.save_pretrained(output)
    trainable.tokenizer.save_pretrained(output)
    return output
