"""``zo-scale mezo``: MeZO's ``python run.py`` command line (Malladi et al. 2023; princeton-nlp/MeZO,
large_models/run.py), run as a zo-scale config.

MeZO's flags are its ``OurArguments`` (a Trainer ``TrainingArguments`` subclass), read by HfArgumentParser,
and they are read here the way it reads them: ``--flag value`` or ``--flag=value``; a boolean flag alone is
true, or takes a following yes/no, true/false, t/f, y/n, 1/0; a boolean whose default is true also has
``--no_<flag>``; a flag given again overrides its earlier value (argparse keeps the last). So mezo.sh's
``--train_as_classification ... --train_as_classification False`` (Copa, SQuAD, DROP) and the overrides a
user appends through its ``"$@"`` mean what they mean to MeZO. Each flag then

- maps to config keys (:data:`FLAGS`); a flag left out takes MeZO's default (:data:`MEZO_DEFAULTS`, Trainer's
  where MeZO keeps them: a linear schedule, seed 42, no evaluation during training), not zo-scale's;
- or is set aside (:data:`SET_ASIDE`), named with why in one warning line: it changes nothing in a zo-scale
  run (the result file's tag, checkpoint housekeeping, loggers), or zo-scale departs there in a way a MeZO
  user must be told of (it keeps the last weights, not the best dev checkpoint; its prefix starts from
  random values, not from real activations);
- or is refused (exit 2), by the flag as typed: an unknown flag, a value of the wrong type, or a setting
  zo-scale cannot honor (ReCoRD, a reparametrised prefix, epochs instead of --max_steps).

Where a mapped run departs from MeZO's: zo-scale's sampler draws the data (the same protocol and sizes, not
the same sentences), and one seed (run.seed) draws both the data and the directions, where MeZO seeds the
sample with --train_set_seed and the directions with --seed.

    zo-scale mezo --model_name facebook/opt-13b --task_name SST2 --num_train 1000 --num_dev 500 \\
        --num_eval 1000 --trainer zo --learning_rate 1e-7 --zo_eps 1e-3 --max_steps 20000 \\
        --per_device_train_batch_size 16 --train_as_classification --load_float16 --eval_steps 4000
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

from zo_scale.train.config import ConfigError

TASKS = {"SST2": "sst2", "RTE": "rte", "CB": "cb", "BoolQ": "boolq", "WSC": "wsc", "WIC": "wic",
         "MultiRC": "multirc", "Copa": "copa", "SQuAD": "squad", "DROP": "drop"}
SCHEDULES = ("constant", "linear", "cosine")
# HfArgumentParser's string_to_bool
TRUE, FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")
# A mapping reads the flag's value and every flag's value (given or MeZO's default); it returns config
# overrides, or raises ConfigError saying why zo-scale cannot honor the value (the caller names the flag).
Mapping = Callable[[str, dict[str, str]], list[str]]


def _true(value: str) -> bool:
    return value.lower() in TRUE


def _cannot(why: str) -> NoReturn:
    raise ConfigError(f"zo-scale cannot honor it ({why})")


def _key(key: str) -> Mapping:
    return lambda value, _: [f"{key}={value}"]


def _switch(override: str) -> Mapping:
    return lambda value, _: [override] if _true(value) else []


def _zo_or_fo(zo_key: str, fo_key: str) -> Mapping:
    """lr and weight decay are the ZO step's, or under --trainer regular the first-order optimizer's."""
    return lambda value, flags: [f"{fo_key if flags['trainer'] == 'regular' else zo_key}={value}"]


def _task(value: str, _: dict[str, str]) -> list[str]:
    if value == "ReCoRD":
        _cannot("MeZO scores ReCoRD's entity candidates as options; its data is not among zo-scale's tasks")
    if value not in TASKS:
        raise ConfigError(f"unknown task; MeZO's tasks zo-scale runs are {', '.join(TASKS)}")
    return [f"task.name={TASKS[value]}"]


def _train_count(value: str, _: dict[str, str]) -> list[str]:
    if int(value) < 1:  # MeZO's 0 (its default) is the zero-shot / in-context setting: nothing to train on
        _cannot("a run trains on --num_train examples: give at least 1")
    return [f"task.num_train={value}"]


def _trainer(value: str, _: dict[str, str]) -> list[str]:
    if value == "zo":  # MeZO moves the weights in place (+eps, -2 eps, +eps), in fp16 too: not zo-scale's auto
        return ["optim.perturb=in_place"]
    if value == "regular":  # MeZO's first-order fine-tuning: all blocks by backprop, AdamW
        return ["hybrid.fo_layers=-1", "hybrid.fo_optimizer=adamw"]
    if value == "none":
        _cannot("'none' only evaluates, zero-shot or in-context; zo-scale evaluates before training anyway: "
                "pass --trainer zo (or regular)")
    raise ConfigError("MeZO's trainers are none, regular and zo")


def _loss(value: str, flags: dict[str, str]) -> list[str]:
    """MeZO's objective: F1 of the greedy answer with --non_diff, else cross-entropy over the options with
    --train_as_classification, else the LM loss on the answer (teacher forcing)."""
    if _true(flags["non_diff"]):
        return []  # --non_diff sets task.loss
    return [f"task.loss={'ce' if _true(value) else 'lm'}"]


def _strategy(value: str, _: dict[str, str]) -> list[str]:
    if value not in ("steps", "no"):
        _cannot("zo-scale counts steps: 'steps' or 'no'")
    return []  # read by --eval_steps / --save_steps


def _every(key: str, strategy: str) -> Mapping:
    """run.eval_every / run.save_every: Trainer's --*_steps, unless its strategy is 'no' (then 0: at the end)."""
    return lambda value, flags: [f"{key}={0 if flags[strategy] == 'no' else value}"]


