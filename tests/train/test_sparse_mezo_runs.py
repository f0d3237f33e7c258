"""``zo-scale train optim.sampler=magnitude optim.perturb=in_forward`` (Sparse-MeZO): resumes and replays
bit for bit, takes its thresholds from the gathered parameters under ZeRO-3, and fails loudly where it
cannot run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zo_scale.models import load_model
from zo_scale.train.cli import main

SPARSE_MEZO = ["optim.sampler=magnitude", "optim.perturb=in_forward", "optim.sparsity=0.5"]


def weights(run_dir):
    return load_file(run_dir / "checkpoint" / "model" / "model.safetensors")


def start():
    """The weights every run here starts from: tiny-llama built with run.seed 0."""
    return {k: v.clone() for k, v in load_model("tiny-llama", seed=0)[0].state_dict().items()}


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_a_run_moves_only_the_small_weights_resumes_and_replays_bitwise(run_cli, tmp_path):
    base = start()
    code, straight = run_cli(*SPARSE_MEZO, "run.steps=4", out="straight")
    assert code == 0
    for steps in (2, 4):  # the second run resumes from the first one's checkpoint
        code, split = run_cli(*SPARSE_MEZO, f"run.steps={steps}", out="split")
        assert code == 0
    a, b = weights(straight), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    matrix = next(k for k in a if k.endswith("q_proj.weight"))
    moved = a[matrix] != base[matrix]
    assert moved.any()
    assert base[matrix][moved].abs().max() <= base[matrix].abs().median()  # only the small half moved
    assert main(["replay", str(straight / "seedlog.jsonl"), str(tmp_path / "replayed")]) == 0
    replayed = load_file(tmp_path / "replayed" / "model.safetensors")
    assert all(torch.equal(v, replayed[k]) for k, v in a.items())


@pytest.mark.parametrize(("extra", "message"), [
    (["optim.sampler=magnitude", "optim.perturb=in_place"], "set optim.perturb=in_forward"),  # auto: in_forward
    ([*SPARSE_MEZO, "optim.estimator=jvp"], "needs optim.perturb=in_forward, which cannot run here: optim.estimator"),
    ([*SPARSE_MEZO, "optim.resample_every=5"], "follows the weights every step"),
    ([*SPARSE_MEZO, "peft.method=lora"], "Sparse-MeZO is for full-parameter tuning"),
])
def test_what_it_cannot_run_is_a_config_error(run_cli, capsys, extra, message):
    code, out = run_cli("run.steps=2", *extra)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "seedlog.jsonl").exists()


def test_zero3_on_two_ranks_follows_one_process(tiny_overrides, tmp_path, run_zero3_job, zero3_weights_follow):
    """Each rank measures h on the gathered parameter in the first forward and masks its own partition's
    update with it: the same trajectory as one process, up to half-batch rounding. (The model is saved
    first: DeepSpeed's partitioned init would draw other random weights.)"""
    folder = tmp_path / "tiny-llama"
    model, tokenizer = load_model("tiny-llama", seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # ZO-SGD: the lazy update lands on each gathered parameter inside the next forward, masked there
    common = [*tiny_overrides, *SPARSE_MEZO, f"model.name={folder}", "run.steps=4", "run.log_every=1"]
    assert main(["train", *common, f"run.output_dir={tmp_path / 'one'}"]) == 0
    z3 = run_zero3_job(*common)
    assert json.loads((z3 / "summary.json").read_text())["runtime"] == "zero3"
    assert losses(z3) == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    base = load_file(folder / "model.safetensors")
    sharded, one = zero3_weights_follow(z3, tmp_path / "one", base)
    for name, want in one.items():  # the same elements moved
        assert torch.equal(sharded[name] != base[name], want != base[name]), name
