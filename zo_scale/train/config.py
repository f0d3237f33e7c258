"""The run configuration: plain dataclasses, loaded from YAML, overridden by ``section.key=value`` flags.

Strict on purpose (a typo must not silently train with a default): unknown sections or keys, values of
the wrong type, and a key written twice in one mapping (YAML and JSON parsers keep the last one silently)
are errors that name the key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zo_scale.models.sharded_safetensors import parse_size
from zo_scale.strict_files import DuplicateKeyError, parse_json, parse_yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is wrong."""


@dataclass
class ModelConfig:
    name: str = "tiny-llama"  # built-in (smollm2-135m, tiny-opt/llama/mistral), folder, hub id, or random:<arch>
    # auto: the launcher's precision (a DeepSpeed config's enabled bf16/fp16 section, else accelerate's
    # mixed_precision), else float32 | float32 | bfloat16 | float16
    dtype: str = "auto"
    device: str = "auto"  # auto (this rank's GPU, cuda:$LOCAL_RANK, where CUDA is available; else cpu) | cpu | cuda[:N]
    quantization: str = "none"  # none | int8 | nf4 (bitsandbytes; with peft.method=none ZO trains the scales)


@dataclass
class TaskConfig:
    name: str = "sst2-demo"  # built-in task or a task YAML/JSON file
    data_dir: str | None = None  # default: $ZO_SCALE_DATA, else a shared/data folder above the working dir
    source: str = "files"  # files (official files in data_dir) | hub (the Hugging Face hub, through datasets)
    num_train: int = 1000  # MeZO's protocol: train and dev sampled from the train split, eval from the eval split
    num_dev: int = 0
    num_eval: int = 1000
    k_shot: int = 0  # > 0: LM-BFF's few-shot protocol, k train + k dev examples per class (replaces num_train/num_dev)
    max_length: int = 256  # tokens of context + continuation; contexts are cut from the left
    # auto: ce for multiple choice, lm for generation, reward for a reward task | ce: cross-entropy over the options |
    # lm: LM loss on the correct continuation (the answer) | f1: generation only, 1 - token F1 of the greedy answer
    # (not differentiable) | reward: minus the mean reward of the greedy continuations (task.reward)
    loss: str = "auto"
    max_new_tokens: int = 50  # generation tasks: greedy decoding length (MeZO's); every evaluation runs this many
    # task.loss=reward: exact_match | f1 | numeric | countdown | module:function (yours: (prompt, completion, row) ->
    # float); auto: the task's own (countdown: countdown, arithmetic: numeric)
    reward: str = "auto"
    temperature: float = 0.0  # task.loss=reward: training rollouts sampled at it (0: greedy), one seed a step


@dataclass
class OptimConfig:
    rule: str = "sgd"  # sgd | sign | sign-momentum | momentum | adam | lozo-m (sampler=lowrank) | hizoo | ardd
    sampler: str = "normal"  # normal | rademacher | sparse | magnitude (perturb=in_forward) | lowrank | block | lezo
    # central (2 forwards a query) | forward (1 a query, + 1 at theta) | fzoo | hizoo | unbiased | jvp | es (evolution
    # strategies: 2 x queries members, fitness-shaped)
    estimator: str = "central"
    fitness: str = "zscore"  # estimator=es: the population's fitness shaping, zscore | rank (centred ranks) | none
    lr: float = 1e-5
    eps: float = 1e-3
    queries: int = 1
    weight_decay: float = 0.0
    momentum: float = 0.9  # rule=momentum, sign-momentum, lozo-m: beta
    betas: tuple[float, float] = (0.9, 0.999)  # rule=adam
    conservative: bool = False  # ZO-SGD-Cons (rule=sgd)
    lazy: bool = True  # fold each update into the next step's first pass (2 passes a step)
    master_weights: bool = False  # fp32 copy of the (local) weights: no bf16/fp16 drift from the +/- eps round trip
    sparsity: float = 0.75  # sampler=sparse, magnitude: the fraction of elements left unperturbed
    resample_every: int = 1  # sampler=sparse: the mask is redrawn every this many steps
    rank: int = 2  # sampler=lowrank: LOZO's r
    nu: int = 50  # sampler=lowrank: LOZO's nu, V is redrawn every this many steps (the lazy sampling)
    layer_fraction: float = 0.25  # sampler=lezo: the fraction of transformer layers perturbed per step
    hessian_smoothing: float = 1e-6  # rule=hizoo: alpha, the weight of each step's curvature in the Hessian
    ardd_dimension: int = 0  # rule=ardd: the paper's n in its step constants; 0: the number of trained elements
    schedule: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    kernel: str | None = None  # what runs each sweep: auto | compiled | eager; None: $ZO_SCALE_KERNEL, else auto
    # in_place: move the weights, a forward per point | in_forward: one forward, K row groups | auto: the trainer
    # picks (select_runtime.resolve_perturb); zo-scale train's default is auto (Config.optim), a bare OptimConfig's
    # (the HF Trainer's zo settings, MeZO's defaults) in_place
    perturb: str = "in_place"
    # perturb=in_forward, lazy, rule sgd or sign: write the stored weights every this many steps (under offload a step
    # reads the model and writes it once every N steps; the forward lands the N updates due on transient copies)
    pending_steps: int = 1
    scales: str | None = None  # ZO Fine-tuner: a perturbation-scales file (zo-scale learn-scales) scaling z per tensor


@dataclass
class PeftConfig:
    """``peft.*``: train adapters instead of the full weights (:mod:`zo_scale.adapters.peft_tuning`)."""

    method: str = "none"  # none | lora | prefix | prompt
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # keep 0: both forwards of a ZO step must see the same function
    target_modules: list[str] | None = None  # LoRA; None: the architecture's q_proj, v_proj
    num_virtual_tokens: int = 10  # prefix and prompt


