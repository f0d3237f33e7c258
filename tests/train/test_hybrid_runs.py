"""``zo-scale train`` with ``hybrid.fo_layers`` set: the last k blocks train by backprop, the rest by ZO."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zo_scale.models import load_model
from zo_scale.train.cli import main

HYBRID = ["hybrid.fo_layers=1", "hybrid.fo_lr=1e-3", "optim.lr=1e-3"]


def weights(run_dir):
    return load_file(run_dir / "checkpoint" / "model" / "model.safetensors")


def moved(run_dir):
    """{name: whether the run moved it} against tiny-llama's seed-0 weights, where every run starts."""
    base = load_model("tiny-llama")[0].state_dict()
    return {name: not torch.equal(value, base[name]) for name, value in weights(run_dir).items()}


def test_k1_trains_the_last_block_by_backprop_and_the_rest_by_zo(run_cli):
    code, out = run_cli("run.steps=4", *HYBRID)
    assert code == 0
    changed = moved(out)
    assert all(changed.values()), [n for n, c in changed.items() if not c]  # ZO moves every weight it owns
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert train_rows and all(r["fo_lr"] == 1e-3 and r["lr"] == 1e-3 for r in train_rows)
    assert (out / "checkpoint" / "fo_optimizer.pt").is_file()


def test_k1_changes_exactly_the_zo_part_when_fo_lr_is_0(run_cli):
    code, out = run_cli("run.steps=3", "hybrid.fo_layers=1", "hybrid.fo_lr=0", "hybrid.fo_optimizer=sgd")
    assert code == 0
    changed = moved(out)
    last = "model.layers.1."  # tiny-llama has 2 blocks; its head is untied, so it is FO with the final norm
    fo = {n for n in changed if n.startswith(last) or n in ("model.norm.weight", "lm_head.weight")}
    assert fo and not any(changed[n] for n in fo)
    assert all(c for n, c in changed.items() if n not in fo)


def test_a_resumed_hybrid_run_equals_the_uninterrupted_run_bitwise(run_cli):
    code, straight = run_cli("run.steps=6", *HYBRID, out="straight")
    assert code == 0
    for steps in (3, 6):  # AdamW moments come back from fo_optimizer.pt
        code, split = run_cli(f"run.steps={steps}", *HYBRID, out="split")
        assert code == 0
    a, b = weights(straight), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_k_all_is_pure_backprop_with_no_seed_log_records(run_cli):
    code, out = run_cli("run.steps=3", "hybrid.fo_lr=1e-3", flags=["--fo-layers", "-1"])  # -1: every block
    assert code == 0
    assert all(moved(out).values())
    assert len((out / "seedlog.jsonl").read_text().splitlines()) == 1  # the header only: no ZO steps
    assert not (out / "checkpoint" / "optimizer.pt").exists()


def test_hybrid_over_a_lora_adapter(run_cli):
    code, out = run_cli("run.steps=3", "peft.method=lora", "hybrid.fo_layers=1", "hybrid.fo_lr=1e-2",
                        "optim.lr=0.1", "optim.eps=1e-2")
    assert code == 0
    adapter = load_file(out / "checkpoint" / "adapter" / "adapter_model.safetensors")
    b = {k: v for k, v in adapter.items() if ".lora_B." in k}
    # B starts at 0: both the ZO block (layer 0) and the FO block (layer 1) moved theirs
    assert all(v.abs().sum() > 0 for v in b.values()) and {k.split(".layers.")[1][0] for k in b} == {"0", "1"}


@pytest.mark.parametrize(("overrides", "message"), [
    (["hybrid.fo_layers=3"], "k must be in [0, 2]"),
    (["hybrid.fo_layers=1", "hybrid.fo_optimizer=lion"], "unknown FO optimizer 'lion'"),
    (["hybrid.fo_layers=1", "model.quantization=int8"], "the quantized weights have no gradient"),
    (["hybrid.fo_layers=1", "peft.method=prefix"], "nothing trainable is in the last 1 block(s)"),
])
def test_a_bad_hybrid_config_exits_2_and_names_the_problem(run_cli, capsys, overrides, message):
    code, out = run_cli("run.steps=2", *overrides)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_replay_refuses_a_hybrid_log(run_cli, tmp_path, capsys):
    code, out = run_cli("run.steps=2", *HYBRID)
    assert code == 0
    assert main(["replay", str(out / "seedlog.jsonl"), str(tmp_path / "replayed")]) == 2
    assert "cannot be replayed" in capsys.readouterr().err
