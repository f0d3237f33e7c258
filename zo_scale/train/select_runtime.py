"""Pick the runtime for a run from ``dist.*``, the DeepSpeed config and the launcher's environment.

``dist.mode=auto`` (the default) reads what the launcher said: a DeepSpeed config with ZeRO stage 3
means ``zero3``, stage 0-2 ``replicated``; no DeepSpeed config and WORLD_SIZE > 1 (``torchrun``,
``accelerate launch``) ``replicated``; otherwise ``single``. The DeepSpeed config comes from
``dist.deepspeed_config`` (``--deepspeed`` on the command line, as the ``deepspeed`` launcher passes
it) or, under ``accelerate launch`` with a DeepSpeed plugin, from accelerate.

A DeepSpeed config that contradicts the run is refused before any model loads: an ``optimizer`` or
``scheduler`` section (ZO is the optimizer; DeepSpeed's would overwrite the ZO updates with its fp32
master copy), precision other than ``model.dtype``, batch sizes other than ``run.batch_size`` split
over the ranks, gradient accumulation, or a ZeRO stage that contradicts ``dist.mode``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from zo_scale.backends.runtime import Runtime
from zo_scale.models.loading import resolve_dtype
from zo_scale.train.config import Config, ConfigError

MODES = ("auto", "single", "replicated", "zero3")
DTYPE_SECTIONS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def world_size() -> int:
    """Processes in the job, as the launcher's env says (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def under_accelerate_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerate_deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed config of ``accelerate launch`` (its config file or its deepspeed_config fields).

    Builds the ``Accelerator``, which brings up the process group: with the ``gloo`` backend on CPU
    (accelerate would otherwise ask DeepSpeed for its CPU default, which needs oneCCL).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from zo_scale.backends.replicated import default_backend
    from zo_scale.backends.zero3 import skip_shm_op_build

    skip_shm_op_build()
    backend = cfg.dist.backend or default_backend()
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend=backend)])
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        raise ConfigError("ACCELERATE_USE_DEEPSPEED is set but accelerate has no DeepSpeed plugin")
    return dict(plugin.deepspeed_config)


def read_deepspeed_config(path: str | Path) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"dist.deepspeed_config: no such file {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"dist.deepspeed_config: {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"dist.deepspeed_config: {path} must hold a JSON object")
    return config


def check_deepspeed_config(ds: dict[str, Any], cfg: Config, world: int) -> tuple[str, dict[str, Any]]:
    """The runtime's name and ``ds`` reconciled with the run: its sections' shapes checked first, so that
    a misshapen config is a ConfigError naming the section, not an error from inside the checks."""
    for section in ("zero_optimization", *DTYPE_SECTIONS.values()):
        if section in ds and not isinstance(ds[section], dict):
            raise ConfigError(f"DeepSpeed config: {section} must be a JSON object, got {json.dumps(ds[section])}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool):
        raise ConfigError(f"DeepSpeed config: zero_optimization.stage must be an integer (0-3), got {stage!r}")
    return resolve_mode(cfg, ds, world), reconcile_deepspeed_config(ds, cfg, world)


def reconcile_deepspeed_config(ds: dict[str, Any], cfg: Config, world: int) -> dict[str, Any]:
    """``ds`` checked against the run config, with accelerate's "auto" values filled in; a new dict."""
    ds = json.loads(json.dumps(ds))
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"DeepSpeed config has a {section!r} section: ZO runs without a DeepSpeed {section} "
                              "(its fp32 master copy would overwrite the ZO updates); remove it, set optim.*")
    expected = {"train_batch_size": cfg.run.batch_size, "train_micro_batch_size_per_gpu": cfg.run.batch_size // world,
                "gradient_accumulation_steps": 1}
    for key, value in expected.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(f"DeepSpeed config {key}={ds[key]} contradicts the run: run.batch_size="
                              f"{cfg.run.batch_size} over {world} ranks means {key}={value}")
    model_dtype = resolve_dtype(cfg.model.dtype)
    for dtype, section in DTYPE_SECTIONS.items():
        enabled = ds.get(section, {}).get("enabled", False)
        if enabled == "auto":
            ds[section]["enabled"] = enabled = model_dtype == dtype
        if enabled != (model_dtype == dtype):
            raise ConfigError(f"DeepSpeed config {section}.enabled={enabled} contradicts model.dtype={cfg.model.dtype}")
    if "auto" in json.dumps(ds):
        raise ConfigError("DeepSpeed config: some values are still 'auto' after filling the batch sizes and precision; "
                          "set them explicitly")
    return ds


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


def resolve_device(name: str) -> str:
    """``model.device`` for this rank: 'auto' is this rank's GPU (``cuda:$LOCAL_RANK``, as launchers set
    it) where CUDA is available, else 'cpu'; a bare 'cuda' is this rank's GPU too; anything else as given."""
    local = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if name == "auto":
        return local if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(local if name == "cuda" else name)
    except RuntimeError:
        raise ConfigError(f"model.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name}, but CUDA is not available here; use model.device=auto or cpu")
    return str(device)


def make_runtime(cfg: Config) -> Runtime:
    """The runtime the config and the launcher ask for, with its process group up (if any)."""
    world = world_size()
    if cfg.dist.deepspeed_config is not None:
        ds = read_deepspeed_config(cfg.dist.deepspeed_config)
    elif under_accelerate_deepspeed():
        ds = accelerate_deepspeed_config(cfg)
    else:
        ds = None
    if cfg.run.batch_size % world:
        raise ConfigError(f"run.batch_size={cfg.run.batch_size} does not split evenly over {world} ranks")
    if ds is None:
        mode = resolve_mode(cfg, ds, world)
    else:
        mode, ds = check_deepspeed_config(ds, cfg, world)
    if mode == "single":
        return Runtime()
    if cfg.dist.timeout_s <= 0:
        raise ConfigError(f"dist.timeout_s must be > 0, got {cfg.dist.timeout_s}")
    if mode == "replicated":
        from zo_scale.backends.replicated import DistributedRuntime

        return DistributedRuntime(cfg.dist.backend, cfg.dist.timeout_s)
    from zo_scale.backends.zero3 import Zero3Runtime  # imports DeepSpeed

    try:
        return Zero3Runtime(ds, cfg.dist.backend, cfg.dist.timeout_s)
    except ValueError as e:  # load_config's checks of the ZeRO section
        raise ConfigError(str(e)) from None
