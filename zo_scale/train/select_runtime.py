"""Pick the runtime for a run from ``dist.*``, the DeepSpeed config and the launcher's environment.

``dist.mode=auto`` (the default) reads what the launcher said: a DeepSpeed config with ZeRO stage 3
means ``zero3``, stage 0-2 ``replicated``; no DeepSpeed config and WORLD_SIZE > 1 (``torchrun``,
``accelerate launch``) ``replicated``; otherwise ``single``. The DeepSpeed config comes from
``dist.deepspeed_config`` (``--deepspeed`` on the command line, as the ``deepspeed`` launcher passes
it) or, under ``accelerate launch`` with a DeepSpeed plugin, from accelerate (its config file, or the
``deepspeed_config`` fields of its YAML).

A DeepSpeed config the HF Trainer runs, runs here (:func:`reconcile_deepspeed_config`): what the Trainer
owns and a ZO run has no use for (the ``optimizer`` and ``scheduler`` sections, ``gradient_clipping``,
fp16 loss scaling, apex ``amp``, ``torch_autocast``) is set aside with one warning saying why; every
``"auto"`` is filled per key, from the run (batch sizes, precision) or DeepSpeed's own default; what
contradicts the run (a batch size, a precision other than ``model.dtype``, gradient accumulation, a
ZeRO stage against ``dist.mode``) is refused, naming the key as the config writes it.
"""

from __future__ import annotations

import copy
import logging
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zo_scale.backends.runtime import Runtime
from zo_scale.models.loading import largest_parameter, model_config, resolve_dtype
from zo_scale.plan.memory import DEEPSPEED_SWAP_BUFFER, GiB, MemoryPlan, RunSettings, nvme_buffer_size, plan_memory
from zo_scale.plan.shapes import ModelShape
from zo_scale.train.build import Fit, PerturbChoice, choose_perturb
from zo_scale.train.checkpoint import latest_checkpoint, load_trainer_state
from zo_scale.train.config import Config, ConfigError, read_json

log = logging.getLogger("zo_scale")

MODES = ("auto", "single", "replicated", "zero3")
DTYPE_SECTIONS = {torch.bfloat16: "bf16", torch.float16: "fp16"}
MIXED_PRECISION = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}  # accelerate's --mixed_precision

# Set aside, with why: keys the HF Trainer fills from its own arguments that mean nothing in a ZO run.
OPTIMIZER_OWNED = "ZO is the optimizer (optim.*, and hybrid.* for the backprop blocks)"
SET_ASIDE = {
    "optimizer": f"{OPTIMIZER_OWNED}; DeepSpeed's would keep an fp32 master copy and write it over the ZO updates",
    "scheduler": "the lr schedule is optim.schedule and optim.warmup_steps",
    "gradient_clipping": "a ZO step has no gradient to clip (and zo-scale clips no backprop gradient)",
    "amp": "apex mixed precision: the weights train in model.dtype",
    "torch_autocast": "the forward runs in model.dtype, without autocast",
}
# fp16's dynamic loss scaling keeps small gradients alive in a backward pass; pure ZO runs none, and a
# hybrid run's backward under DeepSpeed then scales with DeepSpeed's defaults.
LOSS_SCALING = ("loss_scale", "loss_scale_window", "initial_scale_power", "hysteresis", "consecutive_hysteresis",
                "min_loss_scale", "auto_cast")
# "auto" values the run decides: persistence 0 keeps every parameter partitioned (DeepSpeed's default
# would hold the small ones whole on every rank).
RUN_CHOSEN = {"zero_optimization.stage3_param_persistence_threshold": 0,
              "zero_optimization.stage3_model_persistence_threshold": 0}
BUFFER_SIZE_KEY = "zero_optimization.offload_param.buffer_size"  # NVMe swap buffers: sized from the model
# peft.method as the planner names the tuning (prompt, which the perturbed forward cannot run, it has not)
PLANNED_TUNING = {"none": "full", "lora": "lora", "prefix": "prefix"}


def world_size() -> int:
    """Processes in the job, as the launcher's env says (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def ranks_on_this_node() -> int:
    """Processes of the job on this machine: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE;
    without either, every rank (one machine)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size())


