"""Which implementation runs the ZO sweep: one compiled kernel per shard, or the eager reference.

On a GPU every tensor op is a kernel launch. The eager sweep issues tens of ops per 64K-element chunk
(a 70B model has about a million chunks per pass), so it would spend minutes per step launching
kernels. The compiled path hands the whole shard to ``torch.compile`` (inductor: C++/OpenMP SIMD on
CPU, Triton on CUDA) as one elementwise function: noise generation, every move and the rule's update
fuse into a single pass that reads and writes each element once and never materializes z.

Both paths evaluate the same floating-point operations in the same order, so the choice never
changes a result (``tests/core/test_kernel.py`` checks this bit for bit). That takes compiler options
that keep eager's roundings (:func:`compile_options`): no fused multiply-adds, IEEE division.

Modes:

- ``auto`` (default): compiled on an accelerator; on the CPU compiled for shards of at least
  :data:`MIN_COMPILED_NUMEL` elements (a smaller shard is one eager chunk, and a compile costs more
  than it saves there). Where compiling fails, the CPU falls back to eager with a warning (a few times
  slower); an accelerator raises :class:`KernelCompileError` (eager is hundreds of times slower there,
  and one rank falling back alone would hold back all the others).
- ``compiled``: always compiled; a compiler failure raises.
- ``eager``: the chunked tensor-op reference.

The mode comes from the caller (``ZOOptimizer(kernel=...)``, config ``optim.kernel``), else from the
environment variable ``ZO_SCALE_KERNEL``, else ``auto``. :func:`report` says what ran, per device.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

MODES = ("auto", "compiled", "eager")
ENV = "ZO_SCALE_KERNEL"
MIN_COMPILED_NUMEL = 1 << 16

log = logging.getLogger(__name__)


class KernelCompileError(RuntimeError):
    """The compiled sweep failed where falling back to the eager reference is not allowed."""


@dataclass
class _Tally:
    """What ran the sweeps on one device in this process."""

    compiled: int = 0  # passes run by a compiled kernel
    eager: int = 0  # passes run by the eager reference
    failure: str | None = None  # why compiling failed here ('auto' then stays eager on this device)


_compiled: dict[Hashable, Callable[..., Any]] = {}
_tallies: dict[str, _Tally] = {}  # by device, as str(device): 'cpu', 'cuda:0'
_announced: set[str] = set()


def resolve(mode: str | None) -> str:
    """The mode in force: ``mode``, else ``$ZO_SCALE_KERNEL``, else 'auto'; an unknown name raises."""
    chosen = mode if mode is not None else os.environ.get(ENV) or "auto"
    if chosen not in MODES:
        source = "kernel" if mode is not None else f"${ENV}"
        raise ValueError(f"{source}={chosen!r} is not a sweep kernel mode; choose one of {MODES}")
    return chosen


def _failure_on(device: torch.device) -> str | None:
    """Why compiling failed on this device in this process, if it did."""
    tally = _tallies.get(str(device))
    return tally.failure if tally is not None else None


def _tally(device: torch.device) -> _Tally:
    """The device's tally, created at its first sweep."""
    return _tallies.setdefault(str(device), _Tally())


def compiles(mode: str | None, device: torch.device, numel: int) -> bool:
    """Whether a sweep over ``numel`` elements on ``device`` should run compiled under this mode."""
    chosen = resolve(mode)
    if chosen == "eager" or (chosen == "auto" and _failure_on(device) is not None):
        return False
    return chosen == "compiled" or device.type != "cpu" or numel >= MIN_COMPILED_NUMEL


def note_eager(device: torch.device) -> None:
    """Count one pass on ``device`` run by the eager reference (for :func:`report`)."""
    _tally(device).eager += 1


def wants_compiled(mode: str | None, device: torch.device, numel: int) -> bool:
    """:func:`compiles`, asked once per pass by a sweep that runs the eager reference when told no: so a
    no counts that eager pass. A caller that does not run the eager pass itself asks :func:`compiles`."""
    wanted = compiles(mode, device, numel)
    if not wanted:
        note_eager(device)
    return wanted


def fallback_allowed(mode: str | None, device: torch.device) -> bool:
    """Whether a failed compile may fall back to the eager reference: only under 'auto' on the CPU.

    On the CPU eager is a few times slower than compiled; on an accelerator it is hundreds of times
    slower (a launch per op per 64K chunk), so a run there that lost its kernel is not worth finishing
    unnoticed, and in a multi-rank run the rank that fell back would pace all the others.
    """
    return resolve(mode) == "auto" and device.type == "cpu"


