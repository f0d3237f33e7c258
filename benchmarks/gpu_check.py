"""GPU check: what a CUDA machine must show about zo-scale, in stages that each fit a few minutes.

Each stage runs in a subprocess of this script (``--stage NAME``), is killed at its time limit, and
its result (status ok / failed with the error's last line / skipped with the reason / timed_out, wall
seconds, the device, its numbers) is written to the JSON as soon as it ends, so a crash, a hung CUDA
call or a run cut short keeps every stage before it. Stages run in order of value; when the total
budget (``--budget``, 540 s) is spent the rest are recorded as skipped. On CUDA when available, else
on the CPU (``--quick`` only: tiny sizes).

    environment    torch / transformers / deepspeed / accelerate / bitsandbytes / triton versions (and
                   whether each imports), the device's name and memory, whether DeepSpeed's async_io
                   op (NVMe offload) can build.
    bit_equality   ZO-SGD (lazy and not) and ZO-Adam (lazy), fp32, eps 1e-3, a few steps over a few
                   tensors with the compiled sweep kernel on the device and on the CPU, from the same
                   start, the loss evaluated in float64 on the CPU from the weights' values (equal
                   weights, equal losses): weights, Adam's buffers, losses and projected gradients
                   compared bit for bit (max abs diff and differing elements per tensor). On a CPU-only
                   machine the reference is the eager sweep instead.
    samplers       every sampler of ``optim.sampler`` (normal, rademacher, sparse, magnitude with
                   perturb in_forward, lowrank, block, lezo) takes 3 lazy steps of a tiny LLaMA on the
                   device: no error, finite losses, weights moved.
    work_per_step  OPT-125m's shape (random init, fp32), ZO-SGD lazy, for perturb in_place and
                   in_forward: one steady step under the profiler minus the plain forwards of the same
                   closure (aten ops, compiled ZO kernel calls, host syncs, on CUDA cudaLaunchKernel),
                   graphs compiled by the first two steps and by the steady one (0: no recompile), the
                   first step's peak device memory.
    huge_tensor    one tensor of 1e9 bf16 elements (2**22 under --quick) through the compiled sweep
                   (``noise.add_noise_``, +z then -z back to exactly 0) and ``perturbed_copies``, slices
                   at the start, the middle and the end checked against the eager reference at their
                   offsets; time and bytes per second of each pass.
    launchers      ``deepspeed --num_gpus 1 launch/train.py`` under ZeRO-3, CPU offload and NVMe offload
                   (skipped where libaio is missing), and ``accelerate launch --mixed_precision bf16``,
                   3 steps of a tiny LLaMA each (--quick on the CPU: the ZeRO-3 run only); the offloaded
                   runs' weights must equal ZeRO-3's bit for bit (a gather racing a partition write would
                   not).
    quantized      ``zo-scale train`` with bitsandbytes int8 (ZO on the scales, the codes unchanged) and
                   NF4 + LoRA (the adapter moves), 3 steps each.
    checkpoint     ``zo-scale train``: a run resumed from its step-2 checkpoint ends on the weights and
                   seed log of an uninterrupted 4-step run, and ``zo-scale replay`` of the seed log
                   rebuilds them, bit for bit.
    planner        ``zo_scale.plan``'s peak bytes per GPU (less the CUDA context) against
                   ``torch.cuda.max_memory_allocated`` over two ZO steps of OPT-1.3B (in place and
                   in_forward) and LLaMA-2-7B (in place), random init, bf16, batch 1 x 2048; the CUDA
                   context measured. Under --quick on the CPU a tiny OPT shape, predicted bytes only.
    step_time      steps per second of ZO-SGD lazy (the compiled sweep) and of a plain MeZO step
                   (``mezo_reference.py``, its noise drawn on the device) against two forwards, OPT-125m
                   shape, fp32, timed round-robin in the same process.
    cuda_tests     ``pytest tests/core/test_kernel.py -k cuda`` (compiled vs eager vs CPU on the device).
    sweep_kernel   ``benchmarks/sweep_kernel.py --device cuda``: noise-add / plain add_ and the work per sweep.

``--quick`` is a smoke run of the same code, allowed on a CPU: OPT-125m cut to 2 layers and a vocabulary
of 4096, 2**22 elements for huge_tensor, the lazy bit_equality cases over one tensor, and on the CPU
the eager sweep outside bit_equality and huge_tensor (inductor takes tens of seconds per kernel on 2
cores), one thread per process (OMP_NUM_THREADS=1, unless set) and the ZeRO-3 launcher run only.

Run on the GPU machine from the repository root (under 10 minutes in all: --budget 540 by default):
    python benchmarks/gpu_check.py                       # every stage, on the GPU
    python benchmarks/gpu_check.py --only bit_equality,launchers --stage-limit launchers=300
    python benchmarks/gpu_check.py --quick               # the smoke run (about 3 min on 2 CPU cores)

Writes benchmarks/results/gpu_check_<cuda|cpu>[_quick].json (``--output`` elsewhere) after every
stage, and copies it to ``$OUT/gpu_check.json`` (the stages' logs to ``$OUT/gpu_check_logs/``, and
sweep_kernel's JSON) when the environment variable OUT is set. Exit code 1 if a stage failed or timed out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import common

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_BUDGET_S = 540.0  # leaves a 10-minute device command time to start up and copy the results back
MIN_STAGE_S = 5.0  # a stage is not started with less time than this left in the budget
SEED, STREAM, EPS = 1234, 7, 1e-3
STATUSES = ("ok", "failed", "skipped", "timed_out")


class Skipped(Exception):  # noqa: N818 - a stage's outcome, not an error
    """Raised by a stage that cannot run here; its message is the reason."""


class CheckFailed(Exception):
    """Raised by a stage whose check did not hold; the numbers it recorded are kept."""


# -----------------------------------------------------------------------------
# the stage side: a context that writes the stage's result file as it goes


class Context:
    """What a stage function gets: ``quick``, the device (recorded on first use) and :meth:`record`, which
    rewrites the result file at once, so the numbers of a stage killed at its limit survive."""

    def __init__(self, path: Path, quick: bool) -> None:
        self.path, self.quick = path, quick
        self.result: dict[str, Any] = {"status": "running", "device": None, "numbers": {}}
        self._device: torch.device | None = None
        self.save()

    def record(self, **numbers: Any) -> None:
        self.result["numbers"].update(numbers)
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.result)

    def finish(self, status: str, message: str | None = None) -> None:
        self.result["status"] = status
        if message is not None:
            self.result["reason" if status == "skipped" else "error"] = message
        self.save()

    @property
    def device(self) -> torch.device:
        import torch

        if self._device is None:
            self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.result["device"] = describe_device(self._device)
            self.save()
        return self._device

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def kernel(self) -> str | None:
        """The sweep kernel of the stages but bit_equality and huge_tensor: the library's default (None: 'auto',
        compiled on a GPU); eager under --quick on the CPU, where inductor takes tens of seconds per kernel
        on 2 cores (bit_equality and huge_tensor compile there all the same: the kernel is what they check)."""
        return "eager" if self.quick and not self.cuda else None

    def kernel_overrides(self) -> list[str]:
        """:attr:`kernel` as a ``zo-scale train`` override."""
        return [] if self.kernel is None else [f"optim.kernel={self.kernel}"]

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()


def describe_device(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({common.cpu_model()}, {os.cpu_count()} cores)"


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], None]
    limit_s: float  # on a GPU
    quick_limit_s: float  # under --quick (on a 2-core CPU)
    hidden: bool = False  # for the tests: run only when named in --only
    cuda_only: str | None = None  # why it skips without CUDA (then recorded without starting a process)


STAGES: dict[str, Stage] = {}  # in the order they run: of value, most first


def stage(name: str, limit_s: float, quick_limit_s: float, hidden: bool = False,
          cuda_only: str | None = None) -> Callable[..., Any]:
    def register(fn: Callable[[Context], None]) -> Callable[[Context], None]:
        STAGES[name] = Stage(name, fn, limit_s, quick_limit_s, hidden, cuda_only)
        return fn

    return register


def run_stage_here(name: str, result: Path, quick: bool) -> int:
    """The child's side of ``--stage``: run one stage, its outcome in ``result``."""
    ctx = Context(result, quick)
    try:
        STAGES[name].run(ctx)
    except Skipped as e:
        ctx.finish("skipped", str(e))
    except CheckFailed as e:
        ctx.finish("failed", str(e))
    except Exception as e:  # any error of the stage is its result, with the traceback in its log
        traceback.print_exc()
        ctx.finish("failed", last_line(f"{type(e).__name__}: {e}"))
    else:
        ctx.finish("ok")
    print(f"stage {name}: {ctx.result['status']}", flush=True)
    return 0


