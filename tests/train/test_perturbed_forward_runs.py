"""``zo-scale train`` with ``optim.perturb=in_forward``: the same trajectory as in place for every tuning
mode it takes (to fp32 rounding), and a clear refusal (exit 2, nothing written) for those it does not."""

import json

import pytest
import torch
from safetensors.torch import load_file

IN_FORWARD = "optim.perturb=in_forward"
ADAPTER = ["optim.lr=0.1", "optim.eps=1e-2"]


def trained(run_dir):
    folder = next(p for p in (run_dir / "checkpoint").iterdir() if p.is_dir())
    return load_file(next(folder.glob("*.safetensors")))


def grads(run_dir):
    return [json.loads(line)["grads"][0] for line in (run_dir / "seedlog.jsonl").read_text().splitlines()[1:]]


@pytest.mark.parametrize("mode", [
    ["optim.rule=adam"],
    ["model.name=tiny-opt", "optim.sampler=lowrank"],
    ["peft.method=lora", *ADAPTER],
    ["peft.method=prefix", *ADAPTER],
    ["model.quantization=nf4", "peft.method=lora", *ADAPTER],
], ids=["full adam", "opt lozo", "lora", "prefix", "nf4 lora"])
def test_in_forward_follows_the_in_place_run(run_cli, mode):
    code, in_place = run_cli("run.steps=3", *mode, out="in_place")
    assert code == 0
    code, in_forward = run_cli("run.steps=3", *mode, IN_FORWARD, out="in_forward")
    assert code == 0
    assert grads(in_forward) == pytest.approx(grads(in_place), rel=1e-3, abs=1e-4)
    a, b = trained(in_place), trained(in_forward)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize(("mode", "message"), [
    (["peft.method=prompt"], "does not combine with peft.method=prompt"),
    (["model.quantization=int8"], "does not reach quantized weights' scales"),
    (["hybrid.fo_layers=1"], "does not combine with hybrid.fo_layers"),
    (["optim.estimator=jvp"], "'jvp' evaluates no perturbed points"),
    (["optim.perturb=copies"], "unknown perturb 'copies'"),
])
def test_what_in_forward_cannot_run_is_refused_before_training(run_cli, capsys, mode, message):
    code, out = run_cli("run.steps=2", IN_FORWARD, *mode)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "seedlog.jsonl").exists()
