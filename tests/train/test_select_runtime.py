"""Which runtime a run gets, and which DeepSpeed configs are refused (no process group is started)."""

import pytest
import torch

from zo_scale.train.config import ConfigError, load_config
from zo_scale.train.select_runtime import reconcile_deepspeed_config, resolve_device, resolve_mode

STAGE3 = {"zero_optimization": {"stage": 3}}


@pytest.mark.parametrize(("mode", "ds", "world", "expected"), [
    ("auto", None, 1, "single"),
    ("auto", None, 2, "replicated"),  # torchrun / accelerate without DeepSpeed
    ("auto", {"zero_optimization": {"stage": 0}}, 2, "replicated"),
    ("auto", {"zero_optimization": {"stage": 2}}, 2, "replicated"),  # no optimizer state to partition
    ("auto", STAGE3, 2, "zero3"),
    ("auto", STAGE3, 1, "zero3"),  # one GPU + offload
    ("replicated", None, 1, "replicated"),
])
def test_mode_follows_the_deepspeed_config_and_the_launcher(mode, ds, world, expected):
    assert resolve_mode(load_config(None, [f"dist.mode={mode}"]), ds, world) == expected


@pytest.mark.parametrize(("mode", "ds", "world", "message"), [
    ("single", None, 2, "every rank would train alone"),
    ("zero3", None, 2, "needs a DeepSpeed config with zero_optimization.stage 3"),
    ("replicated", STAGE3, 2, "contradicts the DeepSpeed config's ZeRO stage 3"),
    ("fsdp", None, 1, "unknown 'fsdp'"),
])
def test_contradictions_are_errors(mode, ds, world, message):
    with pytest.raises(ConfigError, match=message):
        resolve_mode(load_config(None, [f"dist.mode={mode}"]), ds, world)


def test_auto_values_are_filled_from_the_run():
    cfg = load_config(None, ["run.batch_size=16", "model.dtype=bf16"])
    ds = {**STAGE3, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    filled = reconcile_deepspeed_config(ds, cfg, world=4)
    assert (filled["train_batch_size"], filled["train_micro_batch_size_per_gpu"]) == (16, 4)
    assert filled["gradient_accumulation_steps"] == 1
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert ds["bf16"]["enabled"] == "auto"  # the input is left alone


@pytest.mark.parametrize(("ds", "message"), [
    ({**STAGE3, "scheduler": {"type": "WarmupLR"}}, "'scheduler' section"),
    ({**STAGE3, "gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 contradicts"),
    ({**STAGE3, "train_batch_size": 32}, "train_batch_size=32 contradicts the run: run.batch_size=16"),
    ({**STAGE3, "fp16": {"enabled": True}}, "fp16.enabled=True contradicts model.dtype=float32"),
    ({**STAGE3, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, "still 'auto'"),
])
def test_deepspeed_config_that_contradicts_the_run_is_refused(ds, message):
    with pytest.raises(ConfigError, match=message):
        reconcile_deepspeed_config(ds, load_config(None, ["run.batch_size=16"]), world=2)


def test_model_device_auto_is_this_ranks_gpu_else_the_cpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda:3"  # a launcher's rank 3 trains on its own GPU
    assert resolve_device("cuda") == "cuda:3"
    assert resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    assert load_config(None, []).model.device == "auto"  # the default


@pytest.mark.parametrize(("device", "message"), [
    ("gpu0", "model.device: 'gpu0' is not a device"),
    ("cuda:0", "CUDA is not available here"),
])
def test_bad_devices_are_config_errors(monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=message):
        resolve_device(device)