def describe(mode: str | None, device: torch.device) -> str:
    """One line for the log: what runs the sweep under this mode on this device."""
    chosen = resolve(mode)
    if chosen == "eager":
        return "eager tensor ops (reference)"
    failure = _failure_on(device)
    if failure is not None and chosen == "auto":
        return f"eager tensor ops (torch.compile failed: {failure})"
    backend = "Triton" if device.type == "cuda" else "C++/OpenMP" if device.type == "cpu" else device.type
    small = f"; shards under {MIN_COMPILED_NUMEL} elements eager" if chosen == "auto" and device.type == "cpu" else ""
    return f"one torch.compile kernel per flat bucket of parameters, else per shard (inductor, {backend}{small})"


def compile_options(device_type: str, exact_casts: bool) -> dict[str, Any]:
    """The inductor options a sweep kernel for ``device_type`` compiles with: eager's roundings, kept.

    Passed per compile (``torch.compile(options=...)``), so the caller's own compiled code keeps its
    configuration. What each one holds, in torch 2.13's inductor:

    - ``emulate_precision_casts``: keep every explicit rounding to a narrower dtype, which inductor
      otherwise folds away (``lowering.py`` ``make_pointwise``, ``codegen/cpp.py``
      ``CppOverrides.to_dtype``). On a GPU it is also the only switch for fused multiply-adds: Triton
      kernels get ``enable_fp_fusion = not emulate_precision_casts`` (``codegen/triton.py``
      ``TritonKernel.triton_meta_common``), and without it neither LLVM (FP-op fusion) nor ptxas
      (``--fmad=false``) contracts; with it, ``t + c * z`` is one FMA (one rounding) where eager rounds
      twice (the Adam sweep's PTX for sm_90: 40 ``fma.rn.f32`` without, none with). So it is on for every
      GPU kernel, at some cost in speed: kept casts are extra conversions, no FMA is one more instruction
      per multiply-add, and inductor then links the CUDA toolkit's libdevice (warning where it finds no
      CUDA_HOME). On the CPU, whose C++ kernels are compiled without contraction anyway, it is on only
      for plans that round mid-way (``exact_casts``).
    - ``eager_numerics.division_rounding``: fp32 ``x / y`` as ``div_rn`` (IEEE, as eager CUDA) instead of
      Triton's approximate ``div.full.f32`` (``codegen/triton.py`` ``TritonOverrides.truediv``); Adam,
      HiZOO and the preconditioned directions divide. Read by Triton code generation only (C++ division
      is IEEE already).
    - ``eager_numerics.disable_ftz``: libdevice keeps subnormals, as eager CUDA does (Triton's
      ``enable_reflect_ftz``, set in ``runtime/triton_heuristics.py``
      ``CachingAutotuner._create_compile_options``); no kernel calls an fp32 libdevice function today
      (the one square root is fp64), so this guards the next one.
    - ``cpp.enable_floating_point_contract_flag`` 'off' and ``cpp.enable_unsafe_math_opt_flag`` False:
      the C++ compile flags ``-ffp-contract=off -fno-unsafe-math-optimizations``
      (``cpp_builder.py`` ``_get_optimization_cflags``), inductor's defaults, pinned against the
      environment variables that change them; ``cpu_backend`` 'cpp': the backend these hold for.
    - ``fx_graph_cache`` off: inductor decides from the first call's size whether a C++ kernel runs on
      several threads, and its on-disk graph cache would hand a kernel made for a small shard in another
      process to a large one (:func:`compiled`); the generated code is still cached by its source.

    - ``triton.autotune_pointwise`` False: one launch configuration per kernel. With it on, the first
      call of a one-dimensional pointwise kernel benchmarks two or more configurations, each on clones of
      every argument the kernel writes (``CachingAutotuner.clone_args``): a second copy of the shard
      (2 GB for a 1e9-element bf16 tensor) at the first step, on a device sized for one. The sweep is
      bound by memory traffic, which the configurations do not change.

    Square roots need no option: the sweep takes them in fp64 (``directions.sqrt64``), correctly rounded
    on every path.
    """
    return {
        "emulate_precision_casts": exact_casts or device_type != "cpu",
        "eager_numerics.division_rounding": True,
        "eager_numerics.disable_ftz": True,
        "cpp.enable_floating_point_contract_flag": "off",
        "cpp.enable_unsafe_math_opt_flag": False,
        "cpu_backend": "cpp",
        "fx_graph_cache": False,
        "triton.autotune_pointwise": False,
    }


