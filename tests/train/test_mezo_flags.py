"""``zo-scale mezo``: MeZO's run.py flags read as HfArgumentParser reads them (the last value wins), mapped onto a
config with MeZO's defaults for the flags left out, set aside in one warning line, or refused by the flag as typed."""

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
ZO = ["--trainer", "zo", "--max_steps", "5", "--num_train", "16"]


def config(*flags):
    return load_config(None, mezo_overrides([*ZO, *flags]).overrides)


def test_a_mezo_command_becomes_the_same_run():
    mezo = mezo_overrides(MEZO_SST2)
    cfg = load_config(None, mezo.overrides)
    assert (cfg.model.name, cfg.model.dtype, cfg.task.name, cfg.task.loss) == ("facebook/opt-13b", "float16", "sst2",
                                                                                 "ce")
    assert (cfg.task.num_train, cfg.task.num_dev, cfg.task.num_eval, cfg.task.max_length) == (1000, 500, 1000, 2048)
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.schedule, cfg.optim.rule, cfg.optim.sampler) == (
        1e-7, 1e-3, "constant", "sgd", "normal")
    assert (cfg.run.steps, cfg.run.batch_size, cfg.run.eval_every, cfg.run.save_every, cfg.run.log_every,
            cfg.run.seed, cfg.run.output_dir) == (20000, 16, 4000, 4000, 10, 42, "result/sst2")
    assert [item.split()[0] for item in mezo.set_aside] == ["--save_total_limit", "--save_model"]


def test_flags_left_out_take_mezos_defaults_and_the_other_modes_map_too():
    cfg = config("--lora", "--lora_r", "4")
    assert (cfg.model.name, cfg.optim.lr, cfg.optim.schedule, cfg.run.batch_size, cfg.run.seed) == (
        "facebook/opt-125m", 5e-5, "linear", 8, 42)  # Trainer's defaults, not zo-scale's
    assert cfg.task.loss == "lm" and cfg.task.num_eval == -1 and (cfg.peft.method, cfg.peft.lora_r) == ("lora", 4)
    assert cfg.run.eval_every == 0  # Trainer evaluates nothing during training unless --evaluation_strategy steps
    # MeZO's prefix: 5 tokens, no reparametrisation (its defaults)
    fo = load_config(None, mezo_overrides(["--trainer", "regular", "--max_steps", "5", "--num_train", "16",
                                           "--learning_rate", "1e-5", "--prefix_tuning"]).overrides)
    assert (fo.hybrid.fo_layers, fo.hybrid.fo_lr, fo.peft.method, fo.peft.num_virtual_tokens) == (-1, 1e-5, "prefix", 5)
    assert config("--evaluation_strategy", "steps", "--logging_steps", "7").run.eval_every == 7  # Trainer's fallback


def test_mezos_squad_command_with_the_non_differentiable_objective_maps_to_f1():
    """MeZO's generation runs: SQuAD/DROP, --non_diff (train on F1), --max_new_tokens."""
    cfg = config("--task_name", "SQuAD", "--non_diff", "--max_new_tokens", "30", "--train_as_classification", "False")
    assert (cfg.task.name, cfg.task.loss, cfg.task.max_new_tokens) == ("squad", "f1", 30)
    assert (config("--task_name", "DROP").task.name, config("--task_name", "DROP").task.loss) == ("drop", "lm")


def test_a_flag_given_again_takes_its_last_value_as_in_hfargumentparser():
    assert config("--train_as_classification", "--train_as_classification", "False").task.loss == "lm"
    assert config("--train_as_classification", "no", "--train_as_classification").task.loss == "ce"
    assert config("--learning_rate", "1e-5", "--learning_rate=1e-6").optim.lr == 1e-6
    assert config("--lora=T", "--lora", "0").peft.method == "none"
    # the strategy read with its steps wherever either stands: README's SQuAD line turns evaluation off last
    assert config("--evaluation_strategy", "steps", "--eval_steps", "100", "--eval_strategy", "no").run.eval_every == 0
    assert config("--no_only_train_option", "--only_train_option").task.loss == "lm"  # a complement, then the flag
    assert config("--load_float16", "--load_bfloat16").model.dtype == "float16"  # run.py's precedence
    assert config("--load_float16", "--load_float16", "False", "--load_bfloat16").model.dtype == "bfloat16"


