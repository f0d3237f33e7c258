import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from zo_scale.train.cli import main

ROOT = Path(__file__).parents[2]

@pytest.fixture
def run_cli(tmp_path, tiny_overrides):
    """Run ``zo-scale`` in-process; returns (exit code, output dir)."""

    def run(*args, command="train", out="run", flags=()):
        out_dir = tmp_path / out
        code = main([command, *flags, *tiny_overrides, f"run.output_dir={out_dir}", *args])
        return code, out_dir

    return run


@pytest.fixture
def run_zero3_job(tmp_path):
    """Run ``deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json <overrides>`` (2 CPU
    ranks over gloo) to completion; returns the output dir. The job's log is in the failure message."""

    def run(*overrides: str, out: str = "zero3"):
        with socket.socket() as s:  # a port free right now: fixed ones collide with other jobs
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out_dir, log = tmp_path / out, tmp_path / f"{out}.log"
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
               "launch/train.py", "--deepspeed", "ds_configs/zero3.json", *overrides, f"run.output_dir={out_dir}"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(log, "w") as f:
            result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=300)
        assert result.returncode == 0, log.read_text()[-3000:]
        return out_dir

    return run


@pytest.fixture(scope="session")
def zero3_weights_follow():
    """``check(z3_dir, one_dir, base)``: every parameter of a ZeRO-3 run's sharded checkpoint lies within 1% of
    its move (from ``base``) of the one-process run's; returns (sharded, single) weights by name."""

    def check(z3: Path, one: Path, base: dict) -> tuple[dict, dict]:
        shards = sorted((z3 / "checkpoint" / "model").glob("*.safetensors"))
        sharded = {k: v for f in shards for k, v in load_file(f).items()}
        single = load_file(one / "checkpoint" / "model" / "model.safetensors")
        for name, want in single.items():
            moved = (want - base[name]).abs().max()
            assert (sharded[name] - want).abs().max() <= 0.01 * moved + 1e-7, name
        return sharded, single

    return check