def compiled(factory: Callable[[Any], Callable[..., Any]], plan: Hashable, large: bool = True,
             exact_casts: bool = False, device_type: str = "cpu", dtype: torch.dtype | None = None
             ) -> Callable[..., Any]:
    """``factory(plan)`` compiled with dynamic shapes and scalars for ``device_type``, made once per plan.

    ``plan`` is the static part of a kernel (which noise kinds, which moves, which rule); everything
    that changes from step to step or shard to shard (sizes, seeds, coefficients) is a call argument,
    so a plan compiles once per dtype, not once per shape or step. Each plan's function gets its own
    code object: dynamo's recompile limit counts per code object, and closures share theirs.

    ``large``: whether the shards are of at least :data:`MIN_COMPILED_NUMEL` elements. Inductor
    decides from the first call's size whether the C++ kernel runs on several threads, so small and
    large shards get kernels of their own. ``exact_casts``: the plan rounds to a narrower dtype mid-way
    (:func:`compile_options`). ``device_type``: the options differ between the CPU and accelerators.
    ``dtype``: the shard's.
    """
    # the dtype too: each key is a code object of its own, and dynamo's recompile limit (8) counts per code object
    key = (factory, plan, large, exact_casts, device_type, dtype)
    if key not in _compiled:
        fn = factory(plan)
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_compiled)}")
        fn = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        _compiled[key] = torch.compile(fn, dynamic=True, fullgraph=True,
                                       options=compile_options(device_type, exact_casts))
    return _compiled[key]


def _reason(error: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def _refusal(mode: str | None, device: torch.device, reason: str) -> str:
    """The message of a compile failure that may not fall back: what failed and how to go on."""
    if resolve(mode) == "compiled":
        fix = "kernel mode 'compiled' never falls back; use 'auto' (eager fallback on the CPU) or 'eager'"
    else:
        fix = ("on an accelerator the eager reference is hundreds of times slower, so it is never a silent "
               "fallback; fix the compile, or run the eager reference knowingly with optim.kernel: eager "
               f"(ZOOptimizer(kernel='eager'), or {ENV}=eager)")
    return f"the compiled ZO sweep failed on {device} ({reason}): {fix}"


def _fall_back(device: torch.device, reason: str) -> None:
    """Record that compiling failed on ``device`` (its later sweeps under 'auto' run eager) and say so."""
    _tally(device).failure = reason
    log.warning("ZO sweep on %s: torch.compile failed (%s). Every later sweep on %s in this process runs the "
                "eager reference: equal results, several times slower. Fix the compiler, or set "
                "optim.kernel: eager (%s=eager) to run the reference knowingly.", device, reason, device, ENV)


def run(mode: str | None, factory: Callable[[Any], Callable[..., Any]], plan: Hashable, *args: Any,
        numel: int, exact_casts: bool = False) -> bool:
    """Run the compiled kernel of ``plan`` on ``args`` (``args[0]`` the shard of ``numel`` elements it
    writes); False if it could not be compiled and may fall back (:func:`fallback_allowed`): then the
    caller runs the eager reference, counted here. Otherwise a failure raises :class:`KernelCompileError`."""
    device = args[0].device
    try:
        with torch.no_grad():  # one grad mode for every call: dynamo guards on it (a flip recompiles)
            compiled(factory, plan, numel >= MIN_COMPILED_NUMEL, exact_casts, device.type, args[0].dtype)(*args)
    except Exception as error:  # inductor raises many types (no compiler, codegen, backend errors)
        reason = _reason(error)
        if not fallback_allowed(mode, device):
            raise KernelCompileError(_refusal(mode, device, reason)) from error
        _fall_back(device, reason)
        note_eager(device)
        return False
    _tally(device).compiled += 1
    return True


def _implementation(tally: _Tally) -> str:
    """What ran the sweeps on a device, in words: 'compiled', 'eager', both, or eager after a failure."""
    if tally.failure is not None:
        before = "compiled, then " if tally.compiled else ""
        return f"{before}eager (compile failed: {tally.failure})"
    if tally.compiled and tally.eager:
        return "compiled and eager"  # under 'auto' on the CPU: shards under MIN_COMPILED_NUMEL run eager
    return "compiled" if tally.compiled else "eager"


def report() -> dict[str, dict[str, Any]]:
    """What ran the ZO sweeps in this process so far, per device ('cpu', 'cuda:0'): ``implementation``
    ('compiled', 'eager', 'compiled and eager', or 'eager (compile failed: <why>)'), the passes run
    compiled and eager, and ``compile_failure`` (None if compiling did not fail). For a run's summary, so
    that a fallback is on record with the results, not only in one rank's log."""
    return {device: {"implementation": _implementation(t), "compiled_calls": t.compiled, "eager_calls": t.eager,
                     "compile_failure": t.failure}
            for device, t in sorted(_tallies.items())}


def announce(mode: str | None, device: torch.device) -> None:
    """Log once per process and device which implementation runs the sweep."""
    line = describe(mode, device)
    if line not in _announced:
        _announced.add(line)
        log.info("ZO sweep on %s: %s", device, line)