def is_main_process() -> bool:
    """Rank 0 of the launcher's job (or no launcher): the process that prints one copy of a message."""
    return os.environ.get("RANK", "0") == "0"


def under_accelerate_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerate_mixed_precision() -> str | None:
    """``mixed_precision`` of the ``accelerate launch`` config (None without accelerate)."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION")


def accelerate_deepspeed_config() -> dict[str, Any]:
    """The DeepSpeed config of ``accelerate launch``: its ``deepspeed_config_file``, read as it is, or the
    config accelerate builds from the ``deepspeed_config`` fields of its YAML (its plugin reads them from
    the launcher's environment). Nothing is filled from the training script here: the precision accelerate
    would set from ``mixed_precision`` is ``model.dtype``'s to decide (:func:`resolve_model_dtype`, also with
    a config file, where accelerate would refuse ``mixed_precision``), and the "auto" values are
    :func:`reconcile_deepspeed_config`'s."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none":
        return read_deepspeed_config(path, "accelerate's deepspeed_config_file")
    from accelerate.utils import DeepSpeedPlugin

    config = dict(DeepSpeedPlugin().deepspeed_config)
    del config["steps_per_print"]  # accelerate's way of silencing DeepSpeed (infinity): not JSON
    if "ACCELERATE_GRADIENT_CLIPPING" not in os.environ:
        config.pop("gradient_clipping", None)  # accelerate's placeholder "auto", not a key the user wrote
    return config


def read_deepspeed_config(path: str | Path, what: str = "dist.deepspeed_config") -> dict[str, Any]:
    """The DeepSpeed JSON at ``path``, read strictly (:func:`~zo_scale.train.config.read_json`); errors name
    ``what``, the setting that gave the path."""
    config = read_json(path, what)
    if not isinstance(config, dict):
        raise ConfigError(f"{what}: {path} must hold a JSON object")
    return config


@dataclass
class DeepSpeedSettings:
    """A DeepSpeed config reconciled with the run: ``config`` is what DeepSpeed gets; ``set_aside`` the keys
    taken out (as the config wrote them) and why; ``filled`` each "auto" key and the value it became."""

    config: dict[str, Any]
    set_aside: dict[str, str] = field(default_factory=dict)
    filled: dict[str, Any] = field(default_factory=dict)
    raised: list[str] = field(default_factory=list)  # values given too small for the model, and why they grew

    def warn(self) -> None:
        """One warning for what was set aside, one for each value raised, one info line for what "auto"
        became (rank 0 only)."""
        if not is_main_process():
            return
        if self.set_aside:
            reasons = "; ".join(f"{key} ({why})" for key, why in self.set_aside.items())
            log.warning("DeepSpeed config: set aside %s", reasons)
        for line in self.raised:
            log.warning("DeepSpeed config: %s", line)
        if self.filled:
            log.info("DeepSpeed config: 'auto' filled as %s", ", ".join(f"{k}={v}" for k, v in self.filled.items()))