def _steps(value: str, _: dict[str, str]) -> list[str]:
    if int(value) <= 0:
        _cannot("Trainer then trains for --num_train_epochs epochs; zo-scale counts steps: give --max_steps")
    return [f"run.steps={value}"]


def _schedule(value: str, _: dict[str, str]) -> list[str]:
    if value not in SCHEDULES:
        _cannot(f"zo-scale's schedules are {', '.join(SCHEDULES)}")
    return [f"optim.schedule={value}"]


def _seed(value: str, flags: dict[str, str]) -> list[str]:
    """run.seed: --train_set_seed when given (mezo.sh's SEED), else --seed; mezo_overrides refuses the two apart."""
    return [] if "train_set_seed" in flags else [f"run.seed={value}"]


def _lora(value: str, flags: dict[str, str]) -> list[str]:
    if _true(value) and _true(flags["prefix_tuning"]):
        _cannot("with --prefix_tuning MeZO adds a prefix and LoRA; zo-scale trains one adapter")
    return ["peft.method=lora"] if _true(value) else []


def _reparam(value: str, flags: dict[str, str]) -> list[str]:
    if _true(flags["prefix_tuning"]) and not _true(value):
        _cannot("MeZO's prefix then goes through a reparametrisation MLP; zo-scale's prefix (peft) has none")
    return []


def _only_option(value: str, _: dict[str, str]) -> list[str]:
    if not _true(value):
        _cannot("MeZO's LM loss then covers the context too; zo-scale's losses read the option's tokens only")
    return []


def _dtype(value: str, flags: dict[str, str]) -> list[str]:
    """--load_bfloat16, unless --load_float16 too: MeZO's run.py loads float16 then."""
    return ["model.dtype=bfloat16"] if _true(value) and not _true(flags["load_float16"]) else []


# MeZO flag -> (how HfArgumentParser reads its value, its mapping)
FLAGS: dict[str, tuple[type, Mapping]] = {
    "model_name": (str, _key("model.name")),
    "task_name": (str, _task),
    "num_train": (int, _train_count),
    "num_dev": (int, _key("task.num_dev")),
    "num_eval": (int, _key("task.num_eval")),
    "max_length": (int, _key("task.max_length")),
    "max_new_tokens": (int, _key("task.max_new_tokens")),
    "non_diff": (bool, _switch("task.loss=f1")),
    "train_as_classification": (bool, _loss),
    "only_train_option": (bool, _only_option),
    "trainer": (str, _trainer),
    "learning_rate": (float, _zo_or_fo("optim.lr", "hybrid.fo_lr")),
    "weight_decay": (float, _zo_or_fo("optim.weight_decay", "hybrid.fo_weight_decay")),
    "zo_eps": (float, _key("optim.eps")),
    "max_steps": (int, _steps),
    "per_device_train_batch_size": (int, _key("run.batch_size")),
    "per_device_eval_batch_size": (int, _key("run.eval_batch_size")),
    "evaluation_strategy": (str, _strategy),
    "eval_steps": (int, _every("run.eval_every", "evaluation_strategy")),
    "save_strategy": (str, _strategy),
    "save_steps": (int, _every("run.save_every", "save_strategy")),
    "logging_steps": (int, _key("run.log_every")),
    "lr_scheduler_type": (str, _schedule),
    "warmup_steps": (int, _key("optim.warmup_steps")),
    "seed": (int, _seed),
    "train_set_seed": (int, _key("run.seed")),
    "output_dir": (str, _key("run.output_dir")),
    "load_float16": (bool, _switch("model.dtype=float16")),
    "load_bfloat16": (bool, _dtype),
    "load_int8": (bool, _switch("model.quantization=int8")),
    "lora": (bool, _lora),
    "lora_r": (int, _key("peft.lora_r")),
    "lora_alpha": (int, _key("peft.lora_alpha")),
    "prefix_tuning": (bool, _switch("peft.method=prefix")),
    "num_prefix": (int, _key("peft.num_virtual_tokens")),
    "no_reparam": (bool, _reparam),
}
ALIASES = {"eval_strategy": "evaluation_strategy"}  # Trainer's newer name
# OurArguments' and TrainingArguments' defaults (transformers 4.28, which MeZO ran), for the flags a
# command leaves out, where zo-scale's differ or a mapping reads them. --eval_steps defaults to
# --logging_steps, as in Trainer (see mezo_overrides).
MEZO_DEFAULTS = {
    "model_name": "facebook/opt-125m", "task_name": "SST2", "trainer": "none", "num_train": "0", "num_eval": "-1",
    "max_length": "2048", "train_as_classification": "false", "non_diff": "false", "only_train_option": "true",
    "learning_rate": "5e-5", "max_steps": "-1", "per_device_train_batch_size": "8",
    "lr_scheduler_type": "linear", "seed": "42", "logging_steps": "500", "evaluation_strategy": "no",
    "save_strategy": "steps", "save_steps": "500", "load_float16": "false", "lora": "false",
    "prefix_tuning": "false", "num_prefix": "5", "no_reparam": "true", "prefix_init_by_real_act": "true",
}


