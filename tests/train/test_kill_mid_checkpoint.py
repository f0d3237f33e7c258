"""``kill -9`` in the middle of writing a checkpoint: the same command resumes from the last whole one
and ends with the uninterrupted run's weights, bit for bit (fp32)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zo_scale.train.checkpoint import load_trainer_state

HOOK = Path(__file__).parent / "fault_hook"
RUN = ["run.steps=4", "run.save_every=2"]


def train(tiny: list[str], out: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    if kill_at is not None:
        env |= {"ZO_SCALE_KILL_AT": kill_at, "PYTHONPATH": os.pathsep.join([str(HOOK), env.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "zo_scale.train.cli", "train", *tiny, *RUN, f"run.output_dir={out}"],
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_overrides):
    out = tmp_path_factory.mktemp("straight")
    assert train(tiny_overrides, out).returncode == 0
    return load_file(out / "checkpoint" / "model" / "model.safetensors")


@pytest.mark.parametrize("kill_at", ["weights", "rename"])
def test_killed_mid_checkpoint_the_same_command_resumes_bit_for_bit(tmp_path, straight, tiny_overrides, kill_at):
    killed = train(tiny_overrides, tmp_path, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = {p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")}
    # the step-4 checkpoint was cut short: partial in checkpoint.tmp, or whole there but not committed
    assert left == ({"checkpoint", "checkpoint.tmp"} if kill_at == "weights" else {"checkpoint.old", "checkpoint.tmp"})
    whole = tmp_path / ("checkpoint" if kill_at == "weights" else "checkpoint.old")
    assert load_trainer_state(whole)["step"] == 2
    resumed = train(tiny_overrides, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "at step 2" in resumed.stderr
    assert load_trainer_state(tmp_path / "checkpoint")["step"] == 4
    assert not (tmp_path / "checkpoint.tmp").exists() and not (tmp_path / "checkpoint.old").exists()
    weights = load_file(tmp_path / "checkpoint" / "model" / "model.safetensors")
    assert weights.keys() == straight.keys() and all(torch.equal(weights[k], straight[k]) for k in straight)