def check_deepspeed_config(ds: dict[str, Any], cfg: Config, world: int) -> tuple[str, DeepSpeedSettings]:
    """The runtime's name and ``ds`` reconciled with the run (``model.dtype=auto`` resolved first, see
    :func:`resolve_model_dtype`): its sections' shapes checked first, so that a misshapen config is a
    ConfigError naming the section, not an error from inside the checks."""
    if "bfloat16" in ds and "bf16" not in ds:  # DeepSpeed's older name of the section
        ds = {("bf16" if k == "bfloat16" else k): v for k, v in ds.items()}
    for section in ("zero_optimization", *DTYPE_SECTIONS.values()):
        if section in ds and not isinstance(ds[section], dict):
            raise ConfigError(f"DeepSpeed config: {section} must be a JSON object, got {ds[section]!r}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool):
        raise ConfigError(f"DeepSpeed config: zero_optimization.stage must be an integer (0-3), got {stage!r}")
    resolve_model_dtype(cfg, ds)
    return resolve_mode(cfg, ds, world), reconcile_deepspeed_config(ds, cfg, world)


def resolve_model_dtype(cfg: Config, ds: dict[str, Any] | None) -> None:
    """Set ``model.dtype=auto`` to the precision the launcher asks for: a DeepSpeed config's section
    ``bf16`` or ``fp16`` with ``enabled: true``, else ``accelerate launch``'s ``mixed_precision``, else
    float32. An explicit ``model.dtype`` is kept; accelerate's ``mixed_precision`` (autocast over fp32
    weights in a Trainer script) then only earns a warning, as zo-scale has no autocast. A DeepSpeed
    precision that contradicts an explicit dtype is refused later, by :func:`reconcile_deepspeed_config`."""
    mixed = accelerate_mixed_precision()
    if cfg.model.dtype != "auto":
        asked = MIXED_PRECISION.get(mixed or "no")  # 'no' is accelerate's default: no request to set aside
        if mixed not in (None, "no") and (asked is None or resolve_dtype(asked) != resolve_dtype(cfg.model.dtype)):
            if is_main_process():
                log.warning("accelerate's mixed_precision=%s set aside: model.dtype=%s was given, and zo-scale trains "
                            "the weights in model.dtype (no autocast)", mixed, cfg.model.dtype)
        return
    if mixed is not None and mixed not in MIXED_PRECISION:
        raise ConfigError(f"accelerate's mixed_precision={mixed}: zo-scale trains the weights in float32, bfloat16 or "
                          f"float16; set mixed_precision to one of {sorted(MIXED_PRECISION)} or model.dtype")
    enabled = [s for s in DTYPE_SECTIONS.values() if ds is not None and (ds.get(s) or {}).get("enabled") is True]
    if len(enabled) > 1:
        raise ConfigError("DeepSpeed config: bf16.enabled and fp16.enabled are both true; enable one of them")
    if enabled and mixed not in (None, "no", enabled[0]):
        raise ConfigError(f"DeepSpeed config {enabled[0]}.enabled=true contradicts accelerate's mixed_precision="
                          f"{mixed}; make them agree (or set model.dtype)")
    cfg.model.dtype = {"bf16": "bfloat16", "fp16": "float16"}[enabled[0]] if enabled else MIXED_PRECISION[mixed or "no"]


def reconcile_deepspeed_config(ds: dict[str, Any], cfg: Config, world: int) -> DeepSpeedSettings:
    """``ds`` checked against the run config (``model.dtype`` resolved), with what a ZO run has no use for set
    aside and every "auto" filled; ``ds`` itself is left alone."""
    out = DeepSpeedSettings(copy.deepcopy(ds))
    ds = out.config
    for key, why in SET_ASIDE.items():
        if key in ds:
            if not (key == "gradient_clipping" and ds[key] == 0):  # no clipping: what a ZO run does anyway
                out.set_aside[key] = why
            del ds[key]
    scaling = [k for k in LOSS_SCALING if k in (ds.get("fp16") or {})]
    for key in scaling:
        del ds["fp16"][key]
    if scaling:
        out.set_aside[", ".join(f"fp16.{k}" for k in scaling)] = "loss scaling is for a backward pass; ZO runs forwards"

    expected = {"train_batch_size": cfg.run.batch_size, "train_micro_batch_size_per_gpu": cfg.run.batch_size // world,
                "gradient_accumulation_steps": 1}
    for key, value in expected.items():
        if ds.get(key, "auto") == "auto":
            if ds.get(key) == "auto":
                out.filled[key] = value
            ds[key] = value
        elif ds[key] != value:
            why = ("zo-scale evaluates each rank's rows of run.batch_size in one forward a point"
                   if key == "gradient_accumulation_steps" else
                   f"run.batch_size={cfg.run.batch_size} over {world} rank(s) means {key}={value}")
            raise ConfigError(f"DeepSpeed config {key}={ds[key]} contradicts the run: {why}; set {key} to "
                              f"{value} or \"auto\" (or run.batch_size)")
    model_dtype = resolve_dtype(cfg.model.dtype)
    for dtype, section in DTYPE_SECTIONS.items():
        enabled = ds.setdefault(section, {}).get("enabled", "auto")  # not given: as model.dtype says
        if enabled == "auto":
            ds[section]["enabled"] = enabled = model_dtype == dtype
            out.filled[f"{section}.enabled"] = enabled
        if enabled != (model_dtype == dtype):
            raise ConfigError(f"DeepSpeed config {section}.enabled={enabled} contradicts model.dtype="
                              f"{cfg.model.dtype}; set {section}.enabled to \"auto\" (or model.dtype to match)")
    fit_swap_buffer(out, cfg, world)
    for path, parent, key in _auto_leaves(ds):
        parent[key] = out.filled[path] = _auto_value(path)
    return out


def fit_swap_buffer(settings: DeepSpeedSettings, cfg: Config, world: int) -> None:
    """Size NVMe offload's swap buffers (``zero_optimization.offload_param.buffer_size``, elements) to the
    model, as :func:`~zo_scale.plan.memory.nvme_buffer_size` says (the planner's function): "auto" is filled
    with that size; a number too small for the largest parameter's partition, or none (DeepSpeed's default,
    1e8), is raised to it with one warning, as DeepSpeed would assert at start-up. The largest parameter is
    counted on a meta-device build of ``model.name``'s config. Without NVMe offload nothing changes."""
    offload = (settings.config.get("zero_optimization") or {}).get("offload_param")
    if not isinstance(offload, dict) or offload.get("device") != "nvme":
        return
    given = offload.get("buffer_size")
    if given not in (None, "auto") and not _whole_number(given):
        return  # not a count: DeepSpeed's own check names it (zo_scale.backends.zero3.load_config)
    largest = largest_parameter(cfg.model.name)
    size = nvme_buffer_size(largest, world, None if given in (None, "auto") else int(given))
    if given == "auto":
        offload["buffer_size"] = settings.filled[BUFFER_SIZE_KEY] = size
    elif size > (DEEPSPEED_SWAP_BUFFER if given is None else given):
        offload["buffer_size"] = size
        written = f"{BUFFER_SIZE_KEY} (not given: DeepSpeed's default {DEEPSPEED_SWAP_BUFFER})" if given is None \
            else f"{BUFFER_SIZE_KEY}={given}"
        settings.raised.append(
            f"{written} raised to {size}: NVMe offload swaps each parameter's partition into one buffer, and "
            f"{cfg.model.name}'s largest parameter ({largest:,} elements) over {world} rank(s) has partitions of "
            f"{-(-largest // world):,}; DeepSpeed would assert at start-up that each fits")


def _whole_number(value: Any) -> bool:
    """An int, or a float without a fraction (JSON's 1e8), as DeepSpeed's integer fields take it."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def _auto_leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any], str]]:
    """(dotted path, parent mapping, key) of every value that is exactly "auto"."""
    leaves = []
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves += _auto_leaves(value, f"{prefix}{key}.")
        elif value == "auto":
            leaves.append((f"{prefix}{key}", tree, key))
    return leaves


def _auto_value(path: str) -> Any:
    """What "auto" becomes at ``path`` (the run's choice, else DeepSpeed's own default); ConfigError for a key
    nothing fills."""
    if path in RUN_CHOSEN:
        return RUN_CHOSEN[path]
    section, _, rest = path.partition(".")
    if section == "zero_optimization":
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        default = _model_default(DeepSpeedZeroConfig, rest.split("."))
        if default is not None:
            return default
    raise ConfigError(f"DeepSpeed config: {path} is \"auto\", which neither the run nor DeepSpeed's defaults fill; "
                      "set a value")


def _model_default(model: Any, keys: list[str]) -> bool | int | float | None:
    """The default of the field at ``keys`` in DeepSpeed's pydantic config ``model`` (by name or alias,
    through nested config models, as ``zero_optimization.offload_param.buffer_size``); None if there is
    no plain default."""
    for name, spec in model.model_fields.items():
        if keys[0] not in (name, spec.alias):
            continue
        if len(keys) == 1:  # DeepSpeed's defaults are bools, or int / float subclasses that print with commas
            value = spec.default
            if isinstance(value, bool):
                return value
            return int(value) if isinstance(value, int) else float(value) if isinstance(value, float) else None
        nested = [t for t in (*typing.get_args(spec.annotation), spec.annotation) if hasattr(t, "model_fields")]
        return _model_default(nested[0], keys[1:]) if nested else None
    return None


def resolve_mode(cfg: Config, ds: dict[str, Any] | None, world: int) -> str:
    """The runtime's name; ConfigError when ``dist.mode`` contradicts the config or the launcher."""
    mode = cfg.dist.mode
    if mode not in MODES:
        raise ConfigError(f"dist.mode: unknown {mode!r}; choose one of {MODES}")
    stage = None if ds is None else ds.get("zero_optimization", {}).get("stage", 0)
    if mode == "auto":
        if ds is not None:
            mode = "zero3" if stage == 3 else "replicated"
        else:
            mode = "replicated" if world > 1 else "single"
    if mode == "single" and world > 1:
        raise ConfigError(f"dist.mode=single under a launcher with WORLD_SIZE={world}: every rank would train alone "
                          "and write the same files; use dist.mode=replicated or zero3")
    if mode == "zero3" and stage != 3:
        raise ConfigError("dist.mode=zero3 needs a DeepSpeed config with zero_optimization.stage 3 "
                          f"(dist.deepspeed_config / --deepspeed); got {'none' if ds is None else f'stage {stage}'}")
    if mode == "replicated" and stage == 3:
        raise ConfigError("dist.mode=replicated contradicts the DeepSpeed config's ZeRO stage 3 (partitioned weights)")
    return mode


