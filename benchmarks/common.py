"""Helpers shared by the benchmark scripts: the OPT-125m-shaped model, timing, peak memory, results.

Nothing here is a benchmark. The scripts import it as ``common`` (they run as ``python benchmarks/x.py``,
which puts this folder on ``sys.path``). torch and transformers are imported inside the functions
that need them, so a parent process that only spawns measurement children stays small.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure
    from transformers import OPTForCausalLM

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = ("fp32", "bf16")


def cpu_snapshot() -> tuple[float, float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (/proc/stat), and this process's own
    (children included): the difference of two snapshots says how much CPU others took meanwhile."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    hz = os.sysconf("SC_CLK_TCK")
    busy = (user + nice + system + irq + softirq + steal) / hz
    t = os.times()
    return busy, busy + (idle + iowait) / hz, t.user + t.system + t.children_user + t.children_system


CPU_AT_START = cpu_snapshot()
LOAD_AT_START = os.getloadavg()  # 1/5/15-minute load averages when the script started


def cpu_taken_by_others(since: tuple[float, float, float] = CPU_AT_START) -> float:
    """Fraction of the machine's CPU capacity used by other processes since ``since`` (a
    :func:`cpu_snapshot`; default: when this script started).

    Near 0 on a quiet machine; on a shared one, timings from a run with a large value are suspect.
    """
    busy, total, own = cpu_snapshot()
    busy0, total0, own0 = since
    return max(0.0, (busy - busy0) - (own - own0)) / max(total - total0, 1e-9)


# -----------------------------------------------------------------------------
# the model and the batch


def torch_dtype(name: str) -> torch.dtype:
    """'fp32' or 'bf16' as a torch dtype."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def opt_125m(dtype: str = "fp32", seed: int = 0) -> OPTForCausalLM:
    """OPT-125m's shape with random weights: ``OPTForCausalLM(OPTConfig())``, eval mode.

    OPTConfig's defaults are OPT-125m: vocab 50272, hidden 768, 12 layers, 12 heads, ffn 3072,
    2048 (+2 offset) positions; lm_head is tied to the token embedding (125.2M parameters).
    Eval mode turns off dropout (0.1 by default), so the forwards of a ZO step see one function.
    """
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig()).to(torch_dtype(dtype)).eval()


def opt_125m_from_config(seed: int = 0) -> OPTForCausalLM:
    """OPT-125m's shape, fp32, through ``from_config``: under a live ``HfDeepSpeedConfig`` (ZeRO-3) each
    parameter is partitioned as it is constructed (other random values than :func:`opt_125m`)."""
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(OPTConfig(), dtype=torch.float32).eval()


def lm_batch(batch: int, seq: int, vocab: int = 50272, seed: int = 0) -> torch.Tensor:
    """Random token ids, shape (batch, seq); the same seed gives the same batch."""
    import torch

    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def stacked_lm_losses(model: torch.nn.Module, ids: torch.Tensor, groups: int) -> torch.Tensor:
    """The mean next-token loss of each of ``groups`` stacked copies of ``ids``, shape (groups,): the
    closure of ``perturb="in_forward"`` (one forward over groups x rows)."""
    import torch.nn.functional as F

    stacked = ids.repeat(groups, 1)
    logits = model(input_ids=stacked).logits  # (groups * rows, T, vocab)
    # position t predicts token t + 1, the last predicts nothing (ignored): the labels shift, not the
    # logits, so no copy of them is made (as transformers' own causal LM loss does)
    labels = F.pad(stacked[:, 1:], (0, 1), value=-100)
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")  # 0 where ignored
    return per_token.view(groups, -1).sum(1) / (ids.shape[0] * (ids.shape[1] - 1))


# -----------------------------------------------------------------------------
# work per step: what a GPU pays per launch, per host sync and per byte, counted on this CPU

SYNC_OPS = ("aten::_local_scalar_dense",)  # what .item(), float(), int(), tolist() of a tensor's value run