def _always(why: str) -> Callable[[str, dict[str, str]], str | None]:
    return lambda value, flags: why


def _best_checkpoint(value: str, flags: dict[str, str]) -> str | None:
    if not _true(value):
        return None
    if flags["evaluation_strategy"] == "no":
        return "no effect: MeZO then evaluates nothing during training and keeps the last weights, as zo-scale does"
    return ("MeZO evaluates dev every --eval_steps and at the end reloads the checkpoint of best dev loss, "
            "zo-scale evaluates dev as often but keeps the last weights: its final eval can differ")


def _prefix_init(value: str, flags: dict[str, str]) -> str | None:
    if not (_true(value) and _true(flags["prefix_tuning"])):
        return None
    return ("MeZO starts the prefix from the keys and values of random tokens, zo-scale's from N(0, 1) as "
            "MeZO's does with --prefix_init_by_real_act False")


NO_CHECKPOINT_PICKED = "zo-scale picks no checkpoint by a metric: it keeps the last weights"
# Accepted and set aside: flag -> (how HfArgumentParser reads its value, why: None when the value asks for
# nothing zo-scale does not do). Whys hold no ';', which separates them in the warning line.
SET_ASIDE: dict[str, tuple[type, Callable[[str, dict[str, str]], str | None]]] = {
    "load_best_model_at_end": (bool, _best_checkpoint),
    "metric_for_best_model": (str, _always(NO_CHECKPOINT_PICKED)),
    "greater_is_better": (bool, _always(NO_CHECKPOINT_PICKED)),
    "prefix_init_by_real_act": (bool, _prefix_init),
    "save_total_limit": (int, _always("no effect: zo-scale keeps one checkpoint, the latest")),
    "save_model": (bool, _always("no effect: zo-scale always saves the final model")),
    "save_on_interrupt": (bool, _always("no effect: zo-scale's checkpoints are written every --save_steps")),
    "overwrite_output_dir": (bool, _always("zo-scale resumes from a checkpoint in --output_dir, as MeZO does "
                                           "without this flag: give a new --output_dir to start over")),
    "no_eval": (bool, _always("no effect: zo-scale evaluates before and after training either way")),
    "num_train_epochs": (float, _always("no effect: --max_steps overrides it, as in Trainer")),
    "tag": (str, _always("no effect: it names MeZO's result file")),
    "result_file": (str, _always("no effect: MeZO's result file, zo-scale writes summary.json in --output_dir")),
    "report_to": (list, _always("no effect: zo-scale logs metrics.jsonl in --output_dir")),
    "logging_dir": (str, _always("no effect: zo-scale logs in --output_dir")),
    "disable_tqdm": (bool, _always("no effect: a progress bar")),
    "verbose": (bool, _always("no effect: MeZO's printing of examples")),
    "no_auto_device": (bool, _always("no effect: zo-scale places the model itself")),
}
KIND_WORDS = {int: "an integer", float: "a number", bool: "a boolean (yes/no, true/false, t/f, y/n, 1/0)"}


class Given(NamedTuple):
    """A flag as typed: its spelling (``--learning-rate``), its value, and the text to name it by in a
    message (``--learning-rate abc``)."""

    spelling: str
    value: str
    text: str