def rank_device(name: str) -> str:
    """``model.device`` for this rank, as a torch device string; ConfigError naming the key for one it cannot be.

    Under a launcher each rank's process group (NCCL) and DeepSpeed use the rank's own GPU, cuda:$LOCAL_RANK,
    and the model must live there too; one config speaks for every rank. So:

    - 'auto': this rank's GPU where CUDA is available, else 'cpu'; 'cuda': this rank's GPU;
    - 'cuda:N' without a launcher (WORLD_SIZE 1): GPU N, as written;
    - 'cuda:N' under a launcher of several ranks: N = LOCAL_RANK is this rank's GPU; N = 0, the index a
      single-GPU config carries, means each rank's own GPU, cuda:$LOCAL_RANK (:func:`resolve_device` says so
      once); any other N names one GPU for every rank, other than the one each rank's process group uses,
      which cannot run: refused, naming 'cuda' (and CUDA_VISIBLE_DEVICES to choose the GPUs).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local = f"cuda:{local_rank}"
    if name == "auto":
        return local if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(local if name == "cuda" else name)
    except RuntimeError:
        raise ConfigError(f"model.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name}, but CUDA is not available here; use model.device=auto or cpu")
    if device.type != "cuda" or device.index is None or world_size() == 1 or device.index == local_rank:
        return str(device)
    if device.index == 0:
        return local
    raise ConfigError(f"model.device={name} under a launcher of {world_size()} ranks: this rank's process group "
                      f"and DeepSpeed use its own GPU, {local} (LOCAL_RANK), and one index in the config would put "
                      f"every rank on GPU {device.index}; use model.device=cuda (each rank its own GPU), and "
                      "CUDA_VISIBLE_DEVICES to choose which GPUs the launcher's ranks get")


def resolve_device(name: str) -> str:
    """:func:`rank_device`, with one warning (from rank 0) where an explicit 'cuda:0' under a launcher of
    several ranks became each rank's own GPU."""
    device = rank_device(name)
    if name == "cuda:0" and world_size() > 1 and ranks_on_this_node() > 1 and is_main_process():
        log.warning("model.device=cuda:0 under a launcher of %d ranks: each rank trains on its own GPU, "
                    "cuda:$LOCAL_RANK (as model.device=cuda says), the GPU its process group uses", world_size())
    return device