# -----------------------------------------------------------------------------
# helpers shared by the stages


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and os.replace: a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process we started, its process group and every descendant (launchers start ranks)."""
    try:
        import psutil

        descendants = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing or the process already gone: the group kill still applies
        descendants = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(Exception):
            child.kill()
    proc.wait()


def run_command(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` from the repository root, output to ``log``, killed (with its descendants) at ``timeout``.
    Returns rc (None if killed), wall_s and timed_out."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            rc = None
        with contextlib.suppress(ProcessLookupError, PermissionError):  # what it left running in its group
            os.killpg(proc.pid, signal.SIGKILL)
    return {"rc": rc, "wall_s": round(time.monotonic() - t0, 2), "timed_out": rc is None}


def launcher(name: str) -> list[str]:
    """The ``deepspeed`` or ``accelerate launch`` command beside this Python, else its module run by this Python."""
    if (BIN / name).exists():
        return [str(BIN / name)] + (["launch"] if name == "accelerate" else [])
    module = {"deepspeed": "deepspeed.launcher.runner", "accelerate": "accelerate.commands.launch"}[name]
    return [sys.executable, "-m", module]


def free_port() -> int:
    """A TCP port free right now, for a launcher's rendezvous (fixed ports collide with other jobs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bits_differ(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """How two tensors of one shape and dtype differ: elements whose bits differ, and the max abs difference."""
    import torch

    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    differing = int((a.contiguous().view(ints) != b.contiguous().view(ints)).sum())
    return {"numel": a.numel(), "differing": differing,
            "max_abs_diff": float((a.double() - b.double()).abs().max()) if a.numel() else 0.0}


def train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def checkpoint_tensors(run: Path, folder: str = "model") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted((run / "checkpoint" / folder).glob("*.safetensors")) for k, v in load_file(f).items()}


def tiny_run(ctx: Context, out: Path, steps: int, *extra: str) -> list[str]:
    """``zo-scale train`` overrides of a short run of the tiny LLaMA on the SST-2 demo sample."""
    return ["model.name=tiny-llama", "task.name=sst2-demo", "task.num_train=32", "task.num_eval=8",
            "task.max_length=64", "run.batch_size=4", "run.eval_batch_size=8", "run.progress=false",
            "run.log_every=1", "optim.lr=1e-3", f"run.steps={steps}", f"run.output_dir={out}",
            *ctx.kernel_overrides(), *extra]


def cli(*args: str) -> int:
    """``zo-scale`` in this process (the stage is a process of its own already)."""
    from zo_scale.train.cli import main

    return main(list(args))


# -----------------------------------------------------------------------------
# a. environment