def _kind(name: str) -> type | None:
    entry = FLAGS.get(name) or SET_ASIDE.get(name)
    return entry[0] if entry else None


def _check_value(given: Given, kind: type | None) -> Given:
    """given, its value checked as HfArgumentParser checks it (argparse's type): else ConfigError naming it."""
    try:
        if kind in (int, float):
            kind(given.value)
        ok = kind is not bool or given.value.lower() in TRUE + FALSE
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{given.text}: expected {KIND_WORDS[kind]}")
    return given


def parse_flags(argv: list[str]) -> dict[str, Given]:
    """MeZO's command line as HfArgumentParser reads it: {flag: the last value given}. ConfigError naming the
    flag for a missing value or one of the wrong type; unknown flags are kept, for mezo_overrides to refuse
    together."""
    flags: dict[str, Given] = {}
    i = 0
    while i < len(argv):
        item = argv[i]
        i += 1
        if not item.startswith("--"):
            raise ConfigError(f"{item!r}: expected a MeZO flag (--name value)")
        spelling, eq, value = item.partition("=")
        name = spelling[2:].replace("-", "_")
        name = ALIASES.get(name, name)
        kind = _kind(name)
        if kind is None and _kind(name[3:]) is bool and MEZO_DEFAULTS.get(name[3:]) == "true":
            if eq:  # --no_<flag> of a boolean whose default is true: argparse's store_false, no value
                raise ConfigError(f"{item}: {spelling} takes no value")
            flags[name[3:]] = Given(spelling, "false", spelling)
            continue
        if eq:
            flags[name] = _check_value(Given(spelling, value, item), kind)
            continue
        values: list[str] = []  # argparse: one value, 0 or 1 for a boolean (nargs='?'), 1 or more for a list
        while i < len(argv) and not argv[i].startswith("--") and (kind is list or not values):
            values.append(argv[i])
            i += 1
        if not values and kind not in (bool, None):  # an unknown switch is refused by name in mezo_overrides
            raise ConfigError(f"{spelling} needs a value")
        text = " ".join([spelling, *values])
        flags[name] = _check_value(Given(spelling, " ".join(values) or "true", text), kind)
    return flags


@dataclass
class MezoRun:
    """A MeZO command line as a zo-scale run: its config overrides, the flags set aside ("--flag (why)"),
    and for each config key the flag that set it, as typed or as MeZO's default."""

    overrides: list[str]
    set_aside: list[str]
    sources: dict[str, str]

    def name_flag(self, error: ConfigError) -> ConfigError:
        """error, led by the flag behind the config key it starts with: the user typed the flag, not the key."""
        key = re.match(r"[a-z]+\.[a-z_]+", str(error))
        source = self.sources.get(key.group()) if key else None
        return ConfigError(f"{source}: {error}") if source else error


def mezo_overrides(argv: list[str]) -> MezoRun:
    """The zo-scale run a MeZO ``run.py`` command line amounts to. ConfigError naming the flag, as typed,
    for one zo-scale cannot honor."""
    given = parse_flags(argv)
    unknown = [g.spelling for name, g in given.items() if _kind(name) is None]
    if unknown:
        raise ConfigError(f"MeZO flags zo-scale cannot honor: {', '.join(unknown)} (it maps "
                          f"{', '.join('--' + f for f in FLAGS)})")
    seed, data_seed = given.get("seed"), given.get("train_set_seed")
    if seed and data_seed and int(seed.value) != int(data_seed.value):  # MeZO's seeds of directions and data
        raise ConfigError(f"{seed.text} with {data_seed.text}: zo-scale draws the data sample and the directions "
                          "from one seed (run.seed); give one of them")
    flags = {**MEZO_DEFAULTS, **{name: g.value for name, g in given.items()}}
    flags.setdefault("eval_steps", flags["logging_steps"])  # Trainer's default for --evaluation_strategy steps
    run = MezoRun([], [], {})
    for name, value in flags.items():
        text = given[name].text if name in given else f"--{name} {value} (MeZO's default)"
        if name in SET_ASIDE:
            why = SET_ASIDE[name][1](value, flags)
            if why:
                run.set_aside.append(f"{given[name].spelling if name in given else text} ({why})")
            continue
        try:
            mapped = FLAGS[name][1](value, flags)
        except ConfigError as e:
            raise ConfigError(f"{text}: {e}") from None
        run.overrides += mapped
        run.sources.update((override.partition("=")[0], text) for override in mapped)
    return run


def describe(overrides: list[str]) -> str:
    """The overrides as the ``zo-scale train`` command they amount to."""
    return "zo-scale train " + " ".join(overrides)