def resolve_perturb(cfg: Config, mode: str, ds: dict[str, Any] | None, world: int) -> None:
    """Set ``optim.perturb=auto`` to the path this run takes, before anything records the config (so that
    config.yaml, the checkpoints and the seed log say in_place or in_forward), and say which and why in one
    info line (rank 0). ``mode``: the runtime's name; ``ds``: its DeepSpeed config (the offload); ``world``:
    its ranks.

    A run that resumes a checkpoint takes the path that checkpoint's run took: the choice weighs the ranks
    and the device's memory, which a resume may change, and the path is part of the trajectory. Otherwise
    :func:`~zo_scale.train.build.choose_perturb` decides, with :func:`stacked_forward_fit` as the planner's
    verdict on the memory."""
    offload = offload_device(ds) if mode == "zero3" else "none"
    if cfg.optim.perturb == "in_place" and offload != "none" and rank_device(cfg.model.device).startswith("cuda"):
        if is_main_process():  # the user's choice, kept: it is correct, only slow
            log.warning("optim.perturb: in_place with offload_param.device %s moves the partitions where they are "
                        "stored: every ZO pass runs on the host's cores over the whole model, not on "
                        "the GPU; optim.perturb: in_forward (or auto) moves each gathered parameter on the GPU",
                        offload)
    if cfg.optim.perturb != "auto":
        return
    resumed = checkpoint_perturb(Path(cfg.run.output_dir) / "checkpoint")
    if resumed is not None:
        choice = PerturbChoice(resumed, "auto: as the run it resumes took it")
    else:
        choice = choose_perturb(cfg, lambda: stacked_forward_fit(cfg, mode, offload, world), mode, offload)
    cfg.optim.perturb = choice.perturb
    if is_main_process():
        log.info("perturb: %s (%s)", choice.perturb, choice.why)


