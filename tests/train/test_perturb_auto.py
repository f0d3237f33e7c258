"""``optim.perturb=auto``, zo-scale train's default: the perturbed forward where it pays (ZeRO-3, offload,
half-precision weights without a master copy) and runs and fits, else the in-place step; one info line says
which and why, the run records what it took, and a resume takes what the run it resumes took."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from zo_scale.models import load_model
from zo_scale.plan.memory import GiB
from zo_scale.train import select_runtime
from zo_scale.train.build import Fit, choose_perturb
from zo_scale.train.config import ConfigError, OptimConfig, load_config
from zo_scale.train.mezo_flags import mezo_overrides
from zo_scale.train.select_runtime import planned_run, resolve_perturb

pytestmark = pytest.mark.usefixtures("one_thread")

ZERO3 = {"zero_optimization": {"stage": 3}}
ZERO3_CPU_OFFLOAD = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}


def resolved(tmp_path, *overrides, mode="single", ds=None, world=1):
    """optim.perturb after resolve_perturb, for a config of tiny-llama with ``overrides`` (no checkpoint)."""
    cfg = load_config(None, ["model.name=tiny-llama", "model.dtype=float32", f"run.output_dir={tmp_path / 'run'}",
                             *overrides])
    resolve_perturb(cfg, mode, ds, world)
    return cfg.optim.perturb


def never_asked() -> Fit:
    raise AssertionError("the fit was asked for where nothing depends on it")


def test_auto_is_the_trainers_default_and_a_bare_optim_section_stays_in_place():
    assert load_config(None, []).optim.perturb == "auto"
    assert OptimConfig().perturb == "in_place"  # the HF Trainer's zo settings: MeZO's defaults


def test_float32_on_one_process_takes_the_in_place_step_without_asking_the_planner(tmp_path, caplog):
    cfg = load_config(None, ["model.dtype=float32"])
    choice = choose_perturb(cfg, never_asked)
    assert choice.perturb == "in_place" and "no ZeRO-3" in choice.why
    with caplog.at_level("INFO", logger="zo_scale"):
        assert resolved(tmp_path) == "in_place"
    assert [r.message for r in caplog.records if r.message.startswith("perturb:")] == [
        "perturb: in_place (auto: float32 weights, no ZeRO-3: in place loses nothing and stacks no batch)"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_take_the_perturbed_forward(tmp_path, caplog, dtype):
    with caplog.at_level("INFO", logger="zo_scale"):
        assert resolved(tmp_path, f"model.dtype={dtype}") == "in_forward"
    (line,) = [r.message for r in caplog.records if r.message.startswith("perturb:")]
    assert f"{dtype} weights without optim.master_weights stay put" in line
    assert "of host RAM's" in line  # the planner's numbers, on this CPU against the host RAM


def test_master_weights_keep_half_precision_in_place(tmp_path):
    assert resolved(tmp_path, "model.dtype=bfloat16", "optim.master_weights=true") == "in_place"


@pytest.mark.parametrize(("ds", "gain"), [(ZERO3, "ZeRO-3 gathers the model once a step instead of twice"),
                                          (ZERO3_CPU_OFFLOAD, "uploads the CPU-offloaded model")])
def test_zero3_takes_the_perturbed_forward_in_float32_too(tmp_path, caplog, ds, gain):
    with caplog.at_level("INFO", logger="zo_scale"):
        assert resolved(tmp_path, mode="zero3", ds=ds, world=2) == "in_forward"
    assert gain in caplog.text


@pytest.mark.parametrize(("overrides", "mode", "reason"), [
    (["optim.estimator=jvp"], "single", "optim.estimator=jvp evaluates no perturbed points"),
    (["optim.rule=hizoo", "optim.estimator=hizoo"], "zero3", "optim.rule=hizoo under ZeRO-3"),
    (["model.quantization=int8"], "single", "ZO on quantized scales"),
    (["peft.method=prompt"], "single", "peft.method=prompt"),
    (["task.loss=f1"], "single", "along dense directions the perturbed forward copies every parameter at each"),
])
def test_what_the_perturbed_forward_cannot_run_takes_the_in_place_step(overrides, mode, reason):
    cfg = load_config(None, ["model.dtype=bfloat16", *overrides])
    choice = choose_perturb(cfg, never_asked, mode)
    assert choice.perturb == "in_place" and reason in choice.why


def test_f1_along_low_rank_directions_or_under_zero3_decodes_the_row_groups_together():
    cfg = load_config(None, ["model.dtype=float32", "task.loss=f1", "optim.sampler=lowrank"])
    choice = choose_perturb(cfg, lambda: Fit(True, "fits"))
    assert choice.perturb == "in_forward" and "decodes the K row groups together" in choice.why
    cfg = load_config(None, ["model.dtype=float32", "task.loss=f1"])
    assert choose_perturb(cfg, lambda: Fit(True, "fits"), "zero3").perturb == "in_forward"


def test_pending_steps_take_the_perturbed_forward_or_say_why_they_cannot():
    cfg = load_config(None, ["optim.pending_steps=4"])  # float32, one process: in place otherwise
    choice = choose_perturb(cfg, never_asked)
    assert choice.perturb == "in_forward" and "optim.pending_steps=4" in choice.why
    cfg = load_config(None, ["optim.pending_steps=4", "peft.method=prompt"])
    with pytest.raises(ConfigError, match="optim.pending_steps=4 lands the updates inside the perturbed forward, "
                                          "which cannot run here: peft.method=prompt"):
        choose_perturb(cfg, never_asked)


def test_hizoo_takes_the_perturbed_forward_on_one_process():
    cfg = load_config(None, ["model.dtype=bfloat16", "optim.rule=hizoo", "optim.estimator=hizoo"])
    assert choose_perturb(cfg, lambda: Fit(True, "fits")).perturb == "in_forward"


def test_sparse_mezo_takes_the_perturbed_forward_or_says_why_it_cannot():
    cfg = load_config(None, ["optim.sampler=magnitude"])  # float32: nothing else would ask for it
    assert choose_perturb(cfg, never_asked).perturb == "in_forward"
    cfg = load_config(None, ["optim.sampler=magnitude", "optim.estimator=jvp"])
    with pytest.raises(ConfigError, match="needs optim.perturb=in_forward, which cannot run here: optim.estimator"):
        choose_perturb(cfg, never_asked)


def test_pure_backprop_has_no_zo_step_to_place():
    cfg = load_config(None, ["model.dtype=bfloat16", "hybrid.fo_layers=-1"])
    assert choose_perturb(cfg, never_asked).perturb == "in_place"


def test_a_stacked_batch_that_does_not_fit_takes_the_in_place_step_and_says_why(tmp_path, monkeypatch, caplog):
    """The host RAM set between the planner's in-place and in-forward peaks: the stacked batch is what
    does not fit."""
    overrides = ["model.dtype=bfloat16", "run.batch_size=64", "task.max_length=512"]
    cfg = load_config(None, ["model.name=tiny-llama", *overrides])
    in_place = planned_run(cfg, "single", "none", 1, None, perturb="in_place").node_host_bytes
    in_forward = planned_run(cfg, "single", "none", 1, None).node_host_bytes
    assert in_forward > in_place + 2**20
    monkeypatch.setattr(select_runtime, "host_memory", lambda: (in_place + in_forward) // 2)
    with caplog.at_level("INFO", logger="zo_scale"):
        assert resolved(tmp_path, *overrides) == "in_place"
    (line,) = [r.message for r in caplog.records if r.message.startswith("perturb:")]
    assert line.startswith("perturb: in_place (auto: in_forward would pay (bfloat16 weights")
    assert f"the planner's peak is {in_forward / GiB:.2f} GiB, over host RAM's" in line


@pytest.mark.parametrize(("gpu_gib", "taken"), [(80, "in_forward"), (0.25, "in_place")])
def test_on_a_gpu_the_budget_is_the_gpus_memory(tmp_path, monkeypatch, caplog, gpu_gib, taken):
    """CUDA mocked: the fit test reads the memory of this rank's GPU, cuda:$LOCAL_RANK."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []

    def properties(device):
        asked.append(str(device))
        return SimpleNamespace(total_memory=int(gpu_gib * GiB))

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    with caplog.at_level("INFO", logger="zo_scale"):
        assert resolved(tmp_path, "model.dtype=bfloat16", "model.device=cuda") == taken
    assert set(asked) == {"cuda:1"} and f"the GPU's {gpu_gib:.2f} GiB" in caplog.text


