"""Which implementation runs the ZO sweep: one compiled kernel per shard, or the eager reference.

On a GPU every tensor op is a kernel launch. The eager sweep issues tens of ops per 64K-element chunk
(a 70B model has about a million chunks per pass), so it would spend minutes per step launching
kernels. The compiled path hands the whole shard to ``torch.compile`` (inductor: C++/OpenMP SIMD on
CPU, Triton on CUDA) as one elementwise function: noise generation, every move and the rule's update
fuse into a single pass that reads and writes each element once and never materializes z.

Both paths evaluate the same floating-point operations in the same order, so the choice never
changes a result (``tests/core/test_kernel.py`` checks this bit for bit). Modes:

- ``auto`` (default): compiled on an accelerator; on the CPU compiled for shards of at least
  :data:`MIN_COMPILED_NUMEL` elements (a smaller shard is one eager chunk, and a compile costs more
  than it saves there); eager, with one warning, where the compiler is missing or fails.
- ``compiled``: always compiled; a compiler failure raises.
- ``eager``: the chunked tensor-op reference.

The mode comes from the caller (``ZOOptimizer(kernel=...)``, config ``optim.kernel``), else from the
environment variable ``ZO_SCALE_KERNEL``, else ``auto``.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable, Hashable
from typing import Any

import torch

MODES = ("auto", "compiled", "eager")
ENV = "ZO_SCALE_KERNEL"
MIN_COMPILED_NUMEL = 1 << 16

log = logging.getLogger(__name__)

_compiled: dict[Hashable, Callable[..., Any]] = {}
_failure: str | None = None  # why compiling failed in this process ('auto' then stays eager)
_announced: set[str] = set()


def resolve(mode: str | None) -> str:
    """The mode in force: ``mode``, else ``$ZO_SCALE_KERNEL``, else 'auto'; an unknown name raises."""
    chosen = mode if mode is not None else os.environ.get(ENV) or "auto"
    if chosen not in MODES:
        source = "kernel" if mode is not None else f"${ENV}"
        raise ValueError(f"{source}={chosen!r} is not a sweep kernel mode; choose one of {MODES}")
    return chosen


def wants_compiled(mode: str | None, device: torch.device, numel: int) -> bool:
    """Whether a sweep over ``numel`` elements on ``device`` should run compiled under this mode."""
    chosen = resolve(mode)
    if chosen == "eager" or (chosen == "auto" and _failure is not None):
        return False
    return chosen == "compiled" or device.type != "cpu" or numel >= MIN_COMPILED_NUMEL


def describe(mode: str | None, device: torch.device) -> str:
    """One line for the log: what runs the sweep under this mode on this device."""
    chosen = resolve(mode)
    if chosen == "eager":
        return "eager tensor ops (reference)"
    if _failure is not None and chosen == "auto":
        return f"eager tensor ops (torch.compile failed: {_failure})"
    backend = "Triton" if device.type == "cuda" else "C++/OpenMP" if device.type == "cpu" else device.type
    small = f"; shards under {MIN_COMPILED_NUMEL} elements eager" if chosen == "auto" and device.type == "cpu" else ""
    return f"one torch.compile kernel per shard (inductor, {backend}{small})"


def compiled(factory: Callable[[Any], Callable[..., Any]], plan: Hashable, large: bool = True,
             exact_casts: bool = False) -> Callable[..., Any]:
    """``factory(plan)`` compiled with dynamic shapes and scalars, made once per plan.

    ``plan`` is the static part of a kernel (which noise kinds, which moves, which rule); everything
    that changes from step to step or shard to shard (sizes, seeds, coefficients) is a call argument,
    so a plan compiles once per dtype, not once per shape or step. Each plan's function gets its own
    code object: dynamo's recompile limit counts per code object, and closures share theirs.

    ``large``: whether the shards are of at least :data:`MIN_COMPILED_NUMEL` elements. Inductor
    decides from the first call's size whether the C++ kernel runs on several threads, so small and
    large shards get kernels of their own, and its on-disk graph cache (which would hand a kernel made
    for a small shard in another process to a large one) is off for these: the generated C++ is still
    cached by its source. ``exact_casts``: keep every explicit rounding to a narrower dtype, which
    inductor otherwise folds away (emulate_precision_casts; slower, so only plans that round mid-way).
    """
    key = (factory, plan, large, exact_casts)
    if key not in _compiled:
        fn = factory(plan)
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_compiled)}")
        fn = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        options = {"emulate_precision_casts": exact_casts, "fx_graph_cache": False}
        _compiled[key] = torch.compile(fn, dynamic=True, fullgraph=True, options=options)
    return _compiled[key]


def run(mode: str | None, factory: Callable[[Any], Callable[..., Any]], plan: Hashable, *args: Any,
        numel: int, exact_casts: bool = False) -> bool:
    """Run the compiled kernel of ``plan`` on ``args`` (a shard of ``numel`` elements); False if it could
    not be compiled (then the caller runs the eager reference). Under 'compiled' a failure raises."""
    global _failure
    try:
        with torch.no_grad():  # one grad mode for every call: dynamo guards on it (a flip recompiles)
            compiled(factory, plan, numel >= MIN_COMPILED_NUMEL, exact_casts)(*args)
    except Exception as error:  # inductor raises many types (no compiler, codegen, backend errors)
        if resolve(mode) == "compiled":
            raise
        _failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        log.warning("ZO sweep: torch.compile failed, running the eager reference instead (%s)", _failure)
        return False
    return True


def announce(mode: str | None, device: torch.device) -> None:
    """Log once per process and device which implementation runs the sweep."""
    line = describe(mode, device)
    if line not in _announced:
        _announced.add(line)
        log.info("ZO sweep on %s: %s", device, line)
