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

A resumed run keeps the log's header and its records of the steps before the checkpoint's, and appends
from there (:func:`check_resume`, :func:`start_log`): records of later steps are recomputed, so they
are dropped, a record cut short by a kill during its append with a warning. A log that cannot go on
(its header or an earlier record damaged, records missing) is refused, the file left as it was; moving
it away resumes with a new log from the checkpoint's step, which cannot replay the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zo_scale.core.optimizer import StepRecord
from zo_scale.core.sweep import ARITHMETIC_VERSION

log = logging.getLogger(__name__)

_FIELDS = {f.name for f in dataclasses.fields(StepRecord)}
_REQUIRED = {f.name for f in dataclasses.fields(StepRecord)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
# How a refusal to resume ends: the log is the only copy of the steps before the checkpoint
_LEFT_AS_IT_WAS = ("Nothing was changed; restore the log from a backup, or move it away to resume with a new log "
                   "from the checkpoint's step (it cannot replay the run)")


class SeedLogError(ValueError):
    """A seed log that cannot be continued or replayed; the message names the file, the line and what to do."""


def write_header(path: Path, config: dict[str, Any], first_step: int = 0) -> None:
    """Start a new log (atomically) whose records begin at step ``first_step`` (> 0 only when a resumed
    run's log was lost: such a log cannot replay the run)."""
    first: dict[str, Any] = {"header": config, "sweep_arithmetic": ARITHMETIC_VERSION}
    if first_step:
        first["first_step"] = first_step
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(first) + "\n")
    os.replace(tmp, path)


def append(path: Path, record: StepRecord) -> None:
    with path.open("a") as f:
        f.write(json.dumps(dataclasses.asdict(record)) + "\n")


def _parsed(line: bytes) -> Any:
    """A line's JSON; None when it is cut short (every line ends with its newline) or not JSON."""
    try:
        return json.loads(line) if line.endswith(b"\n") else None
    except ValueError:  # not JSON, or not UTF-8
        return None


def _header(line: bytes) -> dict[str, Any] | None:
    first = _parsed(line)
    return first if isinstance(first, dict) and "header" in first else None


def _record(line: bytes) -> dict[str, Any] | None:
    row = _parsed(line)
    return row if isinstance(row, dict) and _REQUIRED <= set(row) <= _FIELDS else None


