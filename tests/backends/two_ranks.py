"""Launch a test worker on 2 real CPU ranks (torchrun --standalone, gloo) for a list of cases."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).parents[2]


def launch_two_ranks(
    worker: Path, cases: list[str], build_model: Callable[[str], torch.nn.Module], tmp: Path, args: list[str],
    results_prefix: str = "", timeout_s: float = 300,
) -> tuple[dict[str, dict], float]:
    """Save the model of each case (its name before the first ':') under ``tmp/models``, run ``worker``
    on 2 ranks with ``--model-dir``, ``--out`` and ``args`` for every case in one launch (a free port
    from --standalone), and load what it saved per case: ({case: results}, seconds the launch took)."""
    models, out = tmp / "models", tmp / "out"
    out.mkdir(parents=True)
    for name in {case.split(":")[0] for case in cases}:
        build_model(name).save_pretrained(models / name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker),
           "--model-dir", str(models), "--out", str(out), *args, *cases]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # 2 ranks on 2 cores
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, f"2-rank run of {worker.name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-8000:]}"
    results = {c: torch.load(out / f"{results_prefix}{c.replace(':', '_')}.pt", weights_only=True) for c in cases}
    return results, elapsed


def leave_worker() -> None:
    """End a worker rank: wait for the other, close the group, and exit without interpreter teardown.

    Everything is saved and the group is gone. A finished ZeRO-3 rank has been seen to abort in
    interpreter teardown ('terminate called without an active exception', C++ threads destroyed
    still joinable); leaving without the teardown keeps that from failing a run that succeeded.
    """
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
