"""``zo-scale train`` with ``peft.method``: the adapter trains, checkpoints in peft's format, resumes and replays."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from zo_scale.adapters.peft_tuning import PeftSettings, apply_peft
from zo_scale.models import load_model
from zo_scale.train.cli import main

# A random tiny model's loss is nearly flat in the adapter: lrs far above MeZO's for real models.
LORA = ["peft.method=lora", "optim.lr=0.1", "optim.eps=1e-2"]


def adapter(run_dir):
    return load_file(run_dir / "checkpoint" / "adapter" / "adapter_model.safetensors")


def test_a_lora_run_checkpoints_the_adapter_only_and_it_loads_with_peft(run_cli):
    code, out = run_cli("run.steps=6", *LORA)
    assert code == 0
    checkpoint = out / "checkpoint"
    assert not (checkpoint / "model").exists()
    saved = adapter(out)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    # B starts at zero: a nonzero B means ZO moved the adapter
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(checkpoint / "adapter")

    base, _ = load_model("tiny-llama")
    untouched = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, checkpoint / "adapter")
    loaded = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert len(loaded) == len(saved)
    for key, value in saved.items():
        match = [v for k, v in loaded.items() if k.replace(".default", "") == key]
        assert len(match) == 1 and torch.equal(match[0], value), key
    base_now = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(base_now[k], v) for k, v in untouched.items())


def test_a_resumed_lora_run_equals_the_uninterrupted_run_bitwise(run_cli):
    code, straight = run_cli("run.steps=6", "optim.rule=adam", *LORA, out="straight")
    assert code == 0
    for steps in (3, 6):  # the second run resumes from the first one's checkpoint
        code, split = run_cli(f"run.steps={steps}", "optim.rule=adam", *LORA, out="split")
        assert code == 0
    a, b = adapter(straight), adapter(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_replay_rebuilds_the_lora_adapter_bitwise(run_cli, tmp_path):
    code, out = run_cli("run.steps=5", *LORA)
    assert code == 0
    assert main(["replay", str(out / "seedlog.jsonl"), str(tmp_path / "replayed")]) == 0
    a, b = adapter(out), load_file(tmp_path / "replayed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("method", "lr"), [("prefix", 20.0), ("prompt", 100.0)])
def test_prefix_and_prompt_runs_train_their_virtual_tokens(run_cli, method, lr):
    code, out = run_cli("run.steps=4", f"peft.method={method}", "peft.num_virtual_tokens=4", f"optim.lr={lr}",
                        "optim.eps=0.1")
    assert code == 0
    saved = adapter(out)
    (key,) = saved  # one tensor: the virtual tokens' embeddings (prefix: keys and values of every layer)
    start = apply_peft(load_model("tiny-llama")[0], PeftSettings(method=method, num_virtual_tokens=4), seed=0)
    initial = start.prompt_encoder["default"].embedding.weight  # the trainer seeds the adapter with run.seed=0
    assert saved[key].shape == initial.shape and saved[key].shape[0] == 4
    assert not torch.equal(saved[key], initial)


@pytest.mark.parametrize(("override", "message"), [
    ("peft.method=adaptor", "unknown PEFT method 'adaptor'"),
    ("peft.target_modules=[wq]", "LoRA target module(s) ['wq'] not found"),
])
def test_a_bad_peft_section_exits_2_and_names_the_problem(run_cli, capsys, override, message):
    code, out = run_cli("run.steps=2", "peft.method=lora", override)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_resume_refuses_a_changed_adapter(run_cli, capsys):
    code, _ = run_cli("run.steps=2", *LORA)
    assert code == 0
    code, _ = run_cli("run.steps=4", *LORA, "peft.lora_r=4")
    assert code == 2
    assert "peft.lora_r" in capsys.readouterr().err