def _first_line(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        first = _header(f.readline())
    if first is None:
        raise SeedLogError(f"{path}: not a zo-scale seed log (its first line is no whole header)")
    return first


def read_header(path: Path) -> dict[str, Any]:
    """The logged config; warns when the log was written with another sweep arithmetic (logs from
    before the version was recorded are version 1), and refuses a log whose directions have changed since."""
    first = _first_line(path)
    version, header = first.get("sweep_arithmetic", 1), first["header"]
    optim = header.get("optim", {}) if isinstance(header, dict) else {}
    changed = {3: ("sparse directions", optim.get("sampler") == "sparse"),  # other masks before version 3
               4: ("LOZO directions", optim.get("sampler") == "lowrank")}  # other steps before version 4
    for since, (what, applies) in changed.items():
        if version < since and applies:
            raise SeedLogError(f"{path}: written with sweep arithmetic version {version}; {what} take other steps "
                               f"since version {since} (this zo-scale: {ARITHMETIC_VERSION}), so it cannot be "
                               "replayed")
    if version != ARITHMETIC_VERSION:
        log.warning("%s was written with sweep arithmetic version %s, this zo-scale uses %s: the replayed weights "
                    "equal the trained ones to rounding error, not bit for bit", path, version, ARITHMETIC_VERSION)
    return header


def read_records(path: Path) -> Iterator[StepRecord]:
    """The logged steps in order; SeedLogError naming the line for one that is cut short, malformed, or
    out of sequence (the step numbers must run on from the first: 0, 1, 2, ...)."""
    step = _first_line(path).get("first_step", 0)
    with path.open("rb") as f:
        next(f)
        for line_no, line in enumerate(f, start=2):
            row = _record(line)
            if row is None:
                raise SeedLogError(f"{path}, line {line_no}: not a whole step record (cut short when the run was "
                                   "killed, or edited); rerun the training command to finish the run: it cuts off "
                                   "a record cut short after its checkpoint")
            if row["step"] != step:
                raise SeedLogError(f"{path}, line {line_no}: step {row['step']} where step {step} belongs: the log "
                                   "has lost or repeated steps")
            yield StepRecord(**row)
            step += 1


def check_resume(path: Path, start: int) -> int:
    """How much of the log at ``path`` a run resumed at step ``start`` keeps: the byte length of its header
    and its records of the steps before ``start``; 0 when there is no log (a new one starts at ``start``,
    which cannot replay the run: a warning says so). Only reads.

    Records from ``start`` on are recomputed by the resumed run, so they are dropped: a damaged one (a
    kill during its append) with a warning. A damaged header, a damaged or out-of-sequence record before
    ``start``, or fewer records than ``start`` is a SeedLogError naming the file and line.
    """
    if not path.exists():
        if start:
            log.warning("%s is missing: a new seed log starts at step %d; it cannot replay the run", path, start)
        return 0
    cut: list[int] = []  # lines of damaged records after the checkpoint's step
    with path.open("rb") as f:
        header = f.readline()
        first = _header(header)
        if first is None:
            raise SeedLogError(f"{path}, line 1: not a whole seed-log header (emptied, cut short or overwritten). "
                               f"{_LEFT_AS_IT_WAS}")
        step, keep = first.get("first_step", 0), len(header)
        if step > start:
            raise SeedLogError(f"{path} starts at step {step}, after the checkpoint's step {start}. {_LEFT_AS_IT_WAS}")
        for line_no, line in enumerate(f, start=2):
            row = _record(line)
            if step < start:  # kept: it must be whole, and the step that belongs there
                if row is None:
                    raise SeedLogError(f"{path}, line {line_no}: not a whole step record, before the checkpoint's "
                                       f"step {start}. {_LEFT_AS_IT_WAS}")
                if row["step"] != step:
                    raise SeedLogError(f"{path}, line {line_no}: step {row['step']} where step {step} belongs. "
                                       f"{_LEFT_AS_IT_WAS}")
                step, keep = step + 1, keep + len(line)
            elif row is None:
                cut.append(line_no)
    if step < start:
        lost = f"record of step {step} is" if step == start - 1 else f"records of steps {step} to {start - 1} are"
        raise SeedLogError(f"{path} ends before step {step} but the checkpoint is at step {start}: the {lost} "
                           f"lost. {_LEFT_AS_IT_WAS}")
    if cut:
        log.warning("%s, line %s: a step record cut short after the checkpoint's step %d (the run was killed while "
                    "writing it): cut off, the resumed run computes that step again", path,
                    ", ".join(map(str, cut)), start)
    return keep


def start_log(path: Path, config: dict[str, Any], start: int = 0, keep: int = 0) -> None:
    """Ready the log at ``path`` for the records of steps ``start``, ``start + 1``, ...: with ``keep`` > 0
    cut it to its first ``keep`` bytes (as :func:`check_resume` measured them: a resumed run's header and
    earlier records), else write a new log with the header ``config``. Atomic."""
    if not keep:
        write_header(path, config, first_step=start)
    elif path.stat().st_size > keep:  # records from the checkpoint's step on: the resumed run writes them again
        tmp = path.with_name(path.name + ".tmp")
        shutil.copyfile(path, tmp)
        os.truncate(tmp, keep)
        os.replace(tmp, path)


def replay(log: Path, output: Path) -> Path:
    """Rebuild the fine-tuned model (or adapter, for a PEFT run) from its base model and the seed log;
    save it to ``output``."""
    from zo_scale.backends.runtime import Runtime
    from zo_scale.train.build import build_optimizer
    from zo_scale.train.config import load_config
    from zo_scale.train.trainable import load_trainable

    header = read_header(log)
    first_step = _first_line(log).get("first_step", 0)
    if first_step:
        raise SeedLogError(f"{log} starts at step {first_step}: the log was lost and a new one started when the run "
                           "resumed from its checkpoint, so it cannot replay the run")
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