@contextlib.contextmanager
def counting_zo_bytes() -> Iterator[dict[str, int]]:
    """Counts the bytes each ZO pass reads and writes (sweep_shard and perturbed_copies both run
    ``sweep._pass``): the shard (read; written unless the pass only makes copies), the rule's buffers and
    master copy (read and written when it updates or uses them), each copy written; a flat bucket's sweep
    (``flat_buckets.bucket_pass``) the same over the elements it covers, padding included."""
    import torch

    from zo_scale.core import flat_buckets, sweep

    tally = {"read": 0, "written": 0}
    inner = sweep._pass

    def counted(shard, before=(), update=None, after=(), state=None, master=None, offsets=(), kernel_mode=None,
                copies=()):
        moved, outs = inner(shard, before, update, after, state, master, offsets, kernel_mode, copies)
        moves = [*((before, after) if master is None else (offsets,)), update.weights if update else (), *copies]
        if all(d.on(shard) is None for phase in moves for d, _ in phase):
            return moved, outs  # no direction acts on this shard: the pass returns before touching it
        size = shard.flat.numel() * shard.flat.element_size()
        kept = {id(t): t for t in (*(state or {}).values(), master) if isinstance(t, torch.Tensor) and t.dim()}
        both = sum(t.numel() * t.element_size() for t in kept.values())
        tally["read"] += size + both
        tally["written"] += both + sum(o.numel() * o.element_size() for o in outs if o is not shard.flat)
        if before or after or update is not None or master is not None:
            tally["written"] += size
        return moved, outs

    inner_bucket = flat_buckets.bucket_pass

    def counted_bucket(bucket, start, stop, before=(), update=None, after=(), copies=(), kernel_mode=None):
        outs = inner_bucket(bucket, start, stop, before, update, after, copies, kernel_mode)
        if outs is not None:
            size = (stop - start) * bucket.flat.element_size()
            tally["read"] += size
            tally["written"] += sum(size for out in outs if out is not None)
            if before or after or update is not None:
                tally["written"] += size
        return outs

    sweep._pass, flat_buckets.bucket_pass = counted, counted_bucket
    try:
        yield tally
    finally:
        sweep._pass, flat_buckets.bucket_pass = inner, inner_bucket


CUDA_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")  # the runtime/driver calls that launch


def work_per_step(run: Callable[[], object], model_bytes: int, cuda: bool = False) -> dict[str, Any]:
    """One call of ``run`` under the torch profiler and :func:`counting_zo_bytes`: aten ops (on a GPU each op
    on a device tensor is a kernel launch), host reads, calls of the compiled ZO kernel, and the bytes the
    ZO passes read and write, also over ``model_bytes``. ``cuda``: also trace CUDA (its launch calls are
    only recorded then) and count ``cuda_kernel_launches``; the device is synchronized before the trace ends."""
    import torch.profiler

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with counting_zo_bytes() as tally, torch.profiler.profile(activities=activities) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    out = {"aten_ops": sum(e.count for e in events if e.key.startswith("aten::")),
           "host_reads": sum(e.count for e in events if e.key in SYNC_OPS),
           "zo_kernel_calls": sum(e.count for e in events if e.key.startswith("## Call CompiledFxGraph")),
           "zo_bytes_read": tally["read"], "zo_bytes_written": tally["written"],
           "zo_bytes_per_model_bytes": (tally["read"] + tally["written"]) / model_bytes}
    if cuda:
        out["cuda_kernel_launches"] = sum(e.count for e in events if e.key in CUDA_LAUNCHES)
    return out


# -----------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    median_s: float
    times_s: list[float]


