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

Usage (under ``torchrun`` or the ``deepspeed`` launcher)::

    init_distributed()                                          # gloo on CPU, nccl on CUDA
    z3 = build_zero3_model(lambda: AutoModelForCausalLM.from_pretrained(path), "ds_configs/zero3.json")
    opt = ZOSGD(z3.module.named_parameters(), lr=1e-6, **z3.optimizer_kwargs())
    opt.step(lambda: z3.engine(**batch).loss)                   # each rank: its own micro-batch
    state = z3.gathered_state_dict()                            # full weights on rank 0
    shutdown()

No DeepSpeed optimizer: one would keep an fp32 master copy of each partition and write it back
over ``ds_tensor`` at ``engine.step()``, undoing the ZO updates. ``deepspeed.initialize`` with a
config that has no ``optimizer`` section builds a ``DeepSpeedZeRoOffload`` instead: only the
parameter fetch/release hooks, nothing that writes the partitions.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from transformers.integrations import HfDeepSpeedConfig

from zo_scale.core.shards import ParamShard, stream_id

# DeepSpeed's JIT-built CPU shared-memory all-reduce kernel (op_builder/cpu/comm.py). Only AutoTP
# inference's inference_all_reduce uses it; ZeRO-3's all-gathers and our loss all-reduce go through
# torch.distributed.
_SHM_OP = "deepspeed_shm_comm"

PathOrConfig = str | os.PathLike[str] | Mapping[str, Any]


# -- process group -------------------------------------------------------------------------------
def init_distributed(backend: str | None = None, *, build_shm_op: bool = False) -> None:
    """Initialise torch.distributed (from the launcher's env: RANK, WORLD_SIZE, MASTER_ADDR, ...) and
    DeepSpeed's comm layer on top of it.

    ``backend``: the torch.distributed backend; by default the accelerator's ('gloo' on CPU without
    oneCCL, 'nccl' on CUDA). ``build_shm_op``: on the CPU accelerator DeepSpeed JIT-compiles its
    shared-memory all-reduce kernel whenever its comm layer comes up and no build is cached under
    ~/.cache/torch_extensions (33-75 s seen on 2 cores); nothing here uses that kernel, so by
    default it is marked incompatible, which makes DeepSpeed skip the build.
    """
    if not build_shm_op and get_accelerator().device_name() == "cpu":
        # deepspeed.ops keeps this dict for the process; TorchBackend's build_shm_op() reads it.
        deepspeed.ops.__compatible_ops__[_SHM_OP] = False
    backend = backend or get_accelerator().communication_backend_name()
    if not dist.is_initialized():
        dist.init_process_group(backend)
    deepspeed.init_distributed(dist_backend=backend)  # wraps the existing group, no second rendezvous


