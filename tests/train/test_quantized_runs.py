"""``zo-scale train`` with ``model.quantization``: ZO on an int8 model's scales, LoRA over a 4-bit base."""

import pytest
import torch
from safetensors.torch import load_file

from zo_scale.models import load_model

SCALES = ["model.quantization=int8", "optim.lr=3e-3", "optim.eps=1e-3"]


def checkpoint_tensors(run_dir, folder="model"):
    name = "model.safetensors" if folder == "model" else "adapter_model.safetensors"
    return load_file(run_dir / "checkpoint" / folder / name)


def test_int8_run_trains_the_scales_and_keeps_the_codes(run_cli):
    code, out = run_cli("run.steps=3", *SCALES)
    assert code == 0
    saved = checkpoint_tensors(out)
    start = load_model("tiny-llama", quantization="int8")[0].state_dict()
    codes = [k for k in saved if saved[k].dtype == torch.int8]
    scales = [k for k in saved if k.endswith(".SCB")]
    assert codes and scales
    assert all(torch.equal(saved[k], start[k]) for k in codes)  # the int8 codes: bitwise unchanged
    assert all(not torch.equal(saved[k], start[k]) for k in scales)  # every row scale moved
    # the checkpoint is a quantized HF folder: it loads (quantized) with the trained scales
    model, _ = load_model("tiny-llama", weights=out / "checkpoint" / "model", quantization="int8")
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in scales)


def test_a_resumed_int8_run_equals_the_uninterrupted_run_bitwise(run_cli):
    code, straight = run_cli("run.steps=4", *SCALES, out="straight")
    assert code == 0
    for steps in (2, 4):
        code, split = run_cli(f"run.steps={steps}", *SCALES, out="split")
        assert code == 0
    a, b = checkpoint_tensors(straight), checkpoint_tensors(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_over_an_nf4_base_checkpoints_the_adapter(run_cli):
    code, out = run_cli("run.steps=3", "model.quantization=nf4", "peft.method=lora", "optim.lr=0.1",
                        "optim.eps=1e-2")
    assert code == 0
    adapter = checkpoint_tensors(out, "adapter")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)  # B starts at 0


def test_an_unknown_quantization_exits_2_and_names_the_choices(run_cli, capsys):
    code, out = run_cli("run.steps=2", "model.quantization=int4")
    assert code == 2
    assert "int4" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("overrides", [["model.quantization=nf4", "peft.method=lora", "hybrid.fo_layers=1"]])
def test_hybrid_over_an_adapter_on_a_quantized_base_runs(run_cli, overrides):
    code, out = run_cli("run.steps=2", *overrides, "optim.lr=0.1", "optim.eps=1e-2", "hybrid.fo_lr=1e-2")
    assert code == 0
    assert (out / "checkpoint" / "fo_optimizer.pt").is_file()
