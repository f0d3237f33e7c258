"""DeepSpeed ZeRO-3 backend: the ZO core updates each rank's own parameter partition in place.

Under ZeRO-3 a parameter's ``.data`` is an empty placeholder between forwards; rank r of the
data-parallel group owns ``param.ds_tensor``, a flat slice of n = ``ds_tensor.numel()`` elements
holding elements [r*n, (r+1)*n) of the flattened full parameter (``param.ds_numel`` elements, shape
``param.ds_shape``), zero-padded at the end so that n * world_size >= ds_numel. DeepSpeed's forward
hooks all-gather the slices before each submodule runs and free the full copy after it.

A ZO step never needs a gradient or an optimizer state that spans ranks: every rank evaluates the
loss of its own micro-batch at the same perturbed point, one all-reduce of the step's few losses
(:func:`loss_reduce`) gives every rank the same projected gradients, and each rank then moves only
the elements it owns, generating exactly those elements of z (counter-based noise). So the model
is held once across the group, and the only traffic besides DeepSpeed's per-forward all-gathers is
one all-reduce of a few float64 scalars per step.

Usage (under ``torchrun`` or the ``deepspeed`` launcher; the trainer does this when ``dist.mode``
is zero3)::

    runtime = Zero3Runtime("ds_configs/zero3.json")              # gloo on CPU, nccl on CUDA
    model, tok = runtime.load_model(lambda: (AutoModelForCausalLM.from_pretrained(path), tok))
    opt = ZOSGD(model.named_parameters(), lr=1e-6, **runtime.optimizer_kwargs())
    opt.step(lambda: model(**batch).loss)                       # each rank: its own micro-batch
    state = runtime.full_state_dict(model)                      # full weights on rank 0
    runtime.close()

No DeepSpeed optimizer: one would keep an fp32 master copy of each partition and write it back
over ``ds_tensor`` at ``engine.step()``, undoing the ZO updates. ``deepspeed.initialize`` with a
config that has no ``optimizer`` section builds a ``DeepSpeedZeRoOffload`` instead: only the
parameter fetch/release hooks, nothing that writes the partitions.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from transformers.integrations import HfDeepSpeedConfig

from zo_scale.backends.replicated import DistributedRuntime
from zo_scale.backends.runtime import ModelAndTokenizer
from zo_scale.core.shards import ParamShard, stream_id

# DeepSpeed's JIT-built CPU shared-memory all-reduce kernel (op_builder/cpu/comm.py). Only AutoTP
# inference's inference_all_reduce uses it; ZeRO-3's all-gathers and our loss all-reduce go through
# torch.distributed.
_SHM_OP = "deepspeed_shm_comm"

PathOrConfig = str | os.PathLike[str] | Mapping[str, Any]


# -- process group -------------------------------------------------------------------------------
def skip_shm_op_build() -> None:
    """Mark DeepSpeed's CPU shared-memory all-reduce op incompatible, so its comm layer skips the build."""
    if get_accelerator().device_name() == "cpu":
        # deepspeed.ops keeps this dict for the process; TorchBackend's build_shm_op() reads it.
        deepspeed.ops.__compatible_ops__[_SHM_OP] = False


def init_distributed(backend: str | None = None, *, build_shm_op: bool = False, timeout_s: float = 300.0) -> None:
    """Initialise torch.distributed (from the launcher's env: RANK, WORLD_SIZE, MASTER_ADDR, ...) and
    DeepSpeed's comm layer on top of it.

    ``backend``: the torch.distributed backend; by default the accelerator's ('gloo' on CPU without
    oneCCL, 'nccl' on CUDA). ``build_shm_op``: on the CPU accelerator DeepSpeed JIT-compiles its
    shared-memory all-reduce kernel whenever its comm layer comes up and no build is cached under
    ~/.cache/torch_extensions (33-75 s seen on 2 cores); nothing here uses that kernel, so by
    default it is marked incompatible, which makes DeepSpeed skip the build.
    """
    if not build_shm_op:
        skip_shm_op_build()
    backend = backend or get_accelerator().communication_backend_name()
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    deepspeed.init_distributed(dist_backend=backend)  # wraps the existing group, no second rendezvous


