"""``zo-scale train`` on a masked LM: LM-BFF prompts, k-shot data, checkpoints that resume and replay, and
ZeRO-3 over two ranks."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from zo_scale.models import load_model
from zo_scale.train.cli import main

MASKED = ["model.name=tiny-roberta", "task.k_shot=8", "task.num_eval=16", "optim.lr=1e-3", "optim.eps=1e-2"]


def weights(run_dir):
    return load_file(run_dir / "checkpoint" / "model" / "model.safetensors")


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_a_masked_lm_fine_tunes_on_k_shot_prompts_and_saves_a_masked_lm(run_cli):
    code, out = run_cli(*MASKED, "run.steps=4", "run.eval_every=2")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "accuracy" and 0 <= summary["final_accuracy"] <= 1
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["split"] for e in evals] == ["eval", "dev", "eval"] and evals[1]["examples"] == 16  # 8 dev per class
    config = json.loads((out / "checkpoint" / "model" / "config.json").read_text())
    assert config["architectures"] == ["RobertaForMaskedLM"]
    model, tokenizer = load_model("tiny-roberta", weights=out / "checkpoint" / "model")
    assert type(model).__name__ == "RobertaForMaskedLM" and tokenizer.mask_token == "<mask>"
    trained = weights(out)
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)


def test_a_masked_run_resumes_and_replays_bit_for_bit(run_cli, tmp_path):
    code, straight = run_cli(*MASKED, "run.steps=6", "optim.rule=adam", out="straight")
    assert code == 0
    assert run_cli(*MASKED, "run.steps=3", "optim.rule=adam", out="split")[0] == 0
    code, split = run_cli(*MASKED, "run.steps=6", "optim.rule=adam", out="split")
    assert code == 0
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["replay", str(straight / "seedlog.jsonl"), str(tmp_path / "replayed")]) == 0
    replayed = load_file(tmp_path / "replayed" / "model.safetensors")
    assert all(torch.equal(a[k], replayed[k]) for k in a)


def test_a_masked_run_asked_for_the_perturbed_forward_says_why_it_takes_the_in_place_step(run_cli, caplog):
    with caplog.at_level(logging.WARNING, logger="zo_scale"):
        code, out = run_cli(*MASKED, "run.steps=1", "optim.perturb=in_forward")
    assert code == 0
    assert "in_forward cannot run here (a masked LM" in caplog.text
    assert json.loads((out / "seedlog.jsonl").read_text().splitlines()[0])["header"]["optim"]["perturb"] == "in_place"


@pytest.mark.parametrize(("override", "message"), [
    ("task.k_shot=-1", "task.k_shot must be >= 0"),
    ("task.k_shot=600", "k=600 per class takes 1200"),
    ("task.name=copa", "label word"),
])
def test_bad_masked_runs_exit_2_naming_the_problem(run_cli, capsys, override, message):
    code, out = run_cli(*MASKED, "run.steps=1", override)
    assert code == 2 and message in capsys.readouterr().err and not out.exists()


def test_zero3_on_two_ranks_follows_one_process_on_a_masked_lm(tiny_overrides, tmp_path, run_zero3_job,
                                                              zero3_weights_follow):
    """DeepSpeed partitions the encoder and its tied head; the mask-position projection still sees the
    whole (gathered) vocabulary matrix. Same trajectory up to half-batch rounding."""
    folder = tmp_path / "tiny-roberta"
    model, tokenizer = load_model("tiny-roberta", seed=3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    common = [*tiny_overrides, *MASKED, f"model.name={folder}", "run.steps=4", "run.log_every=1", "optim.rule=adam"]
    assert main(["train", *common, f"run.output_dir={tmp_path / 'one'}"]) == 0
    z3 = run_zero3_job(*common)
    assert json.loads((z3 / "summary.json").read_text())["runtime"] == "zero3"
    assert losses(z3) == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    zero3_weights_follow(z3, tmp_path / "one", load_file(folder / "model.safetensors"))
