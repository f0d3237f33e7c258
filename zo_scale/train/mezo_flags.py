"""``zo-scale mezo``: MeZO's ``run.py`` command line (Malladi et al. 2023, large_models/run.py), mapped onto
a zo-scale config.

MeZO's flags are its ``OurArguments`` (a ``TrainingArguments`` subclass); each one zo-scale can honor maps
to a config key (:data:`FLAGS`), the few that change nothing are accepted and named (:data:`NO_EFFECT`),
and every other flag, or a value zo-scale cannot honor, is refused by name (exit 2): a MeZO command
either runs the same experiment or says why not. A flag left out takes MeZO's default
(:data:`MEZO_DEFAULTS`: Trainer's, e.g. a linear schedule, seed 42), not zo-scale's. The mapped config
is printed before the run. Data samples are drawn by zo-scale's sampler: the same protocol and sizes,
not the same sentences as MeZO's.

    zo-scale mezo --model_name facebook/opt-13b --task_name SST2 --num_train 1000 --num_dev 500 \\
        --num_eval 1000 --trainer zo --learning_rate 1e-7 --zo_eps 1e-3 --max_steps 20000 \\
        --per_device_train_batch_size 16 --train_as_classification --load_float16 --eval_steps 4000
"""

from __future__ import annotations

from collections.abc import Callable

from zo_scale.train.config import ConfigError

TASKS = {"SST2": "sst2", "RTE": "rte", "CB": "cb", "BoolQ": "boolq", "WSC": "wsc", "WIC": "wic",
         "MultiRC": "multirc", "Copa": "copa", "SQuAD": "squad", "DROP": "drop"}
SCHEDULES = ("constant", "linear", "cosine")


def _task(value: str) -> list[str]:
    if value == "ReCoRD":
        raise ConfigError("--task_name ReCoRD: not in zo-scale (MeZO scores its entity candidates as options; "
                          "its data is not among zo-scale's tasks)")
    if value not in TASKS:
        raise ConfigError(f"--task_name {value}: unknown; MeZO's tasks zo-scale runs are {', '.join(TASKS)}")
    return [f"task.name={TASKS[value]}"]


def _trainer(value: str) -> list[str]:
    if value == "zo":
        return []
    if value == "regular":  # MeZO's first-order fine-tuning: all blocks by backprop, AdamW
        return ["hybrid.fo_layers=-1", "hybrid.fo_optimizer=adamw"]
    raise ConfigError(f"--trainer {value}: zo-scale trains (zo, regular); zero-shot / in-context only ('none') "
                      "is its evaluation before training")


def _strategy(key: str) -> Callable[[str], list[str]]:
    def strategy(value: str) -> list[str]:
        if value == "steps":
            return []
        if value == "no":
            return [f"run.{key}=0"]
        raise ConfigError(f"--{key.replace('_every', '')}_strategy {value}: zo-scale counts steps ('steps' or 'no')")
    return strategy


def _schedule(value: str) -> list[str]:
    if value not in SCHEDULES:
        raise ConfigError(f"--lr_scheduler_type {value}: zo-scale has {', '.join(SCHEDULES)}")
    return [f"optim.schedule={value}"]


def _key(key: str) -> Callable[[str], list[str]]:
    return lambda value: [f"{key}={value}"]


def _switch(*overrides: str) -> Callable[[str], list[str]]:
    return lambda value: list(overrides) if _true(value) else []


def _true(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"expected a boolean (true/false), got {value!r}")


# MeZO flag -> (is a boolean switch, its zo-scale overrides). lr and weight decay go to the FO keys
# under --trainer regular (see mezo_overrides).
FLAGS: dict[str, tuple[bool, Callable[[str], list[str]]]] = {
    "model_name": (False, _key("model.name")),
    "task_name": (False, _task),
    "num_train": (False, _key("task.num_train")),
    "num_dev": (False, _key("task.num_dev")),
    "num_eval": (False, _key("task.num_eval")),
    "max_length": (False, _key("task.max_length")),
    "max_new_tokens": (False, _key("task.max_new_tokens")),
    "non_diff": (True, _switch("task.loss=f1")),  # MeZO's non-differentiable objective: F1 of the greedy answer
    "trainer": (False, _trainer),
    "train_as_classification": (True, _switch("task.loss=ce")),
    "only_train_option": (True, lambda v: [] if _true(v) else _refuse("only_train_option", v, "the LM loss is on "
                                                                      "the option's tokens only")),
    "learning_rate": (False, _key("optim.lr")),
    "weight_decay": (False, _key("optim.weight_decay")),
    "zo_eps": (False, _key("optim.eps")),
    "zo_sample": (False, _key("optim.queries")),
    "max_steps": (False, _key("run.steps")),
    "per_device_train_batch_size": (False, _key("run.batch_size")),
    "per_device_eval_batch_size": (False, _key("run.eval_batch_size")),
    "eval_steps": (False, _key("run.eval_every")),
    "save_steps": (False, _key("run.save_every")),
    "logging_steps": (False, _key("run.log_every")),
    "evaluation_strategy": (False, _strategy("eval_every")),
    "eval_strategy": (False, _strategy("eval_every")),
    "save_strategy": (False, _strategy("save_every")),
    "lr_scheduler_type": (False, _schedule),
    "warmup_steps": (False, _key("optim.warmup_steps")),
    "seed": (False, _key("run.seed")),
    "output_dir": (False, _key("run.output_dir")),
    "load_float16": (True, _switch("model.dtype=float16")),
    "load_bfloat16": (True, _switch("model.dtype=bfloat16")),
    "load_int8": (True, _switch("model.quantization=int8")),
    "lora": (True, _switch("peft.method=lora")),
    "lora_r": (False, _key("peft.lora_r")),
    "lora_alpha": (False, _key("peft.lora_alpha")),
    "prefix_tuning": (True, _switch("peft.method=prefix")),
    "num_prefix": (False, _key("peft.num_virtual_tokens")),
    "no_reparam": (True, _switch()),  # zo-scale's prefix tuning has no reparametrisation (see mezo_overrides)
    "save_total_limit": (False, lambda v: [] if v == "1" else _refuse("save_total_limit", v, "it keeps one "
                                                                      "checkpoint, the latest: --save_total_limit 1")),
}
# TrainingArguments' and OurArguments' defaults, for the flags a command leaves out (zo-scale's differ)
MEZO_DEFAULTS = {"model_name": "facebook/opt-125m", "task_name": "SST2", "num_eval": "-1", "learning_rate": "5e-5",
                 "per_device_train_batch_size": "8", "seed": "42", "lr_scheduler_type": "linear", "max_length": "2048",
                 "zo_eps": "1e-3", "logging_steps": "500", "eval_steps": "500", "save_steps": "500"}
