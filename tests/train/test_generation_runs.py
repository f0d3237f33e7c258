"""Generation tasks end to end: SQuAD/DROP-format data, the LM loss on the answer, greedy F1/EM evaluation,
F1 as the ZO objective, resume, ZeRO-3 over two ranks, and the errors a wrong config gets."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zo_scale.models import build_byte_tokenizer, build_tiny_model
from zo_scale.tasks import get_task, sample_splits
from zo_scale.tasks.answer_metrics import answer_text, exact_match, token_f1
from zo_scale.train.cli import main
from zo_scale.train.objectives import GenerationObjective

SQUAD = ["task.name=squad-demo", "task.num_train=16", "task.num_eval=6", "task.max_new_tokens=6",
         "run.batch_size=4"]


def rows(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def weights(run_dir):
    return load_file(run_dir / "checkpoint" / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def squad_batch():
    train, _, _ = sample_splits(get_task("squad-demo"), 4, 0, 6)
    return train


def test_the_lm_loss_is_the_mean_log_likelihood_of_the_answer_and_a_newline(squad_batch):
    model, tokenizer = build_tiny_model("llama").eval(), build_byte_tokenizer()
    objective = GenerationObjective(tokenizer, "lm", max_length=512, max_new_tokens=40)
    batch = objective.encode(squad_batch)
    want = []
    for ex in squad_batch:
        prompt = tokenizer(ex.prompt)["input_ids"]
        target = tokenizer(ex.target + "\n", add_special_tokens=False)["input_ids"]
        logprobs = model(input_ids=torch.tensor([prompt + target])).logits[0, :-1].log_softmax(-1)
        token_lp = logprobs[len(prompt) - 1 :].gather(-1, torch.tensor(target).unsqueeze(-1))
        want.append(-token_lp.mean())
    assert objective.loss(model, batch).item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)
    # the perturbed forward's stacked form: each copy's loss
    stacked = objective.loss(model, batch, groups=2)
    assert stacked.shape == (2,) and torch.allclose(stacked, objective.loss(model, batch).expand(2), rtol=1e-5)


def test_the_f1_loss_is_one_minus_the_mean_f1_of_the_greedy_answers(squad_batch):
    model, tokenizer = build_tiny_model("opt").eval(), build_byte_tokenizer()
    objective = GenerationObjective(tokenizer, "f1", max_length=512, max_new_tokens=5)
    batch = objective.encode(squad_batch)
    f1, em = [], []
    for ex in squad_batch:  # transformers' own greedy search, one unpadded prompt at a time
        prompt = torch.tensor([tokenizer(ex.prompt)["input_ids"]])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answer = answer_text(tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True))
        f1.append(token_f1(answer, ex.answers))
        em.append(exact_match(answer, ex.answers))
    assert objective.loss(model, batch).item() == pytest.approx(1 - sum(f1) / len(f1))
    assert objective.per_example(model, batch, batch_size=3) == {"f1": f1, "em": em}
    # the perturbed forward's stacked form: one decoding of the batch stacked twice, each copy's loss
    assert objective.loss(model, batch, groups=2).tolist() == [1 - sum(f1) / len(f1)] * 2


def test_a_real_model_answers_squad_demo_questions(run_cli):
    """SmolLM2-135M-Instruct reads the invented passages: its greedy answers overlap the gold ones."""
    code, out = run_cli("model.name=smollm2-135m", *SQUAD, "task.max_new_tokens=16", "task.num_eval=10",
                        "run.steps=1", "optim.lr=0")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["zero_shot_f1"] > 0.1 and summary["final_f1"] == summary["zero_shot_f1"]


def test_a_generation_run_logs_f1_and_em_and_resolves_its_loss(run_cli):
    code, out = run_cli(*SQUAD, "run.steps=2", "run.eval_every=1")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "f1" and {"zero_shot_f1", "final_f1", "final_em"} <= summary.keys()
    evals = rows(out, "eval")
    assert [e["step"] for e in evals] == [0, 1, 2] and all({"f1", "em"} <= e.keys() for e in evals)
    assert "loss: lm" in (out / "config.yaml").read_text()  # task.loss=auto, recorded as what ran
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("model", "loss"), [("tiny-opt", "lm"), ("smollm2-135m", "f1")])
def test_a_generation_run_resumes_bit_for_bit(run_cli, model, loss):
    """F1 on the real model: a tiny random one answers nothing right, so its F1 never differs between the
    two points and it would never move."""
    common = [*SQUAD, f"model.name={model}", f"task.loss={loss}", "optim.eps=1e-2", "optim.lr=1e-4",
              "task.num_train=8", "task.num_eval=2"]
    code, straight = run_cli(*common, "run.steps=4", out="straight")
    assert code == 0
    assert run_cli(*common, "run.steps=2", out="split")[0] == 0
    code, split = run_cli(*common, "run.steps=4", out="split")
    assert code == 0
    a, b = weights(straight), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(straight, "train")] == [r["loss"] for r in rows(split, "train")]
    grads = [json.loads(line)["grads"][0] for line in (straight / "seedlog.jsonl").read_text().splitlines()[1:]]
    assert any(g != 0 for g in grads), "no step moved the weights"


def test_f1_with_lozo_in_the_forward_decodes_every_point_at_once_and_follows_the_in_place_run(run_cli):
    """SmolLM2 (a random model answers nothing right: its F1 never moves). One greedy decoding over the stacked
    row groups scores each point as decoding it alone does: the same F1 losses, so the same projected gradients;
    the weights follow the in-place LOZO run to rounding (the low-rank correction and the pending windows)."""
    common = [*SQUAD, "model.name=smollm2-135m", "task.loss=f1", "optim.eps=1e-2", "optim.lr=1e-4",
              "optim.sampler=lowrank", "optim.rank=2", "optim.nu=2", "task.num_train=8", "task.num_eval=2",
              "run.steps=3"]
    runs = {}
    for perturb in ("in_place", "in_forward"):
        code, runs[perturb] = run_cli(*common, f"optim.perturb={perturb}", out=perturb)
        assert code == 0 and f"perturb: {perturb}" in (runs[perturb] / "config.yaml").read_text()
    grads = {k: [json.loads(line)["grads"] for line in (out / "seedlog.jsonl").read_text().splitlines()[1:]]
             for k, out in runs.items()}
    assert grads["in_place"] == grads["in_forward"] and any(g != [0.0] for g in grads["in_place"])
    a, b = weights(runs["in_place"]), weights(runs["in_forward"])
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-6) for k in a)  # fp32 rounding of weights up to 6.7


@pytest.mark.parametrize(("overrides", "message"), [
    (["task.loss=ce"], "task.loss='ce' does not apply to a generation task"),
    (["task.k_shot=4"], "no classes to draw k examples of"),
    (["model.name=tiny-roberta"], "a masked LM scores label words at a mask"),
    (["task.loss=f1", "optim.estimator=jvp"], "task.loss=f1 has no gradient"),
    (["task.loss=f1", "hybrid.fo_layers=1"], "task.loss=f1 has no gradient"),
    (["task.max_new_tokens=300"], "task.max_new_tokens must be in [1, task.max_length=256)"),
    (["task.name=sst2-demo", "task.loss=f1"], "does not apply to a choice task"),
])
def test_wrong_generation_configs_exit_2_naming_the_problem(run_cli, capsys, overrides, message):
    code, out = run_cli(*SQUAD, "run.steps=1", *overrides)
    assert code == 2 and message in capsys.readouterr().err and not out.exists()


def test_drop_demo_trains_and_evaluates(run_cli):
    code, out = run_cli("task.name=drop-demo", "task.num_train=8", "task.num_eval=5", "task.max_new_tokens=4",
                        "run.batch_size=4", "run.steps=1")
    assert code == 0 and json.loads((out / "summary.json").read_text())["eval_examples"] == 5


def test_zero3_two_ranks_decode_in_step_with_each_other_and_follow_one_process(tiny_overrides, tmp_path,
                                                                              run_zero3_job):
    """5 eval examples over 2 ranks (3 + 2, one repeated to keep the forwards collective) and the F1
    objective, which decodes inside every step: the ranks must join the same number of forwards. Under ZeRO-3
    optim.perturb=auto decodes both points in one perturbed forward (the one process steps in place)."""
    common = [*tiny_overrides, *SQUAD, "task.num_eval=5", "task.loss=f1", "optim.eps=1e-1", "run.steps=2",
              "run.log_every=1", "run.eval_batch_size=2"]
    assert main(["train", *common, f"run.output_dir={tmp_path / 'one'}"]) == 0
    z3 = run_zero3_job(*common)
    summary = json.loads((z3 / "summary.json").read_text())
    assert (summary["runtime"], summary["eval_examples"]) == ("zero3", 5)
    assert "perturb: in_forward" in (z3 / "config.yaml").read_text()
    one, sharded = rows(tmp_path / "one", "eval"), rows(z3, "eval")
    assert [e[m] for e in sharded for m in ("f1", "em")] == pytest.approx([e[m] for e in one for m in ("f1", "em")])
    assert [r["loss"] for r in rows(z3, "train")] == pytest.approx([r["loss"] for r in rows(tmp_path / "one", "train")])
