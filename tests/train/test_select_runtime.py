"""Which runtime a run gets, and which DeepSpeed configs are refused (no process group is started)."""

import pytest
import torch

from zo_scale.train.config import ConfigError, load_config
from zo_scale.train.select_runtime import (
    check_deepspeed_config,
    reconcile_deepspeed_config,
    resolve_device,
    resolve_mode,
    resolve_model_dtype,
)

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
    filled = reconcile_deepspeed_config(ds, cfg, world=4).config
    assert (filled["train_batch_size"], filled["train_micro_batch_size_per_gpu"]) == (16, 4)
    assert filled["gradient_accumulation_steps"] == 1
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert ds["bf16"]["enabled"] == "auto"  # the input is left alone


@pytest.mark.parametrize(("ds", "message"), [
    ({**STAGE3, "gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 contradicts"),
    ({**STAGE3, "train_batch_size": 32}, "train_batch_size=32 contradicts the run: run.batch_size=16"),
    ({**STAGE3, "fp16": {"enabled": True}}, "fp16.enabled=True contradicts model.dtype=float32"),
    ({**STAGE3, "aio": {"block_size": "auto"}}, 'aio.block_size is "auto", which neither'),
])
def test_deepspeed_config_that_contradicts_the_run_is_refused(ds, message):
    with pytest.raises(ConfigError, match=message):
        reconcile_deepspeed_config(ds, load_config(None, ["run.batch_size=16", "model.dtype=float32"]), world=2)


def test_trainer_owned_keys_are_set_aside_and_every_auto_is_filled_per_key():
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "scheduler": {"type": "WarmupLR"},
          "gradient_clipping": "auto", "fp16": {"enabled": "auto", "loss_scale": 0, "hysteresis": 2},
          "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                                "offload_param": {"device": "cpu", "buffer_size": "auto"}},
          "autotuning": {"enabled": False, "results_dir": "autotuning_results"},  # "auto" in a value is no "auto"
          "tensorboard": {"enabled": True, "output_path": "logs/autotune/"}}
    out = reconcile_deepspeed_config(ds, load_config(None, ["run.batch_size=8", "model.dtype=float32"]), world=2)
    assert set(out.set_aside) == {"optimizer", "scheduler", "gradient_clipping", "fp16.loss_scale, fp16.hysteresis"}
    assert not {"optimizer", "scheduler", "gradient_clipping"} & out.config.keys()
    assert out.config["fp16"] == {"enabled": False}
    zero = out.config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 500_000_000  # DeepSpeed's default
    assert zero["stage3_param_persistence_threshold"] == 0  # the run's: every parameter partitioned
    assert zero["offload_param"]["buffer_size"] == 100_000_000  # DeepSpeed's default, in a nested section
    assert out.config["autotuning"] == ds["autotuning"] and out.config["tensorboard"] == ds["tensorboard"]
    assert "auto" not in {str(v) for v in out.filled.values()}


@pytest.mark.parametrize(("ds", "env", "dtype"), [
    ({"bf16": {"enabled": True}}, {}, "bfloat16"),
    ({"bfloat16": {"enabled": True}}, {}, "bfloat16"),  # DeepSpeed's older name of the section
    ({"fp16": {"enabled": "auto"}}, {"ACCELERATE_MIXED_PRECISION": "fp16"}, "float16"),
    (None, {"ACCELERATE_MIXED_PRECISION": "bf16"}, "bfloat16"),
    (None, {"ACCELERATE_MIXED_PRECISION": "no"}, "float32"),
    (None, {}, "float32"),
])
def test_model_dtype_auto_is_the_launchers_precision(monkeypatch, ds, env, dtype):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(None, [])
    assert cfg.model.dtype == "auto"  # the default
    if ds is None:
        resolve_model_dtype(cfg, None)
    else:
        check_deepspeed_config({**STAGE3, **ds}, cfg, 1)
    assert cfg.model.dtype == dtype


@pytest.mark.parametrize(("ds", "env", "message"), [
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, {}, "both true"),
    ({"bf16": {"enabled": True}}, {"ACCELERATE_MIXED_PRECISION": "fp16"}, "contradicts accelerate's mixed_precision"),
    ({}, {"ACCELERATE_MIXED_PRECISION": "fp8"}, "mixed_precision=fp8"),
])
def test_precisions_that_disagree_are_refused(monkeypatch, ds, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        check_deepspeed_config({**STAGE3, **ds}, load_config(None, []), 1)


def test_an_explicit_dtype_wins_over_accelerates_mixed_precision(monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    cfg = load_config(None, ["model.dtype=float32"])
    resolve_model_dtype(cfg, None)
    assert cfg.model.dtype == "float32" and "mixed_precision=bf16 set aside" in caplog.text


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


@pytest.mark.parametrize(("mixed", "warned"), [("no", False), ("bf16", False), ("fp16", True), ("fp8", True)])
def test_accelerates_mixed_precision_against_an_explicit_dtype(monkeypatch, caplog, mixed, warned):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", mixed)  # 'no' is accelerate's default: nothing to say
    cfg = load_config(None, ["model.dtype=bfloat16"])
    resolve_model_dtype(cfg, None)
    assert cfg.model.dtype == "bfloat16" and ("set aside" in caplog.text) == warned