# accepted, and changing nothing in a zo-scale run (said so when given): flag -> (is a boolean switch, why)
NO_EFFECT: dict[str, tuple[bool, str]] = {
    "tag": (False, "it names MeZO's result file"),
    "result_file": (False, "MeZO's result file; zo-scale writes summary.json"),
    "report_to": (False, "zo-scale logs metrics.jsonl, and TensorBoard with run.tensorboard=true"),
    "verbose": (True, "MeZO's example printing"),
    "no_auto_device": (True, "zo-scale places the model itself (model.device)"),
    "save_model": (True, "zo-scale always saves the model"),
    "overwrite_output_dir": (True, "a run in an existing run.output_dir resumes from its checkpoint"),
}


def _refuse(flag: str, value: str, why: str) -> list[str]:
    raise ConfigError(f"--{flag} {value}: zo-scale cannot honor it ({why})")


def parse_flags(argv: list[str]) -> dict[str, str]:
    """MeZO's ``--flag value`` / ``--flag=value`` / bare boolean ``--flag`` into {flag: value}."""
    flags: dict[str, str] = {}
    i = 0
    while i < len(argv):
        item = argv[i]
        if not item.startswith("--"):
            raise ConfigError(f"{item!r}: expected a MeZO flag (--name value)")
        name, eq, value = item[2:].partition("=")
        name = name.replace("-", "_")
        switch = (FLAGS.get(name) or NO_EFFECT.get(name) or (False,))[0]
        if not eq:
            following = argv[i + 1] if i + 1 < len(argv) else None
            takes_value = following is not None and not following.startswith("--")
            if switch and not (takes_value and following.lower() in ("true", "false", "1", "0", "yes", "no")):
                value = "true"
            elif takes_value:
                value, i = following, i + 1
            elif name in FLAGS or name in NO_EFFECT:
                raise ConfigError(f"--{name} needs a value")
            else:
                value = "true"  # an unknown switch: refused by name below
        if name in flags:
            raise ConfigError(f"--{name} is given twice")
        flags[name] = value
        i += 1
    return flags


def mezo_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """zo-scale overrides for a MeZO command line, and notes on the flags that change nothing. ConfigError
    naming the flag for one zo-scale cannot honor."""
    flags = parse_flags(argv)
    if "train_set_seed" in flags:  # MeZO's seed of the data sample; zo-scale has one seed for data and directions
        seed = flags.pop("train_set_seed")
        if flags.setdefault("seed", seed) != seed:
            raise ConfigError("--train_set_seed differs from --seed: zo-scale samples the data and the directions "
                              "from one seed (run.seed)")
    unknown = [f for f in flags if f not in FLAGS and f not in NO_EFFECT]
    if unknown:
        raise ConfigError(f"MeZO flags zo-scale cannot honor: {', '.join('--' + f for f in unknown)} (it maps "
                          f"{', '.join('--' + f for f in FLAGS)})")
    if "max_steps" not in flags:
        raise ConfigError("--max_steps: MeZO's commands give it (without it Trainer counts epochs); zo-scale counts "
                          "steps")
    flags = {**MEZO_DEFAULTS, **flags}
    if flags.get("trainer", "none") == "none":
        raise ConfigError("--trainer: MeZO's default 'none' only evaluates; pass --trainer zo (or regular)")
    if _true(flags.get("prefix_tuning", "false")) and not _true(flags.get("no_reparam", "false")):
        raise ConfigError("--prefix_tuning: MeZO reparametrises the prefix through an MLP unless --no_reparam; "
                          "zo-scale's prefix tuning (peft) has none: add --no_reparam to run it")
    regular = flags.get("trainer") == "regular"
    overrides: list[str] = [] if _true(flags.get("train_as_classification", "false")) else ["task.loss=lm"]
    for flag, value in flags.items():
        if flag in NO_EFFECT:
            continue
        try:
            mapped = FLAGS[flag][1](value)
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith("--") else f"--{flag}: {e}") from None
        if regular:  # first-order: lr and decay are the FO optimizer's
            mapped = [m.replace("optim.lr=", "hybrid.fo_lr=").replace("optim.weight_decay=",
                                                                      "hybrid.fo_weight_decay=") for m in mapped]
        overrides += mapped
    notes = [f"--{f}: no effect here ({NO_EFFECT[f][1]})" for f in flags if f in NO_EFFECT]
    return overrides, notes


def describe(overrides: list[str]) -> str:
    """The overrides as the ``zo-scale train`` command they amount to."""
    return "zo-scale train " + " ".join(overrides)