@stage("environment", limit_s=60, quick_limit_s=60)
def stage_environment(ctx: Context) -> None:
    import torch

    versions, imports, problems = {}, {}, []
    for module in ("torch", "transformers", "deepspeed", "accelerate", "bitsandbytes", "peft", "triton"):
        try:
            versions[module] = metadata.version(module)
        except metadata.PackageNotFoundError:
            versions[module] = None
        try:
            importlib.import_module(module)
            imports[module] = "ok"
        except Exception as e:  # a broken install is a finding, not a crash of this stage
            imports[module] = last_line(f"{type(e).__name__}: {e}")
    needed = ["torch", "transformers", "deepspeed", "accelerate", "bitsandbytes"] + (["triton"] if ctx.cuda else [])
    problems += [f"{m} does not import: {imports[m]}" for m in needed if imports[m] != "ok"]
    numbers: dict[str, Any] = {"versions": versions, "imports": imports, "python": platform.python_version(),
                               "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
                               "cpu_model": common.cpu_model(), "torch_threads": torch.get_num_threads()}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        free, total = torch.cuda.mem_get_info(ctx.device)
        numbers.update(device_name=props.name, device_count=torch.cuda.device_count(),
                       compute_capability=f"{props.major}.{props.minor}", memory_total_bytes=total,
                       memory_free_bytes=free, cudnn=torch.backends.cudnn.version())
    else:
        numbers.update(device_name="cpu", memory_total_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        numbers["deepspeed_async_io_buildable"] = bool(AsyncIOBuilder().is_compatible(verbose=False))
    except Exception as e:
        numbers["deepspeed_async_io_buildable"] = last_line(str(e))
    numbers["ninja"] = shutil.which("ninja") is not None or (BIN / "ninja").exists()
    ctx.record(**numbers, problems=problems)
    if problems:
        raise CheckFailed("; ".join(problems))


# -----------------------------------------------------------------------------
# b. bit_equality

# one tensor of >= 64K elements (a kernel of its own) and two small ones (which the sweep may bucket together)
BIT_TENSORS = {"layer.weight": (300, 257), "layer.bias": (257,), "head.weight": (33, 64)}
QUICK_BIT_TENSORS = {"layer.weight": (300, 257)}  # --quick: the small ones add minutes of compiling on 2 cores
BIT_CASES = {"zo-sgd lazy": ("sgd", True, 1e-2), "zo-adam lazy": ("adam", True, 1e-3), "zo-sgd": ("sgd", False, 1e-2)}
BIT_STEPS = 3


def zo_run(device: torch.device, kernel: str, rule: str, lazy: bool, lr: float,
           shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """BIT_STEPS steps from the same start; the weights, per-element state, losses and projected gradients."""
    import torch

    import zo_scale

    gen = torch.Generator().manual_seed(SEED)
    start = {n: torch.randn(shape, generator=gen) for n, shape in shapes.items()}
    params = {n: torch.nn.Parameter(t.to(device)) for n, t in start.items()}

    def loss() -> torch.Tensor:
        # float64 on the CPU from the weights' values: equal weights give equal losses on every device
        return sum(((p.detach().cpu().double() - 0.25) ** 2).mean() for p in params.values())

    opt = zo_scale.ZOOptimizer(list(params.items()), lr=lr, eps=EPS, rule=rule, lazy=lazy, kernel=kernel, seed=SEED)
    losses, grads = [], []
    for _ in range(BIT_STEPS):
        losses.append(opt.step(loss))
        grads.append(opt.last_record.grads)
    opt.flush()
    tensors = {n: p.detach().cpu() for n, p in params.items()}
    for n, p in params.items():
        tensors.update({f"{n} {k}": v.cpu() for k, v in opt.state.get(p, {}).items()
                        if isinstance(v, torch.Tensor) and v.dim()})
    return {"tensors": tensors, "losses": losses, "grads": grads}


@stage("bit_equality", limit_s=180, quick_limit_s=150)
def stage_bit_equality(ctx: Context) -> None:
    import torch

    # on a CPU-only machine the device is the CPU: compare the compiled kernel with the eager reference there
    reference = ("cpu", "compiled") if ctx.cuda else ("cpu", "eager")
    shapes = QUICK_BIT_TENSORS if ctx.quick else BIT_TENSORS
    ctx.record(reference=f"{reference[0]}, {reference[1]} kernel", device_kernel="compiled", steps=BIT_STEPS,
               eps=EPS, dtype="float32", shapes=shapes)
    failures = []
    # under --quick the lazy cases only: their passes include the eager step's (+eps, -2eps, restore and update)
    cases = {k: v for k, v in BIT_CASES.items() if v[1] or not ctx.quick}
    for case, (rule, lazy, lr) in cases.items():
        t0 = time.perf_counter()
        got = zo_run(ctx.device, "compiled", rule, lazy, lr, shapes)
        try:
            want = zo_run(torch.device(reference[0]), reference[1], rule, lazy, lr, shapes)
        except Exception as e:  # no C++ compiler for the CPU kernel: the eager sweep, equal to it bit for bit
            traceback.print_exc()
            reference = ("cpu", "eager")
            ctx.record(reference="cpu, eager kernel", reference_fallback=last_line(f"{type(e).__name__}: {e}"))
            want = zo_run(torch.device("cpu"), "eager", rule, lazy, lr, shapes)
        per_tensor = {n: bits_differ(got["tensors"][n], want["tensors"][n]) for n in want["tensors"]}
        same = (all(d["differing"] == 0 for d in per_tensor.values()) and got["losses"] == want["losses"]
                and got["grads"] == want["grads"])
        ctx.record(**{case: {"bit_equal": same, "tensors": per_tensor, "losses_equal": got["losses"] == want["losses"],
                             "grads_equal": got["grads"] == want["grads"],
                             "wall_s": round(time.perf_counter() - t0, 2)}})
        if not same:
            failures.append(case)
    if failures:
        raise CheckFailed(f"device and reference differ: {', '.join(failures)}")


# -----------------------------------------------------------------------------
# c. samplers


def sampler_steps(ctx: Context, name: str, ids: torch.Tensor) -> dict[str, Any]:
    """3 lazy steps of a tiny LLaMA with one sampler of ``optim.sampler``: losses, and whether weights moved."""
    import torch

    import zo_scale
    from zo_scale.models.tiny import build_tiny_model
    from zo_scale.train.build import build_sampler
    from zo_scale.train.config import OptimConfig

    in_forward = name == "magnitude"  # its mask reads theta, which the in-place step moves between its points
    model = build_tiny_model("llama", seed=0).to(ctx.device).eval()
    start = [p.detach().clone() for p in model.parameters()]
    opt = zo_scale.ZOOptimizer(list(model.named_parameters()), lr=1e-3, eps=EPS, lazy=True, seed=SEED,
                               kernel=ctx.kernel, sampler=build_sampler(OptimConfig(sampler=name)),
                               perturb="in_forward" if in_forward else "in_place", model=model if in_forward else None)

    def closure(*groups: int) -> torch.Tensor:
        if in_forward:
            return common.stacked_lm_losses(model, ids, *groups)
        return model(input_ids=ids, labels=ids).loss

    losses = [opt.step(closure) for _ in range(3)]
    opt.flush()
    moved = any(not torch.equal(p, s) for p, s in zip(model.parameters(), start, strict=True))
    return {"perturb": opt.perturb, "losses": losses, "moved": moved,
            "ok": moved and all(math.isfinite(x) for x in losses)}


@stage("samplers", limit_s=180, quick_limit_s=90)
def stage_samplers(ctx: Context) -> None:
    import torch

    from zo_scale.core import kernel as sweep_kernel
    from zo_scale.train.build import SAMPLERS

    ctx.record(kernel=sweep_kernel.describe(ctx.kernel, ctx.device), steps=3, model="tiny-llama, fp32")
    ids = torch.randint(0, 259, (4, 16), generator=torch.Generator().manual_seed(SEED)).to(ctx.device)
    failures = []
    for name in SAMPLERS:
        t0 = time.perf_counter()
        try:
            row = sampler_steps(ctx, name, ids)
        except Exception as e:  # one sampler's error must not hide the others'
            traceback.print_exc()
            row = {"ok": False, "error": last_line(f"{type(e).__name__}: {e}")}
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        ctx.record(**{name: row})
        if not row["ok"]:
            failures.append(name)
    if failures:
        raise CheckFailed(f"samplers that failed, gave a non-finite loss or did not move: {', '.join(failures)}")


# -----------------------------------------------------------------------------
# d. work_per_step

COUNTS = ("aten_ops", "host_reads", "zo_kernel_calls", "cuda_kernel_launches")


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (a recompile is one more)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def opt_125m_on(ctx: Context) -> tuple[torch.nn.Module, str]:
    """OPT-125m's shape (OPTConfig's defaults), random init, fp32, built on the device, and its description.
    Under --quick 2 of its 12 layers and a vocabulary of 4096 (a smoke run: the eager sweep of 125M
    parameters under the profiler takes minutes on 2 cores)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    cut = {"num_hidden_layers": 2, "vocab_size": 4096} if ctx.quick else {}
    torch.manual_seed(0)
    with torch.device(ctx.device):  # built on the device: no host copy of the weights
        model = OPTForCausalLM(OPTConfig(**cut)).eval()
    return model, "OPT-125m shape, random init, fp32" + (f", cut to {cut}" if cut else "")


@stage("work_per_step", limit_s=150, quick_limit_s=120)
def stage_work_per_step(ctx: Context) -> None:
    import torch

    import zo_scale
    from zo_scale.core import kernel as sweep_kernel

    batch, seq = (2, 32) if ctx.quick else (8, 128)
    model, described = opt_125m_on(ctx)
    ids = common.lm_batch(batch, seq, model.config.vocab_size).to(ctx.device)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ctx.record(model=described, batch=batch, seq=seq, model_bytes=model_bytes,
               kernel=sweep_kernel.describe(ctx.kernel, ctx.device),
               baseline="in_place: closure() twice; in_forward: closure(2) once (the same rows in one forward); "
                        "under torch.no_grad, no optimizer")
    for perturb in ("in_place", "in_forward"):
        in_forward = perturb == "in_forward"
        opt = zo_scale.ZOSGD(model.named_parameters(), lr=1e-7, eps=EPS, lazy=True, perturb=perturb, kernel=ctx.kernel,
                             model=model if in_forward else None)

        def step(opt: zo_scale.ZOOptimizer = opt, in_forward: bool = in_forward) -> None:
            if in_forward:
                opt.step(lambda groups: common.stacked_lm_losses(model, ids, groups))
            else:
                opt.step(lambda: model(input_ids=ids, labels=ids).loss)

        @torch.no_grad()
        def plain(in_forward: bool = in_forward) -> None:
            if in_forward:
                float(common.stacked_lm_losses(model, ids, 2).sum())
            else:
                float(model(input_ids=ids, labels=ids).loss)
                float(model(input_ids=ids, labels=ids).loss)

        row: dict[str, Any] = {}
        graphs0 = graphs_compiled()
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        step()  # the first step compiles its plans
        ctx.sync()
        row["peak_bytes_first_step"] = torch.cuda.max_memory_allocated() if ctx.cuda else None
        step()  # lazy: the second step is the first with a pending update, a plan of its own
        ctx.sync()
        graphs1 = graphs_compiled()
        work = common.work_per_step(step, model_bytes, cuda=ctx.cuda)
        row["graphs_compiled_first_two_steps"] = graphs1 - graphs0
        row["graphs_compiled_in_steady_step"] = graphs_compiled() - graphs1  # 0 unless a steady step recompiles
        base = common.work_per_step(plain, model_bytes, cuda=ctx.cuda)
        opt.flush()
        row.update(step=work, plain_forwards=base,
                   zo_overhead={k: work[k] - base[k] for k in COUNTS if k in work},
                   host_syncs_zo=work["host_reads"] - base["host_reads"])
        ctx.record(**{perturb: row})
        print(f"{perturb}: {row['zo_overhead']}", flush=True)


# -----------------------------------------------------------------------------
# e. huge_tensor


def timed(ctx: Context, fn: Callable[[], object]) -> float:
    ctx.sync()
    t0 = time.perf_counter()
    fn()
    ctx.sync()
    return time.perf_counter() - t0


@stage("huge_tensor", limit_s=120, quick_limit_s=90)
def stage_huge_tensor(ctx: Context) -> None:
    import torch

    from zo_scale.core import noise
    from zo_scale.core.directions import DenseDirection
    from zo_scale.core.shards import ParamShard
    from zo_scale.core.sweep import perturbed_copies

    n, dtype = (1 << 22 if ctx.quick else 10**9), torch.bfloat16
    x = torch.zeros(n, dtype=dtype, device=ctx.device)
    ctx.record(numel=n, dtype="bfloat16", kernel="compiled")
    slices = [(0, 4096), (n // 2 - 2048, 4096), (n - 4096, 4096)]  # start, middle, end (the largest offsets)
    problems = []

    first = timed(ctx, lambda: noise.add_noise_(x, "normal", SEED, STREAM, 0, 1.0, kernel="compiled"))
    for s, c in slices:  # the eager reference of the same elements, generated at their offset
        ref = noise.add_noise_(torch.zeros(c, dtype=dtype, device=ctx.device), "normal", SEED, STREAM, s, 1.0,
                               kernel="eager")
        if not torch.equal(x[s : s + c], ref):
            problems.append(f"add_noise_ differs from the eager reference at [{s}, {s + c})")
    back = timed(ctx, lambda: noise.add_noise_(x, "normal", SEED, STREAM, 0, -1.0, kernel="compiled"))
    nonzero = int(x.count_nonzero())  # z - z: exactly 0 everywhere
    if nonzero:
        problems.append(f"+z then -z left {nonzero} nonzero elements")
    again = timed(ctx, lambda: noise.add_noise_(x, "normal", SEED, STREAM, 0, 1.0, kernel="compiled"))
    steady = min(back, again)
    ctx.record(add_noise_={"first_pass_s": first, "steady_pass_s": steady, "nonzero_after_round_trip": nonzero,
                           "gb_per_s": 2 * n * x.element_size() / steady / 1e9})

    d = DenseDirection(SEED)
    groups = [[(d, EPS)], [(d, -EPS)]]
    shard = ParamShard(x, "huge", STREAM, x, 0, torch.Size([n]))
    before = [x[s : s + c].clone() for s, c in slices]
    out: list[torch.Tensor] = []
    first = timed(ctx, lambda: out.extend(perturbed_copies(shard, groups, "compiled")))
    for (s, c), kept in zip(slices, before, strict=True):
        part = ParamShard(x, "huge", STREAM, x[s : s + c], s, torch.Size([n]))  # a shard at that offset, eager
        for k, ref in enumerate(perturbed_copies(part, groups, "eager")):
            if not torch.equal(out[k][s : s + c], ref):
                problems.append(f"perturbed copy {k} differs from the eager reference at [{s}, {s + c})")
        if not torch.equal(x[s : s + c], kept):
            problems.append(f"perturbed_copies wrote theta at [{s}, {s + c})")
    out.clear()  # free the copies before the timed pass makes two more
    steady = timed(ctx, lambda: perturbed_copies(shard, groups, "compiled"))
    ctx.record(perturbed_copies={"first_pass_s": first, "steady_pass_s": steady,
                                 "gb_per_s": 3 * n * x.element_size() / steady / 1e9},
               peak_device_bytes=torch.cuda.max_memory_allocated() if ctx.cuda else None, problems=problems)
    if problems:
        raise CheckFailed("; ".join(problems))


# -----------------------------------------------------------------------------
# f. launchers


def launched_run(cmd: list[str], out: Path, timeout: float, runtime: str, on_cuda: bool) -> dict[str, Any]:
    """Run one launcher command; ok when it exited 0 after 3 finite steps on ``runtime`` (and on the GPU)."""
    log = out.with_suffix(".log")
    run = run_command(cmd, log, timeout)
    row: dict[str, Any] = {"wall_s": run["wall_s"], "command": " ".join(cmd[:8]) + " ..."}
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])  # the folder is removed after the stage
    if run["timed_out"]:
        return {**row, "status": "timed_out", "error": f"killed at {timeout:.0f} s", "log_tail": tail}
    if run["rc"] != 0:
        return {**row, "status": "failed", "error": f"exit code {run['rc']}: {last_line(tail)}", "log_tail": tail}
    summary = json.loads((out / "summary.json").read_text())
    losses = train_losses(out)
    weights = checkpoint_tensors(out)
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode() + weights[name].contiguous().view(torch.uint8).numpy().tobytes())
    row.update(runtime=summary["runtime"], world_size=summary["world_size"], losses=losses,
               peak_memory_bytes=summary["peak_memory_bytes"], weights_sha256=digest.hexdigest(),
               weights_dtype=str(next(iter(weights.values())).dtype) if weights else None)
    good = summary["runtime"] == runtime and len(losses) == 3 and all(math.isfinite(x) for x in losses)
    if not good:
        return {**row, "status": "failed", "error": f"expected 3 finite losses on {runtime}, got {losses} on "
                f"{summary['runtime']}"}
    if on_cuda and not any(peak["device"] for peak in summary["peak_memory_bytes"]):
        return {**row, "status": "failed", "error": "the run allocated nothing on the GPU: it ran on the CPU"}
    return {**row, "status": "ok"}


@stage("launchers", limit_s=300, quick_limit_s=150)
def stage_launchers(ctx: Context) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_launchers_"))
    each = 150 if not ctx.quick else 100
    cpu_quick = ctx.quick and not ctx.cuda
    ctx.record(model="tiny-llama", steps=3, timeout_each_s=each)

    def deepspeed(config: str, name: str) -> dict[str, Any]:
        out = tmp / name
        cmd = [*launcher("deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()), "launch/train.py",
               "--deepspeed", config, *tiny_run(ctx, out, 3)]
        return launched_run(cmd, out, each, "zero3", ctx.cuda)

    def accelerate_bf16() -> dict[str, Any]:
        out = tmp / "accelerate_bf16"
        cmd = [*launcher("accelerate"), "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "bf16", "--dynamo_backend", "no", "launch/train.py", *tiny_run(ctx, out, 3)]
        row = launched_run(cmd, out, each, "single", ctx.cuda)
        if row["status"] == "ok" and row["weights_dtype"] != "torch.bfloat16":
            row.update(status="failed", error=f"accelerate's bf16 trained {row['weights_dtype']} weights")
        return row

    def nvme() -> dict[str, Any]:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if not AsyncIOBuilder().is_compatible(verbose=False):
            return {"status": "skipped", "reason": "DeepSpeed's async_io op needs libaio (apt-get install libaio-dev)"}
        config = json.loads((ROOT / "ds_configs" / "zero3_offload_nvme.json").read_text())
        config["zero_optimization"]["offload_param"]["nvme_path"] = str(tmp / "nvme")
        (tmp / "nvme.json").write_text(json.dumps(config))
        return deepspeed(str(tmp / "nvme.json"), "zero3_offload_nvme")

    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "zero3": lambda: deepspeed("ds_configs/zero3.json", "zero3"),
        "accelerate_bf16": accelerate_bf16,
        "zero3_offload_cpu": lambda: deepspeed("ds_configs/zero3_offload_cpu.json", "zero3_offload_cpu"),
        "zero3_offload_nvme": nvme,
    }
    failures, rows = [], {}
    for name, run in runs.items():
        if cpu_quick and name != "zero3":
            row = {"status": "skipped", "reason": "--quick on the CPU: the ZeRO-3 run only"}
        else:
            row = run()
        rows[name] = row
        ctx.record(**{name: row})
        print(f"{name}: {row['status']} {row.get('error', row.get('reason', ''))}", flush=True)
        if row["status"] in ("failed", "timed_out"):
            failures.append(f"{name} ({row.get('error')})")
    shutil.rmtree(tmp, ignore_errors=True)
    # offload moves where the partitions live, not what the forward computes: the same weights bit for bit
    # (on the CPU tested so). A gather that read a partition half written (stream order) would show here.
    plain = rows["zero3"]
    for name in ("zero3_offload_cpu", "zero3_offload_nvme"):
        row = rows[name]
        if plain["status"] == row["status"] == "ok":
            same = plain["weights_sha256"] == row["weights_sha256"]
            ctx.record(**{f"{name}_equals_zero3": same})
            if not same:
                failures.append(f"{name}'s weights differ from zero3's after the same 3 steps")
    if failures:
        raise CheckFailed("; ".join(failures))


# -----------------------------------------------------------------------------
# g. quantized


@stage("quantized", limit_s=120, quick_limit_s=90)
def stage_quantized(ctx: Context) -> None:
    import torch

    from zo_scale.models import load_model

    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skipped("bitsandbytes is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_quantized_"))
    problems = []
    # int8: ZO moves the row scales, never the int8 codes (the device's own quantization is the start)
    out = tmp / "int8"
    code = cli("train", *tiny_run(ctx, out, 3, "model.quantization=int8", "optim.lr=3e-3"))
    row: dict[str, Any] = {"exit_code": code}
    if code == 0:
        saved = checkpoint_tensors(out)
        start = {k: v.cpu() for k, v in load_model("tiny-llama", device=str(ctx.device),
                                                   quantization="int8")[0].state_dict().items()}
        codes = [k for k in saved if saved[k].dtype == torch.int8 and k in start]
        scales = [k for k in saved if k.endswith(".SCB") and k in start]
        row.update(losses=train_losses(out), int8_tensors=len(codes), scale_tensors=len(scales),
                   codes_unchanged=sum(torch.equal(saved[k], start[k]) for k in codes),
                   scales_moved=sum(not torch.equal(saved[k], start[k]) for k in scales))
        if not (codes and row["codes_unchanged"] == len(codes) and row["scales_moved"] == len(scales)
                and all(math.isfinite(x) for x in row["losses"])):
            problems.append(f"int8: {row}")
    else:
        problems.append(f"int8: zo-scale train exited {code}")
    ctx.record(int8=row)
    # NF4 + LoRA: the 4-bit base stays, the adapter trains (LoRA's B starts at 0, so it must move)
    out = tmp / "nf4_lora"
    code = cli("train", *tiny_run(ctx, out, 3, "model.quantization=nf4", "peft.method=lora", "optim.lr=0.1",
                                  "optim.eps=1e-2"))
    row = {"exit_code": code}
    if code == 0:
        adapter = checkpoint_tensors(out, "adapter")
        row.update(losses=train_losses(out),
                   lora_b_moved=sum(bool(v.abs().sum() > 0) for k, v in adapter.items() if ".lora_B." in k),
                   lora_b=sum(".lora_B." in k for k in adapter))
        if not (row["lora_b_moved"] and all(math.isfinite(x) for x in row["losses"])):
            problems.append(f"nf4 + lora: {row}")
    else:
        problems.append(f"nf4 + lora: zo-scale train exited {code}")
    ctx.record(nf4_lora=row)
    shutil.rmtree(tmp, ignore_errors=True)
    if problems:
        raise CheckFailed("; ".join(problems))


# -----------------------------------------------------------------------------
# h. checkpoint


@stage("checkpoint", limit_s=120, quick_limit_s=90)
def stage_checkpoint(ctx: Context) -> None:
    from safetensors.torch import load_file

    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_checkpoint_"))
    rule = "optim.rule=adam"  # per-element state: the resumed run must restore it too
    codes = {"straight": cli("train", *tiny_run(ctx, tmp / "straight", 4, rule)),
             "first_half": cli("train", *tiny_run(ctx, tmp / "split", 2, rule)),
             "resumed": cli("train", *tiny_run(ctx, tmp / "split", 4, rule)),  # from its step-2 checkpoint
             "replay": cli("replay", str(tmp / "straight" / "seedlog.jsonl"), str(tmp / "replayed"))}
    ctx.record(exit_codes=codes, steps=4, resumed_at=2, rule="adam")
    if any(codes.values()):
        raise CheckFailed(f"a zo-scale command failed: {codes}")
    straight, split = checkpoint_tensors(tmp / "straight"), checkpoint_tensors(tmp / "split")
    replayed = {k: v for f in sorted((tmp / "replayed").glob("*.safetensors")) for k, v in load_file(f).items()}
    records = [(tmp / r / "seedlog.jsonl").read_text().splitlines()[1:] for r in ("straight", "split")]
    resumed = {k: bits_differ(split[k], v) for k, v in straight.items()}
    replay = {k: bits_differ(replayed[k], v) for k, v in straight.items()}
    ctx.record(resumed_differing=sum(d["differing"] for d in resumed.values()),
               replayed_differing=sum(d["differing"] for d in replay.values()),
               seed_logs_equal=records[0] == records[1], tensors=len(straight),
               losses=train_losses(tmp / "straight"), weights_dtype=str(next(iter(straight.values())).dtype))
    shutil.rmtree(tmp, ignore_errors=True)
    n = ctx.result["numbers"]
    if n["resumed_differing"] or n["replayed_differing"] or not n["seed_logs_equal"] or split.keys() != straight.keys():
        raise CheckFailed(f"resume or replay is not bit for bit: {n['resumed_differing']} resumed and "
                          f"{n['replayed_differing']} replayed elements differ; seed logs equal: "
                          f"{n['seed_logs_equal']}")


# -----------------------------------------------------------------------------
# i. planner


def cuda_context_bytes() -> int:
    """Device memory a process takes by initialising CUDA and cuBLAS alone (free before vs after)."""
    code = ("import torch; free0, total = torch.cuda.mem_get_info(); a = torch.ones(8, 8, device='cuda'); "
            "(a @ a).sum().item(); free1, _ = torch.cuda.mem_get_info(); print(free0 - free1)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return int(proc.stdout.strip().splitlines()[-1])


def planned_vs_measured(ctx: Context, config: Any, batch: int, seq: int, perturb: str) -> dict[str, Any]:
    """The planner's peak bytes of one run (less the CUDA context) and, on CUDA, the allocator's over two ZO steps."""
    import torch
    from transformers import AutoModelForCausalLM

    import zo_scale
    from zo_scale.plan.memory import RunSettings, plan_memory
    from zo_scale.plan.shapes import ModelShape

    dtype = torch.bfloat16
    # a loss over every position: the planner's logits for answer_tokens + 1 = seq positions
    settings = RunSettings(batch=batch, seq=seq, answer_tokens=seq - 1, dtype="bfloat16", perturb=perturb,
                           device=ctx.device.type)
    plan = plan_memory(ModelShape.of(config), settings)
    predicted = plan.per_gpu_bytes - plan.gpu.get("CUDA context", 0)  # the allocator does not see the context
    row: dict[str, Any] = {"batch": batch, "seq": seq, "perturb": perturb, "predicted_bytes_without_context": predicted,
                           "breakdown": plan.as_json()["breakdown"]}
    if ctx.cuda:
        torch.cuda.empty_cache()
    with torch.device(ctx.device):  # built in bf16 on the device: no fp32 or host copy
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=ctx.device)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    opt = zo_scale.ZOSGD(model.named_parameters(), lr=1e-7, eps=EPS, lazy=True, perturb=perturb, kernel=ctx.kernel,
                         model=model if perturb == "in_forward" else None)
    if ctx.cuda:  # the optimizer's own setup (it may copy the weights into flat buckets): not a planned phase
        row["peak_bytes_optimizer_setup"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(2):  # the second step carries the lazy update: the steady step's peak
        if perturb == "in_forward":
            opt.step(lambda groups: common.stacked_lm_losses(model, ids, groups))
        else:
            opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    ctx.sync()
    row["two_steps_s"] = round(time.perf_counter() - t0, 2)
    row["params"] = sum(p.numel() for p in model.parameters())
    if ctx.cuda:
        measured = torch.cuda.max_memory_allocated()
        row.update(measured_max_allocated_bytes=measured, predicted_over_measured=predicted / measured)
    else:  # no allocator peak on a CPU: the stage exercises the path, the comparison needs a GPU
        row["measured_max_allocated_bytes"] = None
    return row


@stage("planner", limit_s=180, quick_limit_s=60)
def stage_planner(ctx: Context) -> None:
    from zo_scale.models.architectures import architecture_config

    if ctx.quick:
        config = architecture_config("opt-1.3b")
        config.update({"hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 128, "num_attention_heads": 4,
                       "vocab_size": 1000, "word_embed_proj_dim": 64})
        cases = [("opt-1.3b, cut to a tiny shape", config, 1, 128, "in_place")]
    else:
        cases = [("opt-1.3b", architecture_config("opt-1.3b"), 1, 2048, "in_place"),
                 ("opt-1.3b", architecture_config("opt-1.3b"), 1, 2048, "in_forward"),
                 ("llama-2-7b", architecture_config("llama-2-7b"), 1, 2048, "in_place")]
    if ctx.cuda:
        from zo_scale.plan.memory import CUDA_CONTEXT_BYTES

        try:
            ctx.record(cuda_context_bytes=cuda_context_bytes(), planner_cuda_context_bytes=CUDA_CONTEXT_BYTES)
        except (subprocess.SubprocessError, ValueError, IndexError) as e:  # the comparisons below still run
            ctx.record(cuda_context_bytes=None, cuda_context_error=last_line(str(e)))
    for arch, config, batch, seq, perturb in cases:
        row = planned_vs_measured(ctx, config, batch, seq, perturb)
        ctx.record(**{f"{arch} {perturb}": row})
        print(f"{arch} {perturb}: predicted {row['predicted_bytes_without_context'] / 2**30:.2f} GiB, measured "
              f"{(row['measured_max_allocated_bytes'] or 0) / 2**30:.2f} GiB", flush=True)


# -----------------------------------------------------------------------------
# j. step_time


@stage("step_time", limit_s=120, quick_limit_s=90)
def stage_step_time(ctx: Context) -> None:
    import torch
    from mezo_reference import MeZOReference

    import zo_scale
    from zo_scale.core import kernel as sweep_kernel

    class DeviceMeZO(MeZOReference):
        """The published step with z drawn on the parameters' device (the reference draws on the CPU)."""

        def _noise(self, seed: int) -> Iterator[tuple[str, torch.nn.Parameter, torch.Tensor]]:
            generator = torch.Generator(device=ctx.device).manual_seed(seed)
            for name, p in self.named:
                yield name, p, torch.normal(0.0, 1.0, size=p.shape, generator=generator, dtype=p.dtype, device=p.device)

    batch, seq, repeats = (2, 32, 2) if ctx.quick else (16, 256, 5)
    model, described = opt_125m_on(ctx)
    ids = common.lm_batch(batch, seq, model.config.vocab_size).to(ctx.device)
    m_zo, m_mezo = copy.deepcopy(model), copy.deepcopy(model)  # each variant moves its own copy
    zo = zo_scale.ZOSGD(m_zo.named_parameters(), lr=1e-7, eps=EPS, lazy=True, kernel=ctx.kernel)
    mezo = DeviceMeZO(m_mezo, 1e-7, EPS)

    @torch.no_grad()
    def two_forwards() -> None:
        float(model(input_ids=ids, labels=ids).loss)
        float(model(input_ids=ids, labels=ids).loss)

    variants = {"2 forwards": two_forwards,
                "ZO-SGD lazy": lambda: zo.step(lambda: m_zo(input_ids=ids, labels=ids).loss),
                "MeZO step": lambda: mezo.step(lambda: m_mezo(input_ids=ids, labels=ids).loss)}
    timings = common.time_interleaved({k: lambda fn=fn: (fn(), ctx.sync()) for k, fn in variants.items()},
                                      warmup=2, repeats=repeats)  # 2 warm steps: compiled, lazy steady state
    base = timings["2 forwards"].median_s
    rows = {k: {"median_s": t.median_s, "times_s": t.times_s, "steps_per_s": 1 / t.median_s,
                "ratio_vs_2_forwards": t.median_s / base} for k, t in timings.items()}
    ctx.record(model=described, batch=batch, seq=seq, repeats=repeats, timings=rows,
               kernel=sweep_kernel.describe(ctx.kernel, ctx.device),
               zo_speedup_over_mezo=timings["MeZO step"].median_s / timings["ZO-SGD lazy"].median_s)


# -----------------------------------------------------------------------------
# k, l: the CUDA tests and the sweep kernel benchmark, as the earlier check ran them


@stage("cuda_tests", limit_s=180, quick_limit_s=60, cuda_only="no CUDA device: the tests it selects skip on a CPU")
def stage_cuda_tests(ctx: Context) -> None:
    if not ctx.cuda:
        raise Skipped(STAGES["cuda_tests"].cuda_only)
    log = Path(tempfile.mkdtemp(prefix="gpu_check_tests_")) / "pytest.log"
    run = run_command([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                       "tests/core/test_kernel.py", "-k", "cuda"], log, 170)
    text = log.read_text()
    ctx.record(rc=run["rc"], wall_s=run["wall_s"], summary=last_line(text), tail=text[-2000:])
    if run["rc"] != 0:
        raise CheckFailed(f"pytest exited {run['rc']}: {last_line(text)}")


@stage("sweep_kernel", limit_s=240, quick_limit_s=60,
       cuda_only="no CUDA device: benchmarks/sweep_kernel.py measures the CPU by itself")
def stage_sweep_kernel(ctx: Context) -> None:
    if not ctx.cuda:
        raise Skipped(STAGES["sweep_kernel"].cuda_only)
    log = Path(tempfile.mkdtemp(prefix="gpu_check_sweep_")) / "sweep_kernel.log"
    cmd = [sys.executable, "benchmarks/sweep_kernel.py", "--device", "cuda", *(["--quick"] if ctx.quick else [])]
    run = run_command(cmd, log, 230)
    ctx.record(rc=run["rc"], wall_s=run["wall_s"])
    if run["rc"] != 0:
        raise CheckFailed(f"sweep_kernel.py exited {run['rc']}: {last_line(log.read_text())}")
    path = common.RESULTS_DIR / ("sweep_kernel_cuda" + ("_quick" if ctx.quick else "") + ".json")
    results = json.loads(path.read_text())["results"]
    ctx.record(json=str(path), work_per_sweep=results["work_per_sweep"],
               ratio_vs_plain_add={k: v["ratio_vs_plain_add"] for k, v in results["time"].items()})
    if os.environ.get("OUT"):
        shutil.copy(path, os.environ["OUT"])


# -----------------------------------------------------------------------------
# hidden stages, for the tests of this script


@stage("_ok", limit_s=30, quick_limit_s=30, hidden=True)
def stage_ok(ctx: Context) -> None:
    ctx.record(python=platform.python_version())


@stage("_hang", limit_s=5, quick_limit_s=5, hidden=True)
def stage_hang(ctx: Context) -> None:
    ctx.record(started=True)  # numbers recorded before a hang survive the kill
    while True:
        time.sleep(1)


@stage("_fail", limit_s=30, quick_limit_s=30, hidden=True)
def stage_fail(ctx: Context) -> None:
    ctx.record(started=True)
    raise RuntimeError("deliberate failure of the test stage")


# -----------------------------------------------------------------------------
# the orchestrator: one subprocess per stage, the JSON rewritten after each


def probe_device() -> str:
    """'cuda' or 'cpu', from a throwaway process (this one never touches CUDA); 'unknown' if it fails."""
    code = "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return last_line(proc.stdout) or "unknown"
    except subprocess.TimeoutExpired:
        return "unknown"


def run_stage(name: str, limit: float, quick: bool, logs: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one stage in a subprocess killed at ``limit`` seconds; its entry in the JSON."""
    result = logs / f"{name}.result.json"
    log = logs / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--result", str(result),
           *(["--quick"] if quick else [])]
    cpu = common.cpu_snapshot()
    run = run_command(cmd, log, limit, env)
    try:
        child = json.loads(result.read_text())
    except (OSError, ValueError):
        child = {}
    entry: dict[str, Any] = {"status": child.get("status"), "wall_s": run["wall_s"], "limit_s": round(limit, 1),
                             "device": child.get("device"), "numbers": child.get("numbers", {}),
                             # the share of the machine's CPU others used meanwhile: its timings are suspect if large
                             "cpu_taken_by_others": round(common.cpu_taken_by_others(cpu), 3)}
    text = log.read_text(errors="replace") if log.exists() else ""
    if run["timed_out"]:
        entry.update(status="timed_out", error=f"stopped at its limit of {limit:.0f} s")
    elif entry["status"] not in STATUSES:  # died without a word: a crash, an OOM kill
        entry.update(status="failed", error=f"exit code {run['rc']}: {last_line(text)}")
    else:
        entry.update({k: child[k] for k in ("error", "reason") if k in child})
    if entry["status"] in ("failed", "timed_out"):
        entry["log_tail"] = "\n".join(text.splitlines()[-30:])
    return entry


def parse_limits(items: list[str]) -> dict[str, float]:
    limits = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in STAGES or not seconds:
            raise SystemExit(f"--stage-limit {item!r}: expected NAME=SECONDS with NAME one of {', '.join(STAGES)}")
        limits[name] = float(seconds)
    return limits


def selected(only: list[str]) -> list[str]:
    if not only:
        return [s.name for s in STAGES.values() if not s.hidden]
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise SystemExit(f"--only: unknown stage(s) {', '.join(unknown)}; stages: "
                         f"{', '.join(s.name for s in STAGES.values() if not s.hidden)}")
    return [n for n in STAGES if n in names]  # in the stages' order, whatever the flag's


def publish(payload: dict[str, Any], output: Path, logs: Path) -> None:
    """The JSON at ``output`` and, with $OUT set, at $OUT/gpu_check.json with the stages' logs beside it."""
    write_json_atomic(output, payload)
    out = os.environ.get("OUT")
    if out:
        write_json_atomic(Path(out) / "gpu_check.json", payload)
        target = Path(out) / "gpu_check_logs"
        target.mkdir(parents=True, exist_ok=True)
        for log in logs.glob("*.log"):
            shutil.copy(log, target / log.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes; a CPU is allowed (under 3 min on 2 cores)")
    parser.add_argument("--only", action="append", default=[], metavar="STAGE[,STAGE]",
                        help=f"run only these stages (of {', '.join(s.name for s in STAGES.values() if not s.hidden)})")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help="total seconds; stages that would start after it are recorded as skipped")
    parser.add_argument("--stage-limit", action="append", default=[], metavar="NAME=SECONDS",
                        help="override one stage's time limit")
    parser.add_argument("--output", type=Path, help="the JSON (default benchmarks/results/gpu_check_<device>.json)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # the child's side: run this one stage
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        code = run_stage_here(args.stage, args.result, args.quick)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the result is written: no interpreter teardown, which can hang after CUDA or DeepSpeed

    names, limits = selected(args.only), parse_limits(args.stage_limit)
    device = probe_device()
    if device == "cpu" and not args.quick:
        sys.exit("gpu_check.py needs a CUDA device (or --quick for a smoke run on the CPU)")
    output = args.output or common.RESULTS_DIR / (f"gpu_check_{device}" + ("_quick" if args.quick else "") + ".json")
    logs = Path(tempfile.mkdtemp(prefix="gpu_check_logs_"))
    # tiny CPU work gains nothing from threads, and on a shared 2-core machine they spin against each other
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if device == "cpu" else {}
    payload: dict[str, Any] = {
        "benchmark": "gpu_check", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"quick": args.quick, "budget_s": args.budget, "stages": names, "device_probe": device,
                     "argv": sys.argv[1:] if argv is None else argv, "stage_env": env},
        "machine": {"cpu_count": os.cpu_count(), "cpu_model": common.cpu_model(), "platform": platform.platform(),
                    "python": platform.python_version(), "zo_scale_git": common._git_version()},
        "stages": {}, "wall_s": 0.0, "finished": False, "logs": str(logs),
    }
    publish(payload, output, logs)
    print(f"gpu_check on {device}: {', '.join(names)}; budget {args.budget:.0f} s; writing {output}", flush=True)
    started = time.monotonic()
    for name in names:
        left = args.budget - (time.monotonic() - started)
        spec = STAGES[name]
        limit = limits.get(name, spec.quick_limit_s if args.quick else spec.limit_s)
        if left < MIN_STAGE_S:
            entry: dict[str, Any] = {"status": "skipped", "wall_s": 0.0,
                                     "reason": f"the total budget of {args.budget:.0f} s was spent"}
        elif spec.cuda_only and device == "cpu":
            entry = {"status": "skipped", "wall_s": 0.0, "device": "cpu", "reason": spec.cuda_only}
        else:
            entry = run_stage(name, min(limit, left), args.quick, logs, env)
        payload["stages"][name] = entry
        payload["wall_s"] = round(time.monotonic() - started, 2)
        publish(payload, output, logs)
        print(f"{name:14s} {entry['status']:9s} {entry['wall_s']:7.1f} s  "
              f"{entry.get('error') or entry.get('reason') or ''}", flush=True)
    payload["finished"] = True
    publish(payload, output, logs)
    print(f"wrote {output} ({payload['wall_s']:.0f} s)")
    return 1 if any(e["status"] in ("failed", "timed_out") for e in payload["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
