"""Reward tasks end to end: generated puzzles, evolution strategies on the reward of greedy continuations, the
population's rewards in metrics.jsonl, the population decoded at once in the perturbed forward, and the errors a
bad reward or config gets."""

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from zo_scale.tasks import get_task, sample_splits
from zo_scale.tasks.rewards import RewardExample

ARITHMETIC = ["model.name=smollm2-135m", "task.name=arithmetic", "task.num_train=8", "task.num_eval=4",
              "task.max_new_tokens=6", "run.batch_size=4", "run.eval_batch_size=4", "run.log_every=1",
              "optim.estimator=es", "optim.queries=2", "optim.eps=1e-2", "optim.lr=1e-4"]


def rows(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_generated_tasks_are_fixed_pools_sampled_by_the_run_seed():
    task = get_task("countdown")
    pool = task.examples("train")
    assert len(pool) == 2000 and pool == task.examples("train") and isinstance(pool[0], RewardExample)
    assert len(task.examples("eval")) == 500 and task.reward == "countdown" and task.kind == "reward"
    train, _, evaluate = sample_splits(task, 16, 0, 8, seed=1)
    assert len(train) == 16 and len(evaluate) == 8 and train != sample_splits(task, 16, 0, 8, seed=2)[0]
    assert get_task("arithmetic").reward == "numeric"


def test_es_decodes_its_population_at_once_in_the_forward_and_logs_its_rewards(run_cli):
    """SmolLM2 on generated arithmetic, 2 pairs (a population of 4) a step along LOZO's directions. In place each
    member decodes alone; in the forward the 4 are row groups of one greedy decoding: the same rewards, so the
    same shaped projected gradients, and the weights to fp32 rounding. Each train row logs the mean, best and
    worst member's mean reward, the summary the zero-shot and final reward, the plot the population."""
    common = [*ARITHMETIC, "optim.sampler=lowrank", "optim.nu=2", "run.steps=2"]
    runs = {}
    for perturb in ("in_place", "in_forward"):
        code, runs[perturb] = run_cli(*common, f"optim.perturb={perturb}", out=perturb)
        config = (runs[perturb] / "config.yaml").read_text()
        assert code == 0 and f"perturb: {perturb}" in config and "estimator: es" in config and "loss: reward" in config
    grads = {k: [json.loads(line)["grads"] for line in (out / "seedlog.jsonl").read_text().splitlines()[1:]]
             for k, out in runs.items()}
    assert grads["in_place"] == grads["in_forward"]
    train = {k: rows(out, "train") for k, out in runs.items()}
    assert [r["reward_mean"] for r in train["in_place"]] == [r["reward_mean"] for r in train["in_forward"]]
    assert len(train["in_place"]) == 2
    for row in train["in_place"]:
        assert 0 <= row["reward_min"] <= row["reward_mean"] <= row["reward_max"] <= 1
        assert row["loss"] == pytest.approx(-row["reward_mean"])  # the loss at theta: the population's mean
    a, b = (load_file(out / "checkpoint" / "model" / "model.safetensors") for out in runs.values())
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-6) for k in a)
    summary = json.loads((runs["in_place"] / "summary.json").read_text())
    assert summary["metric"] == "reward" and 0 <= summary["zero_shot_reward"] <= 1 and "final_reward" in summary
    assert (runs["in_place"] / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failing_reward_ends_the_run_with_exit_2_naming_it_and_the_row(run_cli, tmp_path, monkeypatch, capsys):
    """The user's reward raises on training rows only: the zero-shot evaluation passes, the first step stops
    before it updates anything (no checkpoint was written, none is damaged)."""
    (tmp_path / "reward_fails_on_train.py").write_text(textwrap.dedent("""
        def score(prompt, completion, row):
            if "train" in row["id"]:
                raise KeyError("expected")
            return 1.0
    """))
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(*ARITHMETIC, "model.name=tiny-llama", "run.steps=2", "task.reward=reward_fails_on_train:score")
    assert code == 2
    err = capsys.readouterr().err
    assert "reward 'reward_fails_on_train:score' raised KeyError on row 'arithmetic-train-" in err
    assert not (out / "checkpoint").exists()


def test_your_own_reward_task_from_a_prompts_file_and_a_reward_beside_it(run_cli, tmp_path, capsys):
    """A task file with ``reward`` instead of labels: the template renders each row's prompt, and the reward
    module next to the task file (not on the path, not in the working directory) reads the row's fields."""
    folder = tmp_path / "my_task"
    folder.mkdir()
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"q": f"Say {w}.", "word": w}) + "\n"
                                                  for w in ("yes", "no", "maybe", "never", "always", "soon")))
    (folder / "word_reward_beside_task.py").write_text(textwrap.dedent("""
        def said(prompt, completion, row):
            return float(row["word"] in completion)
    """))
    (folder / "task.yaml").write_text(textwrap.dedent("""
        name: say-the-word
        train_file: prompts.jsonl
        eval_file: prompts.jsonl
        template: "Instruction: {q}\\nResponse:"
        reward: word_reward_beside_task:said
    """))
    code, out = run_cli(*ARITHMETIC, "model.name=tiny-llama", f"task.name={folder / 'task.yaml'}", "task.num_train=4",
                        "task.num_eval=2", "run.steps=1")
    assert code == 0
    (row,) = rows(out, "train")
    assert {"reward_mean", "reward_max", "reward_min"} <= row.keys()
    (folder / "bad.yaml").write_text((folder / "task.yaml").read_text() + "label_field: word\n")
    code, _ = run_cli(*ARITHMETIC, "model.name=tiny-llama", f"task.name={folder / 'bad.yaml'}", out="bad")
    assert code == 2 and "unknown key(s) ['label_field'] for a reward task" in capsys.readouterr().err