def checkpoint_perturb(directory: Path) -> str | None:
    """``optim.perturb`` of the run whose checkpoint is at ``directory`` (in_place for one written before the
    key existed, the only path then); None without a checkpoint. A damaged one is a CheckpointReadError
    naming the file, as the resume itself would raise."""
    checkpoint = latest_checkpoint(directory)
    if checkpoint is None:
        return None
    taken = (load_trainer_state(checkpoint)["config"].get("optim") or {}).get("perturb", "in_place")
    return taken if taken in ("in_place", "in_forward") else None


def offload_device(ds: dict[str, Any] | None) -> str:
    """Where ZeRO-3 keeps the partitions between forwards: ``zero_optimization.offload_param.device`` 'cpu' or
    'nvme', else 'none' (on the GPU)."""
    offload = ((ds or {}).get("zero_optimization") or {}).get("offload_param") or {}
    device = offload.get("device") if isinstance(offload, dict) else None
    return device if device in ("cpu", "nvme") else "none"


def stacked_forward_fit(cfg: Config, mode: str, offload: str, world: int) -> Fit:
    """The planner's verdict on this run with ``optim.perturb=in_forward`` (:func:`planned_run`): its peak
    against the memory of this rank's device, the GPU's (all of it: the planner counts every term, the CUDA
    context too), or on a CPU the host RAM that the node's ranks share (the planner measures CPU forwards
    too). Where that memory cannot be read, it fits; a run the planner cannot size does not."""
    on_gpu = rank_device(cfg.model.device).startswith("cuda")
    memory = torch.cuda.get_device_properties(rank_device(cfg.model.device)).total_memory if on_gpu else host_memory()
    try:
        plan = planned_run(cfg, mode, offload, world, memory)
    except ValueError as err:
        return Fit(False, f"the planner cannot size it ({err})")
    stacked = sum(b for name, b in plan.gpu.items() if plan.phase.get(name) == "step")
    peak = plan.per_gpu_bytes if on_gpu else plan.node_host_bytes
    where = "the GPU's" if on_gpu else "host RAM's"
    if memory is None:
        return Fit(True, f"stacked step {stacked / GiB:.2f} GiB, peak {peak / GiB:.2f} GiB ({where} size unknown)")
    if plan.problems():
        return Fit(False, f"with the batch stacked the planner's peak is {peak / GiB:.2f} GiB, over {where} "
                          f"{memory / GiB:.2f} GiB")
    return Fit(True, f"stacked step {stacked / GiB:.2f} GiB, peak {peak / GiB:.2f} GiB of {where} "
                     f"{memory / GiB:.2f} GiB")