@pytest.mark.parametrize("flags,message", [
    (["--sfc"], "MeZO flags zo-scale cannot honor: --sfc"),
    (["--task_name", "ReCoRD"], "--task_name ReCoRD: zo-scale cannot honor it"),
    (["--task_name", "MNLI"], "--task_name MNLI: unknown task"),
    (["--trainer", "none"], "--trainer none: zo-scale cannot honor it ('none' only evaluates"),
    (["--max_steps", "5"], "--trainer none (MeZO's default): zo-scale cannot honor it"),
    (["--trainer", "zo", "--num_train", "16"], "--max_steps -1 (MeZO's default): zo-scale cannot honor it (Trainer "
     "then trains for"),
    (["--trainer", "zo", "--max_steps", "5"], "--num_train 0 (MeZO's default): zo-scale cannot honor it (a run trains"),
    (["--prefix_tuning", "--no_reparam", "False"], "--no_reparam False: zo-scale cannot honor it (MeZO's prefix"),
    (["--seed", "1", "--train_set_seed", "2"], "--seed 1 with --train_set_seed 2: zo-scale draws the data sample"),
    (["--lr_scheduler_type", "polynomial"], "--lr_scheduler_type polynomial: zo-scale cannot honor it"),
    (["--save_strategy", "epoch"], "--save_strategy epoch: zo-scale cannot honor it"),
    (["--only_train_option", "False"], "--only_train_option False: zo-scale cannot honor it"),
    (["--lora", "maybe"], "--lora maybe: expected a boolean (yes/no"),  # argparse's nargs='?' takes the word
    (["--learning-rate", "abc"], "--learning-rate abc: expected a number"),  # the flag as typed
    (["--num_train=1e3"], "--num_train=1e3: expected an integer"),
    (["--save_total_limit", "all"], "--save_total_limit all: expected an integer"),  # set aside, still checked
    (["--no_only_train_option=1"], "--no_only_train_option takes no value"),
    (["--learning_rate"], "--learning_rate needs a value"),
    (["1e-7"], "'1e-7': expected a MeZO flag"),
])
def test_what_zo_scale_cannot_honor_is_refused_by_the_flag_as_typed(flags, message):
    with pytest.raises(ConfigError) as refused:
        mezo_overrides(flags if flags[0] in ("--trainer", "--max_steps") else [*ZO, *flags])
    assert message in str(refused.value)


def test_what_changes_nothing_or_departs_is_set_aside_in_one_warning_line(capsys):
    flags = [*ZO, "--report_to", "wandb", "tensorboard", "--save_total_limit", "3", "--num_train_epochs", "2",
             "--load_best_model_at_end", "--evaluation_strategy", "steps", "--prefix_tuning", "--tag", "x",
             "--result_file", "r.json"]
    assert main(["mezo", "--dry-run", *flags]) == 0
    warning, = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning.startswith("zo-scale mezo: warning: set aside ")
    said = warning.removeprefix("zo-scale mezo: warning: set aside ").split("; ")  # a reason holds no '; '
    assert sorted(item.split()[0] for item in said) == ["--load_best_model_at_end", "--num_train_epochs",
                                                        "--prefix_init_by_real_act", "--report_to", "--result_file",
                                                        "--save_total_limit", "--tag"]
    for said in ("--report_to (no effect", "--save_total_limit (no effect", "--num_train_epochs (no effect",
                 "--tag (no effect", "--load_best_model_at_end (MeZO evaluates dev every --eval_steps and at the end "
                 "reloads the checkpoint of best dev loss, zo-scale evaluates dev as often but keeps the last weights",
                 "--prefix_init_by_real_act true (MeZO's default) (MeZO starts the prefix from"):
        assert said in warning
    # without evaluation MeZO keeps the last weights too; a switch turned off asks for nothing
    assert "--load_best_model_at_end (no effect" in mezo_overrides([*ZO, "--load_best_model_at_end"]).set_aside[0]
    assert mezo_overrides([*ZO, "--load_best_model_at_end", "False", "--prefix_tuning",
                           "--no_prefix_init_by_real_act"]).set_aside == []


def test_the_command_runs_and_refuses_with_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--model_name", "tiny-llama", "--task_name", "SST2", "--trainer", "zo", "--max_steps", "2",
             "--num_train", "32", "--num_eval", "16", "--learning_rate", "1e-3", "--logging_steps", "1",
             "--output_dir", str(out), "--max_length", "64"]
    assert main(["mezo", *flags]) == 0
    printed = capsys.readouterr().out.splitlines()[0].split()
    assert {"task.loss=lm", "model.name=tiny-llama", "task.name=sst2", "optim.lr=1e-3"} <= set(printed)
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert main(["mezo", "--trainer", "zo", "--max_steps", "2", "--zo_pc"]) == 2
    assert "--zo_pc" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # train keeps refusing flags that are not its own
        main(["train", "--model_name", "x"])


def test_a_config_error_names_the_flag_it_came_from(tmp_path, capsys):
    """Errors zo-scale finds once the run starts name the config key; zo-scale mezo leads them with the flag."""
    flags = [*ZO, "--model_name", "tiny-llama", "--output_dir", str(tmp_path / "run")]
    assert main(["mezo", *flags, "--per_device_train_batch_size", "0"]) == 2
    assert "zo-scale: error: --per_device_train_batch_size 0: run.batch_size must be >= 1" in capsys.readouterr().err
    assert main(["mezo", *flags, "--task_name", "SQuAD", "--train_as_classification"]) == 2
    assert "error: --train_as_classification: task.loss='ce' does not apply to a generation task" in \
        capsys.readouterr().err
