"""ZO Fine-tuner end to end: ``zo-scale learn-scales`` writes a scales file for every tensor of the base
model; ``zo-scale train optim.scales=<file>`` perturbs along them, resumes and replays bit for bit, runs
under ZeRO-3 like one process, and refuses a file that does not fit, by name."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zo_scale.models import load_model
from zo_scale.train.cli import main


def weights(run_dir):
    return load_file(run_dir / "checkpoint" / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def scales_file(tmp_path_factory, tiny_overrides):
    out = tmp_path_factory.mktemp("learned")
    assert main(["learn-scales", *tiny_overrides, "run.steps=6", "meta.lr=0.1", f"run.output_dir={out}"]) == 0
    return out / "perturbation_scales.json"


def test_the_file_has_a_normalized_scale_for_every_tensor_and_the_run_its_log(scales_file):
    record = json.loads(scales_file.read_text())
    model = load_model("tiny-llama", seed=0)[0]
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    assert set(record["scales"]) == set(sizes)
    values = record["scales"]
    assert sum(sizes[n] * s * s for n, s in values.items()) == pytest.approx(sum(sizes.values()))
    assert max(values.values()) / min(values.values()) > 1.05  # 6 Adam steps of 0.1 on log s moved them
    assert record["model"] == "tiny-llama" and record["learned_with"]["steps"] == 6
    rows = [json.loads(line) for line in (scales_file.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and all("meta_loss" in r for r in rows)
    assert (scales_file.parent / "loss_curve.png").exists()
    assert not list(scales_file.parent.glob("*.tmp"))


def test_a_run_with_the_scales_resumes_and_replays_bitwise_and_differs_from_plain(run_cli, scales_file, tmp_path):
    scaled = [f"optim.scales={scales_file}"]
    code, straight = run_cli(*scaled, "run.steps=4", out="straight")
    assert code == 0
    for steps in (2, 4):  # the second run resumes from the first one's checkpoint
        code, split = run_cli(*scaled, f"run.steps={steps}", out="split")
        assert code == 0
    code, plain = run_cli("run.steps=4", out="plain")
    assert code == 0
    a, b, p = weights(straight), weights(split), weights(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], p[k]) for k in a)
    assert main(["replay", str(straight / "seedlog.jsonl"), str(tmp_path / "replayed")]) == 0
    replayed = load_file(tmp_path / "replayed" / "model.safetensors")
    assert all(torch.equal(v, replayed[k]) for k, v in a.items())


def test_zero3_on_two_ranks_follows_one_process(tiny_overrides, scales_file, tmp_path, run_zero3_job,
                                                zero3_weights_follow):
    """Each rank scales its own partition of z by its tensor's scale; c comes from the full sizes."""
    folder = tmp_path / "tiny-llama"
    model, tokenizer = load_model("tiny-llama", seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    common = [*tiny_overrides, f"optim.scales={scales_file}", f"model.name={folder}", "run.steps=3", "run.log_every=1"]
    assert main(["train", *common, f"run.output_dir={tmp_path / 'one'}"]) == 0
    z3 = run_zero3_job(*common)
    assert json.loads((z3 / "summary.json").read_text())["runtime"] == "zero3"
    zero3_weights_follow(z3, tmp_path / "one", load_file(folder / "model.safetensors"))


def test_a_file_that_does_not_fit_is_refused_by_name(run_cli, capsys, scales_file, tmp_path):
    one_tensor = tmp_path / "one_tensor.json"
    record = json.loads(scales_file.read_text())
    record["scales"] = dict(list(record["scales"].items())[:1])
    one_tensor.write_text(json.dumps(record))
    damaged = tmp_path / "damaged.json"
    damaged.write_text(scales_file.read_text()[:50])
    negative = tmp_path / "negative.json"
    negative.write_text(json.dumps({**record, "scales": {"model.norm.weight": -1.0}}))
    cases = [
        ([f"optim.scales={tmp_path / 'absent.json'}"], "no file"),
        ([f"optim.scales={damaged}"], "is not JSON"),
        ([f"optim.scales={negative}"], "positive finite numbers"),
        ([f"optim.scales={one_tensor}"], "learned on another model"),
        ([f"optim.scales={scales_file}", "optim.sampler=lowrank"], "needs optim.sampler=normal or rademacher"),
    ]
    for extra, message in cases:
        code, out = run_cli("run.steps=2", *extra)
        assert code == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not (out / "seedlog.jsonl").exists()
    code, _ = run_cli("peft.method=lora", command="learn-scales", out="learn-lora")
    assert code == 2
    assert "full weights" in capsys.readouterr().err