def test_a_sampled_es_run_resumes_bit_for_bit(run_cli, tmp_path, monkeypatch):
    """Rollouts sampled at temperature 1 with one seed a step (from run.seed and the step): a run resumed from
    its checkpoint of step 2 ends with the straight run's weights and losses, bit for bit. The reward (the
    number of distinct characters generated) moves with the samples, so the steps do move the weights."""
    (tmp_path / "distinct_characters.py").write_text(textwrap.dedent("""
        def reward(prompt, completion, row):
            return len(set(completion)) / 10
    """))
    monkeypatch.chdir(tmp_path)
    common = [*ARITHMETIC, "model.name=tiny-llama", "task.reward=distinct_characters:reward", "task.temperature=1",
              "run.save_every=2", "optim.lr=1e-3", "optim.eps=1e-1"]
    code, straight = run_cli(*common, "run.steps=4", out="straight")
    assert code == 0
    assert run_cli(*common, "run.steps=2", out="split")[0] == 0
    code, split = run_cli(*common, "run.steps=4", out="split")
    assert code == 0
    a, b = (load_file(out / "checkpoint" / "model" / "model.safetensors") for out in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(straight, "train")] == [r["loss"] for r in rows(split, "train")]
    grads = [json.loads(line)["grads"] for line in (straight / "seedlog.jsonl").read_text().splitlines()[1:]]
    assert any(g != [0.0, 0.0] for g in grads), "no step moved the weights"


@pytest.mark.parametrize(("overrides", "message"), [
    (["task.name=sst2-demo", "task.reward=numeric"], "task.reward='numeric' applies to the continuations of a reward"),
    (["task.name=sst2-demo", "task.temperature=1"], "task.temperature=1.0 applies to the continuations of a reward"),
    (["task.temperature=-1"], "task.temperature must be >= 0"),
    (["task.loss=lm"], "task.loss='lm' does not apply to a reward task"),
    (["optim.estimator=jvp"], "task.loss=reward has no gradient: it cannot train by optim.estimator=jvp"),
    (["task.reward=nowhere:f"], "cannot import module 'nowhere'"),
    (["optim.fitness=softmax"], "unknown fitness shaping 'softmax'"),
])
def test_wrong_reward_configs_exit_2_naming_the_problem(run_cli, capsys, overrides, message):
    code, out = run_cli(*ARITHMETIC, "model.name=tiny-llama", "run.steps=1", *overrides)
    assert code == 2 and message in capsys.readouterr().err and not out.exists()
