"""``zo-scale train`` with ``optim.perturb=in_forward``: the same trajectory as in place for every tuning
mode it takes (to fp32 rounding); for those it cannot take, a warning that says why and the in-place step."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zo_scale.train.build import in_forward_unsupported
from zo_scale.train.config import Config, OptimConfig

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
    ["hybrid.fo_layers=1", "hybrid.fo_lr=1e-3"],
    ["optim.conservative=true", "optim.lr=1e-2"],
    ["optim.rule=hizoo", "optim.estimator=hizoo"],
], ids=["full adam", "opt lozo", "lora", "prefix", "nf4 lora", "hybrid", "conservative", "hizoo"])
def test_in_forward_follows_the_in_place_run(run_cli, mode):
    code, in_place = run_cli("run.steps=3", *mode, out="in_place")
    assert code == 0
    code, in_forward = run_cli("run.steps=3", *mode, IN_FORWARD, out="in_forward")
    assert code == 0
    assert "perturb: in_forward" in (in_forward / "config.yaml").read_text()  # it ran, no fallback
    assert grads(in_forward) == pytest.approx(grads(in_place), rel=1e-3, abs=1e-4)
    a, b = trained(in_place), trained(in_forward)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize(("mode", "message"), [
    (["peft.method=prompt", *ADAPTER], "peft.method=prompt"),
    (["model.quantization=int8"], "ZO on quantized scales"),
    (["optim.estimator=jvp"], "optim.estimator=jvp"),
])
def test_what_in_forward_cannot_run_takes_the_in_place_step_and_says_so(run_cli, caplog, mode, message):
    code, fallback = run_cli("run.steps=2", IN_FORWARD, *mode, out="fallback")
    assert code == 0
    assert f"optim.perturb=in_forward cannot run here ({message}" in caplog.text
    assert "perturb: in_place" in (fallback / "config.yaml").read_text()  # what ran, for resume and replay
    code, in_place = run_cli("run.steps=2", *mode, out="in_place")
    assert code == 0
    a, b = trained(fallback), trained(in_place)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hizoo_takes_the_in_place_step_under_zero3_only():
    """Each ZeRO-3 rank keeps the Hessian of its own partition; the perturbed forward copies whole parameters."""
    cfg = Config(optim=OptimConfig(perturb="in_forward", rule="hizoo", estimator="hizoo"))
    assert in_forward_unsupported(cfg, "single") is None and in_forward_unsupported(cfg, "replicated") is None
    assert "optim.rule=hizoo under ZeRO-3" in in_forward_unsupported(cfg, "zero3")
    assert in_forward_unsupported(Config(optim=OptimConfig(perturb="in_forward")), "zero3") is None


def test_an_unknown_perturb_is_a_config_error(run_cli, capsys):
    code, out = run_cli("run.steps=2", "optim.perturb=copies")
    assert code == 2
    assert "unknown perturb 'copies'" in capsys.readouterr().err
    assert not (out / "seedlog.jsonl").exists()


# LOZO holds its updates in windows of nu steps (pending_window) that a save folds mid-window (an evaluation reads
# them through their correction)
LOZO = ["optim.sampler=lowrank", "optim.nu=4"]


@pytest.mark.parametrize("mode", [["optim.rule=momentum"], [*LOZO, "run.eval_every=2", "run.save_every=3"]],
                         ids=["momentum", "lozo"])
def test_replay_of_an_in_forward_run_rebuilds_its_weights_bitwise(run_cli, tmp_path, mode):
    """Replaying needs no forward: with the weights never moved, only the logged updates are applied (and LOZO's
    windows folded where the run folded them: V redrawn at step 4, the save after step 3; not the evaluations
    after steps 2 and 4)."""
    from zo_scale.train.cli import main

    code, out = run_cli("run.steps=6", *mode, IN_FORWARD)
    assert code == 0
    records = [json.loads(line) for line in (out / "seedlog.jsonl").read_text().splitlines()[1:]]
    assert [r["folded"] for r in records] == [False, False, False, "run.save_every=3" in mode, False, False]
    assert main(["replay", str(out / "seedlog.jsonl"), str(tmp_path / "replayed")]) == 0
    replayed = load_file(tmp_path / "replayed" / "model.safetensors")
    assert all(torch.equal(v, replayed[k]) for k, v in trained(out).items())


@pytest.mark.parametrize("mode", [["optim.rule=adam"], LOZO], ids=["adam", "lozo"])
def test_a_resumed_in_forward_run_equals_the_uninterrupted_run_bitwise(run_cli, mode):
    """The split run resumes from the checkpoint of step 3, which the straight run writes too (a save folds
    LOZO's open windows: mid-window here)."""
    code, straight = run_cli("run.steps=6", "run.save_every=3", *mode, IN_FORWARD, out="straight")
    assert code == 0
    for steps in (3, 6):  # the second run resumes from the first one's checkpoint
        code, split = run_cli(f"run.steps={steps}", "run.save_every=3", *mode, IN_FORWARD, out="split")
        assert code == 0
    a, b = trained(straight), trained(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert grads(straight) == grads(split)