def shutdown() -> None:
    """Barrier, then destroy the default process group, so no rank tears down its communicator (and
    its gloo threads) in interpreter shutdown while a peer still uses it: finished ZeRO-3 ranks have
    been seen to abort there ('terminate called without an active exception')."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -- config ---------------------------------------------------------------------------------------
def load_config(config: PathOrConfig) -> dict[str, Any]:
    """A DeepSpeed config (JSON path or mapping) checked for pure-ZO ZeRO-3; returns a new dict.

    Requires stage 3 and no ``optimizer`` (see the module docstring). Parameter persistence is set
    to 0 when absent and refused otherwise: a persistent parameter keeps its gathered full copy
    between forwards, so an edit to its partition would never reach the forward. hpZ (a second copy
    of each partition) and quantized weights are refused for the same reason: they are copies that a
    partition edit would leave stale. NVMe parameter offload is refused: the partition may be
    swapped out when the optimizer sweeps it. The batch-size fields are required by DeepSpeed's
    config checks but unused: without its dataloader and optimizer nothing reads them.
    """
    if isinstance(config, Mapping):
        cfg = copy.deepcopy(dict(config))
    else:
        cfg = json.loads(Path(config).read_text())
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
    if parsed.offload_param is not None and parsed.offload_param.device == OffloadDeviceEnum.nvme:
        problems.append("offload_param.device must not be nvme")
    if problems:
        raise ValueError("ZeRO-3 ZO config: " + "; ".join(problems))
    return cfg


# -- the core's two hooks --------------------------------------------------------------------------
def zero3_shard(param: torch.Tensor, name: str) -> ParamShard:
    """The core's view of rank r's partition of a ZeRO-3 parameter (``ZOOptimizer(shard_fn=...)``).

    ``flat`` is the valid part of ``param.ds_tensor``: elements [r*n, min((r+1)*n, ds_numel)) of the
    flattened parameter, n = ds_tensor.numel(); the padding after ds_numel (last ranks only) is left
    out so it is never perturbed. A rank whose whole partition is padding gets an empty slice.
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
    group = param.ds_process_group
    rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
    n = param.ds_tensor.ds_numel
    if n != -(-param.ds_numel // world):  # ceil: the layout this slicing assumes (padding only at the end)
        raise RuntimeError(f"unexpected ZeRO-3 layout for {name!r}: {param.ds_numel} elements, partitions of {n}")
    offset = rank * n
    valid = max(0, min(n, param.ds_numel - offset))
    flat = param.ds_tensor.data.view(-1)[:valid]
    return ParamShard(param, name, stream_id(name), flat, offset, torch.Size(param.ds_shape))


def loss_reduce(losses: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Average a step's losses over the data-parallel group (``ZOOptimizer(loss_reduce=...)``).

    ``losses``: 1-D float64, this rank's losses at the step's points (each the mean over this rank's
    micro-batch). Returns the mean over ranks, same shape, on the input's device. One all-reduce;
    equal weights per rank, so ranks should see equally sized micro-batches.
    """
    world = dist.get_world_size(group=group)
    if world == 1:
        return losses
    buffer = losses.to(get_accelerator().current_device_name(), copy=True)  # NCCL needs it on the GPU
    deepspeed.comm.all_reduce(buffer, group=group)
    return buffer.div_(world).to(losses.device)


# -- model -----------------------------------------------------------------------------------------
@dataclass
class Zero3Model:
    """A model partitioned under ZeRO-3 with DeepSpeed's fetch/release hooks installed.

    ``engine``: the DeepSpeedEngine (call it like the model, under ``torch.no_grad()``);
    ``hf_config``: kept alive because transformers reaches it through a weak reference, and its
    ZeRO-3 code paths (from_pretrained, resize_token_embeddings, generate) only run while it lives.
    """

    engine: Any  # deepspeed.DeepSpeedEngine
    config: dict[str, Any]
    hf_config: HfDeepSpeedConfig

    @property
    def module(self) -> torch.nn.Module:
        """The partitioned model itself; calling it directly also gathers (the hooks are on it)."""
        return self.engine.module

    def optimizer_kwargs(self) -> dict[str, Any]:
        """``shard_fn`` and ``loss_reduce`` for :class:`~zo_scale.core.optimizer.ZOOptimizer`."""
        return {"shard_fn": zero3_shard, "loss_reduce": loss_reduce}

    def gathered_parameters(self, rank: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full fp CPU copy) of each parameter, gathered one at a time; yields only on ``rank``.

        Every rank must iterate it (each gather is a collective)."""
        me = dist.get_rank()
        for name, param in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                if me == rank:
                    yield name, param.data.detach().to("cpu", copy=True)

    def gathered_state_dict(self, rank: int = 0) -> dict[str, torch.Tensor]:
        """Full parameters by name (tied ones once) on ``rank``, {} elsewhere; a collective."""
        return dict(self.gathered_parameters(rank))


def build_zero3_model(build: Callable[[], torch.nn.Module], config: PathOrConfig) -> Zero3Model:
    """Construct a model partitioned at construction, then wrap it in a DeepSpeed engine without optimizer.

    ``build`` runs while an ``HfDeepSpeedConfig`` is alive, so transformers' ``from_pretrained`` /
    ``from_config`` construct each parameter inside ``deepspeed.zero.Init`` and no rank ever holds
    the whole model (a bare ``zero.Init()`` around an HF model breaks its weight init; this is the
    path transformers supports). A model built otherwise is partitioned by ``deepspeed.initialize``
    after the fact, with the full model on every rank first.

    ``from_config`` under ZeRO-3 initialises module by module on rank 0 (transformers'
    ``initialize_weights_zero3``), so the same seed gives other random weights than without ZeRO-3:
    to compare runs, start both from saved weights (``from_pretrained``).
    """
    if not deepspeed.comm.is_initialized():
        init_distributed()
    cfg = load_config(config)
    hf_config = HfDeepSpeedConfig(cfg)
    model = build()
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    if not isinstance(engine.optimizer, DeepSpeedZeRoOffload):
        raise RuntimeError(f"expected DeepSpeed's hook-only ZeRO-3 wrapper, got {type(engine.optimizer).__name__}")
    return Zero3Model(engine, cfg, hf_config)