# -- config ---------------------------------------------------------------------------------------
def load_config(config: PathOrConfig) -> dict[str, Any]:
    """A DeepSpeed config (JSON path or mapping) checked for pure-ZO ZeRO-3; returns a new dict.

    Requires stage 3 and no ``optimizer`` (see the module docstring). Parameter persistence is set
    to 0 when absent and refused otherwise: a persistent parameter keeps its gathered full copy
    between forwards, so an edit to its partition would never reach the forward. hpZ (a second copy
    of each partition) and quantized weights are refused for the same reason: they are copies that a
    partition edit would leave stale. With NVMe parameter offload, :func:`zero3_shard` swaps each
    partition in before the sweep and writes it back after. The batch-size fields are required by DeepSpeed's
    config checks but unused: without its dataloader and optimizer nothing reads them, so "auto"
    there becomes 1 (the total is derived). "auto" precision (``bf16``/``fp16`` ``enabled``) becomes
    false (fp32) here; the trainer fills it from ``model.dtype`` first.
    """
    if isinstance(config, Mapping):
        cfg = copy.deepcopy(dict(config))
    else:
        cfg = json.loads(Path(config).read_text())
    if cfg.get("train_batch_size") == "auto":
        del cfg["train_batch_size"]  # DeepSpeed derives it: micro batch * accumulation * world size
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if cfg.get(key) == "auto":
            cfg[key] = 1
    for section in ("bf16", "fp16"):
        if cfg.get(section, {}).get("enabled") == "auto":
            cfg[section]["enabled"] = False
    if "optimizer" in cfg:
        raise ValueError("ZeRO-3 ZO config must have no 'optimizer' section: DeepSpeed's optimizer keeps an fp32 "
                         "master copy of each partition and writes it over the ZO updates at engine.step()")
    zero = cfg.setdefault("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ValueError(f"zero_optimization.stage must be 3, got {zero.get('stage')!r}")
    for key in ("stage3_param_persistence_threshold", "stage3_model_persistence_threshold"):
        alias = key.removeprefix("stage3_")
        if alias not in zero:
            zero.setdefault(key, 0)
    parsed = DeepSpeedZeroConfig(**zero)
    problems = []
    if parsed.param_persistence_threshold or parsed.model_persistence_threshold:
        problems.append("stage3_param/model_persistence_threshold must be 0")
    if parsed.zero_hpz_partition_size > 1:
        problems.append("zero_hpz_partition_size must be 1")
    if parsed.zero_quantized_weights or parsed.zero_quantized_nontrainable_weights:
        problems.append("zero_quantized_weights / zero_quantized_nontrainable_weights must be false")
    if problems:
        raise ValueError("ZeRO-3 ZO config: " + "; ".join(problems))
    return cfg


# -- the core's two hooks --------------------------------------------------------------------------
def zero3_shard(param: torch.Tensor, name: str) -> ParamShard:
    """The core's view of rank r's partition of a ZeRO-3 parameter (``ZOOptimizer(shard_fn=...)``).

    ``flat`` is the valid part of ``param.ds_tensor``: elements [r*n, min((r+1)*n, ds_numel)) of the
    flattened parameter, n = ds_tensor.numel(); the padding after ds_numel (last ranks only) is left
    out so it is never perturbed. A rank whose whole partition is padding gets an empty slice.

    With NVMe parameter offload the partition lives in a file between forwards: it is swapped into
    one of DeepSpeed's buffers here, and the shard's ``release`` writes it back to NVMe and frees the
    buffer, so the optimizer holds one swapped-in partition at a time.
    """
    if not hasattr(param, "ds_tensor"):
        raise ValueError(f"parameter {name!r} is not a ZeRO-3 parameter (not built under zero.Init or "
                         "deepspeed.initialize)")
    if param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        # A gathered full copy (in a forward, a GatheredParameters block, or a persistent parameter)
        # is what the forward reads; editing the partition under it would silently be lost.
        raise RuntimeError(f"ZeRO-3 parameter {name!r} is {param.ds_status.name} (gathered): the ZO update must run "
                           "between forwards, with persistence thresholds 0 (see load_config)")
    if getattr(param, "ds_secondary_tensor", None) is not None or hasattr(param.ds_tensor, "ds_quant_scale"):
        raise RuntimeError(f"ZeRO-3 parameter {name!r} has an hpZ or quantized copy that a ZO update would leave stale")
    release = None
    if getattr(param.ds_tensor, "final_location", None) == OffloadDeviceEnum.nvme:
        swapper = param.nvme_swapper
        if param.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE:
            swapper.swap_in([param], async_op=False)
        elif param.ds_tensor.status == PartitionedParamStatus.INFLIGHT:  # a prefetch already under way
            swapper.synchronize_reads()
        release = functools.partial(swapper.swap_out_and_release, [param])
    group = param.ds_process_group
    rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
    n = param.ds_tensor.ds_numel
    if n != -(-param.ds_numel // world):  # ceil: the layout this slicing assumes (padding only at the end)
        raise RuntimeError(f"unexpected ZeRO-3 layout for {name!r}: {param.ds_numel} elements, partitions of {n}")
    offset = rank * n
    valid = max(0, min(n, param.ds_numel - offset))
    flat = param.ds_tensor.data.view(-1)[:valid]
    return ParamShard(param, name, stream_id(name), flat, offset, torch.Size(param.ds_shape), release)


# -- model -----------------------------------------------------------------------------------------
class Zero3Runtime(DistributedRuntime):
    """Data parallel over ZeRO-3 partitions: each rank holds and updates 1/world of every parameter.

    ``config``: a DeepSpeed config (path or mapping), checked by :func:`load_config`. ``engine``
    (after :meth:`load_model`) is the DeepSpeedEngine; ``hf_config`` is kept alive because
    transformers reaches it through a weak reference, and its ZeRO-3 code paths (from_pretrained,
    resize_token_embeddings, generate) only run while it lives.
    """

    name = "zero3"

    def __init__(self, config: PathOrConfig, backend: str | None = None, timeout_s: float = 300.0) -> None:
        self.config = load_config(config)
        init_distributed(backend, timeout_s=timeout_s)
        super().__init__(backend or get_accelerator().communication_backend_name(), timeout_s)
        self.hf_config = HfDeepSpeedConfig(self.config)
        self.engine: Any = None

    def load_model(self, load: Callable[[], ModelAndTokenizer]) -> ModelAndTokenizer:
        """Construct the model partitioned at construction, then wrap it in an engine without optimizer.

        ``load`` runs while the ``HfDeepSpeedConfig`` is alive, so transformers' ``from_pretrained``
        / ``from_config`` construct each parameter inside ``deepspeed.zero.Init`` and no rank ever
        holds the whole model (a bare ``zero.Init()`` around an HF model breaks its weight init;
        this is the path transformers supports). A model built otherwise is partitioned by
        ``deepspeed.initialize`` after the fact, with the full model on every rank first.

        ``from_config`` under ZeRO-3 initialises module by module on rank 0 (transformers'
        ``initialize_weights_zero3``), so the same seed gives other random weights than without
        ZeRO-3: to compare runs, start both from saved weights (``from_pretrained``).
        """
        model, tokenizer = load()
        self.engine, *_ = deepspeed.initialize(model=model, config=self.config)
        if not isinstance(self.engine.optimizer, DeepSpeedZeRoOffload):
            kind = type(self.engine.optimizer).__name__
            raise RuntimeError(f"expected DeepSpeed's hook-only ZeRO-3 wrapper, got {kind}")
        return self.engine.module, tokenizer  # the hooks are on the module: calling it gathers

    def optimizer_kwargs(self) -> dict[str, Any]:
        return {"shard_fn": zero3_shard, "loss_reduce": self.mean}

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Full parameters by name (tied ones once) as CPU copies on rank 0, gathered one at a time."""
        out = {}
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                if self.is_main:
                    out[name] = param.data.detach().to("cpu", copy=True)
        return out if self.is_main else None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
        super().close()