def test_a_resume_takes_the_path_of_the_run_it_resumes(tmp_path, caplog):
    """The choice weighs ranks and memory, which a resume may change: the checkpoint's path wins."""
    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    state = {"step": 2, "world_size": 2, "config": {"optim": {"perturb": "in_forward"}}}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with caplog.at_level("INFO", logger="zo_scale"):
        assert resolved(tmp_path) == "in_forward"  # float32 on one process would take in_place afresh
    assert "perturb: in_forward (auto: as the run it resumes took it)" in caplog.text
    state["config"] = {"optim": {}}  # written before optim.perturb existed: in place was the only path
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    assert resolved(tmp_path, "model.dtype=bfloat16") == "in_place"


def test_an_explicit_path_is_kept(tmp_path):
    assert resolved(tmp_path, "model.dtype=bfloat16", "optim.perturb=in_place") == "in_place"
    assert resolved(tmp_path, "optim.perturb=in_forward") == "in_forward"


def test_mezo_command_lines_keep_mezos_in_place_step():
    """MeZO moves the weights in place, in float16 too (--load_float16): zo-scale mezo says so explicitly."""
    flags = ["--trainer", "zo", "--load_float16", "--num_train", "16", "--max_steps", "10"]
    cfg = load_config(None, mezo_overrides(flags).overrides)
    assert (cfg.model.dtype, cfg.optim.perturb) == ("float16", "in_place")