@dataclass
class HybridConfig:
    """``hybrid.*``: the last ``fo_layers`` blocks train by backprop (:mod:`zo_scale.train.hybrid`)."""

    fo_layers: int = 0  # k: 0 is pure ZO; -1 (or the number of blocks) is pure FO
    fo_optimizer: str = "adamw"  # adamw | sgd
    fo_lr: float = 1e-5
    fo_weight_decay: float = 0.0
    fo_betas: tuple[float, float] = (0.9, 0.999)  # adamw


@dataclass
class MetaConfig:
    """``meta.*``: ``zo-scale learn-scales``, the meta-training of ZO Fine-tuner's perturbation scales
    (:mod:`zo_scale.core.learned_scales`); optim.eps and optim.lr are the ZO step's it judges the scales by."""

    lr: float = 1e-2  # Adam's lr on the log scales
    base_lr: float = 1e-2  # the first-order trajectory the scales are learned along (SGD); 0: stay at the start
    base_momentum: float = 0.8
    max_grad_norm: float = 1.0
    restart_every: int = 190  # steps between resets of the weights to the start (0: never); the paper's 5 epochs
    output: str | None = None  # the scales file; None: <run.output_dir>/perturbation_scales.json


@dataclass
class RunConfig:
    steps: int = 100
    batch_size: int = 16  # global: split evenly over the data-parallel ranks
    eval_every: int = 0  # 0: only before and after training
    eval_batch_size: int = 32
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    save_shard_size: int | str = "5GB"  # largest safetensors file of the saved model ("5GB", "512MiB" or bytes)
    seed: int = 0
    output_dir: str = "runs/default"
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    tensorboard: bool = False
    trackers: list[str] = field(default_factory=list)  # accelerate's trackers: wandb, mlflow, comet_ml, aim, ...
    progress: bool = True


@dataclass
class DistConfig:
    mode: str = "auto"  # auto | single | replicated | zero3 (auto: from deepspeed_config and the launcher's env)
    deepspeed_config: str | None = None  # DeepSpeed JSON; ZeRO stage 3 -> zero3, stage 0-2 -> replicated
    backend: str | None = None  # torch.distributed backend; default gloo on CPU, nccl on CUDA
    timeout_s: int = 300  # a collective waiting longer fails the rank, so a dead peer cannot hang the job
    check_seeds: bool = False  # all-reduce each step's seed to prove the ranks agree (one more collective a step)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    # perturb=auto: only the trainer resolves it (it weighs the runtime, the precision and the planner's memory)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(perturb="auto"))
    peft: PeftConfig = field(default_factory=PeftConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def as_json(self) -> dict[str, Any]:
        """The config as plain JSON values (tuples become lists), as saved in checkpoints and logs."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """value as the annotated type. Converts only ints to floats and float-looking strings to floats
    (YAML 1.1 reads ``1e-5`` without a dot as a string)."""
    hint = annotation
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool) and type(value) is origin:
            return value
        if origin is list and isinstance(value, list):
            (arg,) = typing.get_args(option)
            return [_coerce(v, arg, key) for v in value]
        if origin is tuple and isinstance(value, list | tuple):
            args = typing.get_args(option)
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    raise ConfigError(f"{key}: expected {hint}, got {value!r} ({type(value).__name__})")


def _apply(config: Config, section: str, key: str, value: Any) -> None:
    sections = {f.name: f for f in dataclasses.fields(config)}
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r}; sections are {sorted(sections)}")
    apply_key(getattr(config, section), section, key, value)


def apply_key(target: Any, section: str, key: str, value: Any) -> None:
    """Set ``key`` of one section's dataclass to ``value``, coerced to its type; ConfigError naming
    ``section.key`` for an unknown key or a wrong type."""
    hints = typing.get_type_hints(type(target))
    if key not in hints:
        raise ConfigError(f"unknown key {section}.{key}; {section} has {sorted(hints)}")
    setattr(target, key, _coerce(value, hints[key], f"{section}.{key}"))


def read_yaml(path: str | Path) -> Any:
    """The YAML file at ``path`` (safe types only); ConfigError naming the file for invalid YAML or a
    key given twice in one mapping."""
    text = Path(path).read_text(encoding="utf-8-sig")  # an editor's BOM is not part of the YAML
    try:
        return parse_yaml(text, str(path))
    except DuplicateKeyError as e:
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def read_json(path: str | Path, what: str) -> Any:
    """The JSON file at ``path``; ConfigError naming ``what`` (the key that named the file) and the file for
    a missing file, invalid JSON, or a key given twice in one object."""
    try:
        return parse_json(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file {path}") from None
    except DuplicateKeyError as e:
        raise ConfigError(f"{what}: {path}: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: {path} is not valid JSON: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (sections model/task/optim/peft/hybrid/run/dist), then
    ``section.key=value`` overrides (values parsed as YAML scalars: 1e-5, true, [0.9, 0.99])."""
    config = Config()
    if path is not None:
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping of keys")
            for key, value in values.items():
                _apply(config, section, key, value)
    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.partition(".")
        if not (sep and dot and section and key):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"override {name}={text!r}: the value is not a YAML scalar or list ({problem}); "
                              "quote it in the shell as a YAML string, e.g. 'run.output_dir=\"a: b\"'") from None
        _apply(config, section, key, value)
    try:
        parse_size(config.run.save_shard_size)
    except ValueError as e:
        raise ConfigError(f"run.save_shard_size: {e}") from None
    return config
