"""ZOTrainer: a Hugging Face Trainer whose steps are exactly ZO steps, resumable, and refusing what ZO cannot do."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

import zo_scale
from zo_scale.integrations import ZOTrainer
from zo_scale.models.tiny import build_tiny_model
from zo_scale.train.config import ConfigError

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "hf_trainer_sst2.py"


class Rows(torch.utils.data.Dataset):
    """Byte-token rows with labels: the LM loss over them is what Trainer's compute_loss returns."""

    def __init__(self, n: int = 48, length: int = 12) -> None:
        self.ids = torch.randint(3, 259, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(out: Path, **kwargs) -> TrainingArguments:
    defaults = {"max_steps": 6, "learning_rate": 1e-3, "per_device_train_batch_size": 8, "save_steps": 3,
                "logging_steps": 1, "seed": 3, "report_to": [], "use_cpu": True, "lr_scheduler_type": "linear",
                "warmup_steps": 2, "weight_decay": 0.01, "dataloader_num_workers": 0}
    return TrainingArguments(output_dir=str(out), **{**defaults, **kwargs})


class Records(TrainerCallback):
    """Each step's ZO record, as the seed log would keep it."""

    def __init__(self) -> None:
        self.records = []
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        self.records.append(copy.deepcopy(self.trainer.zo_optimizer.last_record))


def trained(out: Path, zo=None, resume=None, **kwargs):
    model = build_tiny_model("llama")
    callback = Records()
    trainer = ZOTrainer(model=model, args=arguments(out, **kwargs), train_dataset=Rows(), zo=zo, callbacks=[callback])
    callback.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, callback.records


@pytest.mark.parametrize("zo", [None, {"sampler": "rademacher", "rule": "momentum", "queries": 2}])
def test_the_trainers_steps_are_zo_steps_with_its_lr_schedule(tmp_path, zo):
    """Replaying the logged records with a bare ZOOptimizer gives the trained weights bit for bit: Trainer
    added nothing (no backward, no second update), and its schedule's lrs (warmup, linear decay) are the
    ones the ZO steps used."""
    model, trainer, records = trained(tmp_path / "run", zo)
    assert len(records) == 6 and trainer.state.global_step == 6
    lrs = [r.lrs[0] for r in records]
    assert lrs[:3] == pytest.approx([0.0, 0.5e-3, 1e-3]) and lrs[-1] < lrs[2]  # Trainer's warmup, then decay
    assert all(p.grad is None for p in model.parameters())
    replayed = build_tiny_model("llama")
    settings = zo or {}
    opt = zo_scale.ZOOptimizer(replayed.named_parameters(), 1e-3, 1e-3, rule=settings.get("rule", "sgd"),
                               sampler=zo_scale.DenseSampler(settings.get("sampler", "normal")),
                               queries=settings.get("queries", 1), weight_decay=0.01, seed=3)
    for record in records:
        opt.step(replay=record)
    for (name, p), q in zip(model.named_parameters(), replayed.parameters(), strict=True):
        assert torch.equal(p, q), name
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 6 and "grad_norm" not in logged[0]  # no gradients, so no gradient norm is reported


def test_resume_from_a_trainer_checkpoint_continues_the_same_steps(tmp_path):
    straight, _, _ = trained(tmp_path / "straight")  # 6 steps, checkpoints at 3 and 6
    resumed, _, records = trained(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-3"))
    assert [r.step for r in records] == [3, 4, 5]  # the ZO step count came back with optimizer.pt
    for (name, p), q in zip(resumed.named_parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    "kwargs,zo,message",
    [
        ({"gradient_accumulation_steps": 2}, None, "gradient_accumulation_steps=2: a ZO step estimates"),
        ({}, {"lr": 1e-3}, r"zo\['lr'\]: set it in TrainingArguments \(learning_rate\)"),
        ({}, {"perturb": "in_forward"}, "perturb='in_forward' needs the K row groups"),
        ({}, {"sampler": "magnitude"}, r"zo\['sampler'\]='magnitude' \(Sparse-MeZO\)"),
        ({}, {"epss": 1e-3}, "unknown key zo.epss"),
        ({}, {"estimator": "fzoo"}, "queries must be >= 2 for the 'fzoo' estimator"),
    ],
)
def test_what_zo_cannot_do_is_refused_by_name(tmp_path, kwargs, zo, message):
    with pytest.raises((ValueError, ConfigError), match=message):
        trained(tmp_path / "run", zo, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_example_runs_under_torchrun_on_two_ranks(tmp_path):
    """The example script as a user runs it, on the SST-2 sample shipped in the package: 2 replicated ranks
    (each its own batches, the same seeded points, losses averaged), a checkpoint, an accuracy line."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(EXAMPLE), "--model", "tiny-llama", "--steps", "4", "--num-train", "64", "--num-eval", "32",
           "--output-dir", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "accuracy" in result.stdout and "in 4 ZO steps" in result.stdout
    state = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["epoch"] == 2.0  # 64 rows, 2 ranks x 16 a step: each rank took its own half of every epoch
    assert (tmp_path / "out" / "checkpoint-4" / "optimizer.pt").exists()