def planned_run(cfg: Config, mode: str, offload: str, world: int, memory: int | None,
                perturb: str = "in_forward") -> MemoryPlan:
    """The memory plan (:func:`zo_scale.plan.memory.plan_memory`) of this run as ``mode`` with ``offload`` over
    ``world`` ranks, ``memory`` bytes on this rank's device (host RAM on a CPU), taking ``perturb``.

    What the planner is told is what the config says before any data loads: ``run.batch_size`` sequences of
    ``task.max_length`` tokens, one scored token each, as ``zo-scale plan`` takes them. Sequences padded to
    ``task.max_length`` bound the activations from above; a multiple-choice task whose options do not share
    one token stacks a sequence per option, which the planner does not see. ValueError for a run the
    planner cannot size (e.g. an architecture without one list of blocks)."""
    on_gpu = rank_device(cfg.model.device).startswith("cuda")
    per_node = ranks_on_this_node()
    fo_layers = max(cfg.hybrid.fo_layers, 0)
    settings = RunSettings(
        mode=mode, offload=offload, gpus=world, nodes=world // per_node if world % per_node == 0 else 1,
        device="cuda" if on_gpu else "cpu", gpu_memory=memory if on_gpu else None,
        host_memory=None if on_gpu else memory, batch=cfg.run.batch_size, seq=cfg.task.max_length,
        dtype=cfg.model.dtype, tuning=PLANNED_TUNING.get(cfg.peft.method, cfg.peft.method),
        quantization=cfg.model.quantization, lora_r=cfg.peft.lora_r, virtual_tokens=cfg.peft.num_virtual_tokens,
        fo_layers=fo_layers, rule=cfg.optim.rule, master_weights=cfg.optim.master_weights, perturb=perturb,
        estimator=cfg.optim.estimator, queries=cfg.optim.queries)
    return plan_memory(ModelShape.of(model_config(cfg.model.name), fo_layers), settings)


def host_memory() -> int | None:
    """Bytes of RAM this process may use: the machine's, or its cgroup's limit where lower (a container);
    None where neither can be read."""
    try:
        total: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = int(limit) if total is None else min(total, int(limit))
        break
    return total


def make_runtime(cfg: Config) -> Runtime:
    """The runtime the config and the launcher ask for, with its process group up (if any); ``model.dtype``
    and ``optim.perturb`` resolved (:func:`resolve_model_dtype`, :func:`resolve_perturb`). The DeepSpeed config
    it ran with (after :func:`reconcile_deepspeed_config`) is the runtime's ``deepspeed_config``."""
    world = world_size()
    if cfg.dist.deepspeed_config is not None:
        ds = read_deepspeed_config(cfg.dist.deepspeed_config)
    elif under_accelerate_deepspeed():
        ds = accelerate_deepspeed_config()
    else:
        ds = None
    if cfg.run.batch_size % world:
        raise ConfigError(f"run.batch_size={cfg.run.batch_size} does not split evenly over {world} ranks")
    settings = None
    if ds is None:
        resolve_model_dtype(cfg, None)
        mode = resolve_mode(cfg, ds, world)
    else:
        mode, settings = check_deepspeed_config(ds, cfg, world)
        settings.warn()
    resolve_perturb(cfg, mode, None if settings is None else settings.config, world)
    runtime = _start_runtime(cfg, mode, None if settings is None else settings.config)
    if settings is not None:  # under ZeRO-3, as its backend completed it (zero3.load_config)
        runtime.deepspeed_config = getattr(runtime, "config", settings.config)
    return runtime


def _start_runtime(cfg: Config, mode: str, ds: dict[str, Any] | None) -> Runtime:
    if mode == "single":
        return Runtime()
    if cfg.dist.timeout_s <= 0:
        raise ConfigError(f"dist.timeout_s must be > 0, got {cfg.dist.timeout_s}")
    if mode == "replicated":
        from zo_scale.backends.replicated import DistributedRuntime

        return DistributedRuntime(cfg.dist.backend, cfg.dist.timeout_s)
    from zo_scale.backends.zero3 import Zero3Runtime  # imports DeepSpeed

    try:
        return Zero3Runtime(ds or {}, cfg.dist.backend, cfg.dist.timeout_s)
    except ValueError as e:  # load_config's checks of the ZeRO section
        raise ConfigError(str(e)) from None
