"""``zo-scale mezo``: MeZO's run.py flags onto a config, MeZO's defaults for the flags left out, refusals by name."""

import json

import pytest

from zo_scale.train.cli import main
from zo_scale.train.config import ConfigError, load_config
from zo_scale.train.mezo_flags import mezo_overrides

# MeZO's README command for OPT-13B on SST-2 (full parameters, fp16)
MEZO_SST2 = ("--model_name facebook/opt-13b --task_name SST2 --output_dir result/sst2 --num_train 1000 --num_dev 500 "
             "--num_eval 1000 --trainer zo --learning_rate 1e-7 --zo_eps 1e-3 --max_steps 20000 "
             "--per_device_train_batch_size 16 --lr_scheduler_type constant --load_float16 --train_as_classification "
             "--eval_steps 4000 --save_steps 4000 --evaluation_strategy steps --save_strategy steps "
             "--save_total_limit 1 --logging_steps 10 --save_model").split()


def test_a_mezo_command_becomes_the_same_run():
    overrides, notes = mezo_overrides(MEZO_SST2)
    cfg = load_config(None, overrides)
    assert (cfg.model.name, cfg.model.dtype, cfg.task.name, cfg.task.loss) == ("facebook/opt-13b", "float16", "sst2",
                                                                                 "ce")
    assert (cfg.task.num_train, cfg.task.num_dev, cfg.task.num_eval, cfg.task.max_length) == (1000, 500, 1000, 2048)
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.schedule, cfg.optim.rule, cfg.optim.sampler) == (
        1e-7, 1e-3, "constant", "sgd", "normal")
    assert (cfg.run.steps, cfg.run.batch_size, cfg.run.eval_every, cfg.run.save_every, cfg.run.log_every,
            cfg.run.seed, cfg.run.output_dir) == (20000, 16, 4000, 4000, 10, 42, "result/sst2")
    assert notes == ["--save_model: no effect here (zo-scale always saves the model)"]


def test_flags_left_out_take_mezos_defaults_and_the_other_modes_map_too():
    cfg = load_config(None, mezo_overrides(["--trainer", "zo", "--max_steps", "5", "--lora", "--lora_r", "4"])[0])
    assert (cfg.model.name, cfg.optim.lr, cfg.optim.schedule, cfg.run.batch_size, cfg.run.seed) == (
        "facebook/opt-125m", 5e-5, "linear", 8, 42)  # Trainer's defaults, not zo-scale's
    assert cfg.task.loss == "lm" and cfg.task.num_eval == -1 and (cfg.peft.method, cfg.peft.lora_r) == ("lora", 4)
    fo = load_config(None, mezo_overrides(["--trainer", "regular", "--max_steps", "5", "--learning_rate", "1e-5",
                                           "--prefix_tuning", "--no_reparam", "--num_prefix", "3"])[0])
    assert (fo.hybrid.fo_layers, fo.hybrid.fo_lr, fo.peft.method, fo.peft.num_virtual_tokens) == (-1, 1e-5, "prefix", 3)


def test_mezos_squad_command_with_the_non_differentiable_objective_maps_to_f1():
    """MeZO's generation runs: SQuAD/DROP, --non_diff (train on F1), --max_new_tokens."""
    flags = ["--task_name", "SQuAD", "--trainer", "zo", "--max_steps", "5", "--non_diff", "--max_new_tokens", "30"]
    cfg = load_config(None, mezo_overrides(flags)[0])
    assert (cfg.task.name, cfg.task.loss, cfg.task.max_new_tokens) == ("squad", "f1", 30)
    cfg = load_config(None, mezo_overrides(["--task_name", "DROP", "--trainer", "zo", "--max_steps", "5"])[0])
    assert (cfg.task.name, cfg.task.loss) == ("drop", "lm")


@pytest.mark.parametrize("flags,message", [
    (["--sfc"], "MeZO flags zo-scale cannot honor: --sfc"),
    (["--task_name", "ReCoRD"], "--task_name ReCoRD: not in zo-scale"),
    (["--task_name", "MNLI"], "--task_name MNLI: unknown"),
    (["--trainer", "none"], "only evaluates"),
    (["--prefix_tuning"], "add --no_reparam"),
    (["--seed", "1", "--train_set_seed", "2"], "one seed"),
    (["--save_total_limit", "3"], "--save_total_limit 3: zo-scale cannot honor it"),
    (["--lr_scheduler_type", "polynomial"], "--lr_scheduler_type polynomial"),
    (["--lora", "maybe"], "'maybe': expected a MeZO flag"),  # a switch: the word after it is not its value
    (["--learning_rate"], "--learning_rate needs a value"),
])
def test_what_zo_scale_cannot_honor_is_refused_by_name(flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        mezo_overrides(["--trainer", "zo", "--max_steps", "5", *flags] if "--trainer" not in flags else
                       ["--max_steps", "5", *flags])


def test_the_command_runs_and_refuses_with_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["mezo", "--model_name", "tiny-llama", "--task_name", "SST2", "--trainer", "zo", "--max_steps", "2",
                 "--num_train", "32", "--num_eval", "16", "--learning_rate", "1e-3", "--logging_steps", "1",
                 "--output_dir", str(out), "--max_length", "64"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "zo-scale train task.loss=lm model.name=tiny-llama task.name=sst2" in printed
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert main(["mezo", "--trainer", "zo", "--max_steps", "2", "--zo_pc"]) == 2
    assert "--zo_pc" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # train keeps refusing flags that are not its own
        main(["train", "--model_name", "x"])