def test_a_bfloat16_run_logs_its_choice_once_records_it_and_leaves_the_weights_at_lr_0(run_cli, caplog):
    """End to end: with the perturbed forward, bf16 weights do not drift over 4 steps at lr 0 (in place they
    would: every round trip rounds them), and config.yaml and the seed log say in_forward."""
    with caplog.at_level("INFO", logger="zo_scale"):
        code, out = run_cli("run.steps=4", "optim.lr=0", "model.dtype=bfloat16")
    assert code == 0
    lines = [r.message for r in caplog.records if r.message.startswith("perturb:")]
    assert len(lines) == 1 and lines[0].startswith("perturb: in_forward (auto: bfloat16 weights")
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["perturb"] == "in_forward"
    header = json.loads((out / "seedlog.jsonl").read_text().splitlines()[0])["header"]
    assert header["optim"]["perturb"] == "in_forward"
    start = load_model("tiny-llama", dtype="bfloat16")[0].state_dict()
    saved = load_file(out / "checkpoint" / "model" / "model.safetensors")
    assert all(torch.equal(saved[k], start[k]) for k in saved)


def test_a_run_resumed_with_auto_continues_on_the_path_its_checkpoint_took(run_cli, caplog):
    """A float32 run that asked for in_forward resumes under the default (auto, which would pick in_place on
    its own): not refused as another trajectory, and still in_forward."""
    code, out = run_cli("run.steps=2", "optim.perturb=in_forward")
    assert code == 0
    with caplog.at_level("INFO", logger="zo_scale"):
        code, out = run_cli("run.steps=4")
    assert code == 0 and "resuming from" in caplog.text
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["perturb"] == "in_forward"