def time_it(fn: Callable[[], object], warmup: int = 1, repeats: int = 5) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; wall clock, median."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), times)


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 1, repeats: int = 5) -> dict[str, Timing]:
    """Like ``time_it`` for several functions, taken round-robin (a, b, c, a, b, c, ...).

    On a shared machine the speed drifts over a run; interleaving spreads the drift over all the
    functions instead of penalising whichever ran in the slow minute, so their ratios stay fair.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: Timing(statistics.median(ts), ts) for k, ts in times.items()}


# -----------------------------------------------------------------------------
# memory (Linux): peak resident set size of this process


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mib() -> float:
    """Current resident set size (VmRSS), MiB."""
    return _proc_status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak resident set size so far, ``getrusage(RUSAGE_SELF).ru_maxrss`` (kB on Linux), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hwm_mib() -> float:
    """The kernel's RSS high-water mark for this address space (VmHWM), MiB: a cross-check of ru_maxrss."""
    return _proc_status_mib("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (writes 5 to /proc/self/clear_refs). Returns whether it worked.

    ru_maxrss is max(peak carried over exec from the spawning process, this address space's peak), and
    the reset lowers the second, so keep the spawning process small (see ``run_child``).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def run_child(script: Path, args: list[str]) -> dict[str, Any]:
    """Run ``python script *args`` in a fresh process; it must print one JSON object as its last stdout line."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {script.name} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------
# results: JSON + PNG under benchmarks/results/


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: CPU count, torch version and threads, and friends."""
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "zo_scale_git": _git_version(),
        "loadavg_1_5_15_at_start": LOAD_AT_START,
        "loadavg_1_5_15_at_end": os.getloadavg(),
        "cpu_fraction_taken_by_other_processes": cpu_taken_by_others(),
    }


def _git_version() -> str:
    """The repository's HEAD commit, marked when zo_scale/ has uncommitted changes (the code measured)."""
    root = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" + uncommitted changes in zo_scale/" if git("status", "--porcelain", "zo_scale") else "")


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo (else the platform's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(name: str, settings: dict[str, Any], results: Any, notes: list[str] | None = None) -> Path:
    """Write benchmarks/results/<name>.json with the machine, the exact settings, the results and notes."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "settings": settings,
        "results": results,
        "notes": notes or [],
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    others = payload["machine"]["cpu_fraction_taken_by_other_processes"]
    if others > 0.05:
        print(f"warning: other processes took {others:.0%} of the CPU during this run; "
              "timings (not memory) are suspect")
    return path


def _jsonable(x: Any) -> Any:
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    return str(x)


def new_figure(width: float = 8.0, height: float = 4.5, ncols: int = 1) -> tuple[Figure, Any]:
    """A figure and its axes (one, or an array of ``ncols``), drawn with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), layout="constrained")


def hbar_with_ratios(ax: Any, labels: list[str], values: list[float], samples: list[list[float]],
                     ratios: list[float], colors: list[str]) -> None:
    """Horizontal bars (first label on top) of ``values``, each repeat in ``samples`` as a black dot,
    and "xN" (its ratio) at the end of each bar."""
    bars = ax.barh(labels, values, color=colors)
    for i, (bar, ratio) in enumerate(zip(bars, ratios, strict=True)):
        ax.plot(samples[i], [i] * len(samples[i]), "k.", markersize=4)
        ax.text(max(bar.get_width(), *samples[i]), i, f"  x{ratio:.2f}", va="center")
    ax.invert_yaxis()
    ax.set_xlim(0, max(max(v) for v in samples) * 1.2)


def step_times(ax: Any, timings: dict[str, Timing], baseline_s: float, colors: list[str]) -> None:
    """Seconds per step of each timed variant (first on top) as :func:`hbar_with_ratios` bars, each with its
    ratio to ``baseline_s``, which a dashed line marks."""
    labels = list(timings)
    hbar_with_ratios(ax, labels, [timings[k].median_s for k in labels], [timings[k].times_s for k in labels],
                     [timings[k].median_s / baseline_s for k in labels], colors)
    ax.axvline(baseline_s, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("wall-clock time per step (s; bar: median, dots: repeats; lower is better)")


def save_figure(fig: Figure, name: str) -> Path:
    """Save benchmarks/results/<name>.png and close the figure."""
    import matplotlib.pyplot as plt

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def machine_label() -> str:
    """A short caption for plots: '2-core CPU, torch 2.x, 2 threads'."""
    import torch

    return f"{os.cpu_count()}-core CPU ({cpu_model()}), torch {torch.__version__}, {torch.get_num_threads()} threads"
