"""End-to-end runs of ``zo-scale train`` on a tiny model: outputs, resume, replay, and bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file


def weights(run_dir):
    return load_file(run_dir / "checkpoint" / "model" / "model.safetensors")


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "seedlog.jsonl").read_text().splitlines()[1:]]


def test_a_run_writes_metrics_plot_checkpoint_and_seed_log(run_cli):
    code, out = run_cli("run.steps=4", "run.eval_every=2")
    assert code == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [0, 2, 4] and all(0.0 <= m["accuracy"] <= 1.0 for m in evals)
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [2, 4]
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] == evals[-1]["accuracy"] and summary["zero_shot_accuracy"] == evals[0]["accuracy"]
    assert [r["step"] for r in records(out)] == [0, 1, 2, 3]
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.old").exists()
    (peak,) = summary["peak_memory_bytes"]  # one rank: its high-water marks
    assert peak["host_rss"] > 50 * 2**20 and peak["device"] is None


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_exits_2(run_cli, monkeypatch, capsys):
    import errno

    import transformers.modeling_utils

    from zo_scale.train.checkpoint import load_trainer_state

    real, saves = transformers.modeling_utils.safe_save_file, []

    def fill_the_disk_on_the_second_save(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fill_the_disk_on_the_second_save)
    code, out = run_cli("run.steps=4", "run.save_every=2", out="full")
    assert code == 2
    message = capsys.readouterr().err
    assert "writing the checkpoint of step 4" in message and "No space left on device" in message
    assert "step 2) is intact" in message and "run the same command" in message
    assert load_trainer_state(out / "checkpoint")["step"] == 2 and not (out / "checkpoint.tmp").exists()
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real)
    code, out = run_cli("run.steps=4", "run.save_every=2", out="full")  # space is back: it resumes and ends
    assert code == 0 and load_trainer_state(out / "checkpoint")["step"] == 4
    code, straight = run_cli("run.steps=4", out="straight")
    assert all(torch.equal(weights(out)[k], v) for k, v in weights(straight).items())


def test_a_random_architecture_trains_from_its_config_file(run_cli, tmp_path):
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 32,
              "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
              "vocab_size": 320}
    (tmp_path / "arch.json").write_text(json.dumps(config))
    code, out = run_cli("run.steps=2", f"model.name=random:{tmp_path / 'arch.json'}")
    assert code == 0
    saved = json.loads((out / "checkpoint" / "model" / "config.json").read_text())
    assert (saved["model_type"], saved["num_hidden_layers"], saved["vocab_size"]) == ("mistral", 3, 320)
    assert weights(out)["model.embed_tokens.weight"].shape == (320, 32)


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_resumed_run_equals_the_uninterrupted_run_bitwise(run_cli, rule):
    code, straight = run_cli("run.steps=6", f"optim.rule={rule}", out="straight")
    assert code == 0
    code, split = run_cli("run.steps=3", f"optim.rule={rule}", out="split")
    assert code == 0
    code, split = run_cli("run.steps=6", f"optim.rule={rule}", out="split")  # resumes from its step-3 checkpoint
    assert code == 0
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(straight) == records(split)


def test_replay_rebuilds_the_fine_tuned_weights_bitwise(run_cli, tmp_path):
    from zo_scale.train.cli import main

    code, out = run_cli("run.steps=5", "optim.rule=momentum")
    assert code == 0
    assert main(["replay", str(out / "seedlog.jsonl"), str(tmp_path / "replayed")]) == 0
    trained, replayed = weights(out), load_file(tmp_path / "replayed" / "model.safetensors")
    assert all(torch.equal(trained[k], replayed[k]) for k in trained)
    base = load_file(tmp_path / "replayed" / "model.safetensors")
    assert base.keys() == trained.keys()


def test_compiled_and_eager_sweeps_train_the_same_weights(run_cli):
    code, eager = run_cli("run.steps=3", "optim.rule=adam", "optim.kernel=eager", out="eager")
    assert code == 0
    code, fused = run_cli("run.steps=3", "optim.rule=adam", "optim.kernel=compiled", out="fused")
    assert code == 0
    a, b = weights(eager), weights(fused)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert records(eager) == records(fused)


def test_seed_log_records_the_sweep_arithmetic_and_an_old_log_is_flagged(tmp_path, caplog):
    from zo_scale.core.sweep import ARITHMETIC_VERSION
    from zo_scale.train import seedlog

    log = tmp_path / "seedlog.jsonl"
    seedlog.write_header(log, {"run": {"seed": 1}})
    assert json.loads(log.read_text().splitlines()[0])["sweep_arithmetic"] == ARITHMETIC_VERSION
    assert seedlog.read_header(log) == {"run": {"seed": 1}} and "sweep arithmetic" not in caplog.text
    log.write_text(json.dumps({"header": {"run": {"seed": 1}}}) + "\n")  # written before the version existed
    assert seedlog.read_header(log) == {"run": {"seed": 1}}
    assert "sweep arithmetic version 1" in caplog.text and "not bit for bit" in caplog.text
    lozo = {"optim": {"sampler": "lowrank"}}
    log.write_text(json.dumps({"header": lozo, "sweep_arithmetic": 3}) + "\n")  # LOZO's steps changed in 4
    with pytest.raises(ValueError, match="LOZO directions take other steps since version 4"):
        seedlog.read_header(log)


def test_resume_refuses_a_changed_trajectory(run_cli, capsys):
    assert run_cli("run.steps=2")[0] == 0
    code, _ = run_cli("run.steps=4", "optim.lr=0.5")
    assert code == 2
    assert "optim.lr" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.name=no-such-model", "no-such-model"),
        ("task.name=no-such-task", "no-such-task"),
        ("optim.rule=lion", "unknown 'lion'"),
        ("task.loss=mse", "task.loss"),
        ("run.batch_size=0", "run.batch_size"),
        ("optim.kernel=fast", "kernel='fast' is not a sweep kernel mode"),
        ("model.device=gpu0", "model.device: 'gpu0' is not a device"),
        ("task.num_eval=0", "task.num_eval=0: the run evaluates before and after training"),
        ("run.save_every=-1", "run.save_every must be >= 0"),
        ("run.eval_every=-5", "run.eval_every must be >= 0"),
        ("run.save_shard_size=lots", "run.save_shard_size: cannot read 'lots' as a size"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(run_cli, capsys, override, message, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast: no hub here
    code, out = run_cli("run.steps=2", override)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_data_row_without_its_label_is_named(run_cli, capsys, tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "good film", "label": "pos"}\n{"text": "bad film"}\n')
    (tmp_path / "task.yaml").write_text(
        "name: mine\ntrain_file: rows.jsonl\neval_file: rows.jsonl\ntemplate: '{text} It was'\n"
        "label_field: label\nlabel_words: {pos: ' great', neg: ' terrible'}\n"
    )
    code, out = run_cli("run.steps=2", f"task.name={tmp_path / 'task.yaml'}", "task.num_train=1", "task.num_eval=1")
    assert code == 2
    err = capsys.readouterr().err
    assert "rows.jsonl" in err and "label" in err
    assert not out.exists()


def test_persistent_non_finite_loss_stops_with_a_clear_error(run_cli, capsys, monkeypatch):
    from zo_scale.train import objectives

    monkeypatch.setattr(objectives, "batch_loss", lambda scores, labels, loss: torch.tensor(float("nan")))
    code, out = run_cli("run.steps=6", "run.max_nonfinite=2", "run.save_every=1")
    assert code == 2
    err = capsys.readouterr().err
    assert "non-finite for 2 steps in a row" in err and "step 1) is intact" in err
    assert "model.dtype=float32" not in err  # it is fp32 already
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())  # the last checkpoint is intact
    assert state["step"] == 1 and state["nonfinite_in_a_row"] == 1
    code, _ = run_cli("run.steps=6", "run.max_nonfinite=2", "model.dtype=bfloat16", "run.output_dir=" + str(out) + "2")
    err = capsys.readouterr().err
    assert code == 2 and "no checkpoint was written yet" in err and "or use model.dtype=float32" in err


def test_a_batch_larger_than_the_training_set_is_flagged(run_cli, caplog):
    code, _ = run_cli("run.steps=1", "task.num_train=4", "run.batch_size=8")
    assert code == 0
    assert "run.batch_size=8 is larger than the 4 training examples" in caplog.text


def test_label_words_that_are_special_tokens_are_refused(run_cli, capsys, tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "good film", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    (tmp_path / "task.yaml").write_text(
        "name: mine\ntrain_file: rows.jsonl\neval_file: rows.jsonl\ntemplate: '{text} It was'\n"
        "label_field: label\nlabel_words: {pos: ' great', neg: '</s>'}\n"
    )
    code, out = run_cli("run.steps=2", f"task.name={tmp_path / 'task.yaml'}", "task.num_train=1", "task.num_eval=1",
                        "task.num_dev=0")
    assert code == 2
    assert "' </s>' contains the tokenizer's special token(s) ['</s>']" in capsys.readouterr().err
    assert not out.exists()


def test_a_custom_tasks_missing_file_says_where_it_is_looked_for(run_cli, capsys, tmp_path):
    (tmp_path / "task.yaml").write_text(
        "name: mine\ntrain_file: nowhere.jsonl\neval_file: nowhere.jsonl\ntemplate: '{text} It was'\n"
        "label_field: label\nlabel_words: {pos: ' great', neg: ' bad'}\n"
    )
    code, _ = run_cli("run.steps=2", f"task.name={tmp_path / 'task.yaml'}")
    err = capsys.readouterr().err
    assert code == 2 and "nowhere.jsonl not found" in err and "relative to the folder of its definition" in err


def test_bf16_run_trains_and_checkpoints_in_bf16(run_cli):
    code, out = run_cli("run.steps=3", "model.dtype=bfloat16")
    assert code == 0
    assert all(t.dtype == torch.bfloat16 for t in weights(out).values())
    assert all(r["grads"] is not None for r in records(out))


@pytest.mark.slow
def test_the_real_smollm2_model_fine_tunes_end_to_end(run_cli):
    code, out = run_cli("model.name=smollm2-135m", "optim.lr=1e-5", "run.steps=2", "task.num_train=16",
                        "task.num_eval=32")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["zero_shot_accuracy"] <= 1.0 and 0.0 <= summary["final_accuracy"] <= 1.0
    assert "model.embed_tokens.weight" in weights(out)
    assert all(r["grads"] is not None and abs(r["grads"][0]) > 0 for r in records(out))


def test_a_jvp_run_trains_through_sdpa_attention_and_its_derivatives_match_finite_differences(run_cli):
    """Forward-mode AD has no rule for the fused SDPA kernels: the jvp pass runs attention as its math
    decomposition. Its exact grad L . z agrees with the central differences of the same step (the same z),
    extrapolated to eps = 0: D(eps) = g + c eps^2 + O(eps^4), so (4 D(eps/2) - D(eps)) / 3 = g + O(eps^4).
    One fp32 difference is either biased (eps 1e-3: 2% here) or rounded (eps 1e-4: 0.5%, varying by CPU)."""
    code, jvp = run_cli("run.steps=2", "optim.estimator=jvp", out="jvp")
    assert code == 0
    central = {}
    for eps in ("1e-3", "5e-4"):
        code, out = run_cli("run.steps=1", f"optim.eps={eps}", out=f"central-{eps}")
        assert code == 0
        central[eps] = records(out)[0]["grads"][0]
    extrapolated = (4 * central["5e-4"] - central["1e-3"]) / 3
    assert records(jvp)[0]["grads"][0] == pytest.approx(extrapolated, rel=2e-3)
    assert records(jvp)[0]["grads"][0] != pytest.approx(central["1e-3"], rel=2e-3)  # the bias it removes


@pytest.mark.parametrize("guard", ["optim.master_weights=true", "optim.perturb=in_forward"])
def test_fp16_weights_stay_put_at_lr_0_with_the_master_copy_or_in_forward(run_cli, guard):
    """MeZO's issue 42: in fp16 the weights do not return after +/- eps and the loss collapses. With the
    master copy (or the weights never moving, in_forward) 5 steps at lr 0 leave them bit for bit."""
    from zo_scale.models import load_model

    start = {k: v.clone() for k, v in load_model("tiny-llama", dtype="float16")[0].state_dict().items()}
    code, out = run_cli("run.steps=5", "optim.lr=0", "model.dtype=float16", guard)
    assert code == 0
    saved = weights(out)
    assert all(torch.equal(saved[k], start[k]) for k in saved)
    losses = [json.loads(line)["loss"] for line in (out / "seedlog.jsonl").read_text().splitlines()[1:]]
    assert len(losses) == 5 and all(0.3 < loss < 3 for loss in losses)  # each batch's CE near log 2: no collapse


@pytest.mark.parametrize("damage", ['{"step": 2, "conf', '{"step": 2}', "\xff\xfe"])
def test_a_damaged_checkpoint_is_refused_by_name(run_cli, capsys, damage):
    code, out = run_cli("run.steps=2")
    assert code == 0
    state = out / "checkpoint" / "trainer_state.json"
    state.write_bytes(damage.encode("latin-1"))
    code, _ = run_cli("run.steps=4")
    assert code == 2
    assert str(state) in capsys.readouterr().err


@pytest.mark.parametrize(("damage", "message"), [
    (lambda lines: lines[:-1] + [lines[-1][: len(lines[-1]) // 2]], "line 4: not a whole step record"),
    (lambda lines: lines[:2] + lines[3:], "line 3: step 2 where step 1 belongs"),
    (lambda lines: ["{not json"] + lines[1:], "not a zo-scale seed log"),
])
def test_a_damaged_seed_log_is_refused_by_line(run_cli, tmp_path, capsys, damage, message):
    from zo_scale.train.cli import main

    code, out = run_cli("run.steps=3")
    assert code == 0
    log = out / "seedlog.jsonl"
    log.write_text("\n".join(damage(log.read_text().splitlines())) + "\n")
    assert main(["replay", str(log), str(tmp_path / "replayed")]) == 2
    assert message in capsys.readouterr().err
