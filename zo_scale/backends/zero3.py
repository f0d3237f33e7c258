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
    runtime.save_model(model, Path("out/model"), 5 * 10**9)    # HF folder, one parameter gathered at a time
    runtime.close()

No DeepSpeed optimizer for the ZO parameters: one would keep an fp32 master copy of each partition
and write it back over ``ds_tensor`` at ``engine.step()``, undoing the ZO updates.
``deepspeed.initialize`` with a config that has no ``optimizer`` section builds a
``DeepSpeedZeRoOffload`` instead: only the parameter fetch/release hooks, nothing that writes the partitions.

Hybrid ZO-FO (:mod:`zo_scale.train.hybrid`): the last k blocks train by backprop. ``load_model(load,
fo_parameters=..., fo_optimizer_factory=...)`` hands DeepSpeed a torch optimizer over the FO parameters only
(built in code; the JSON still has no ``optimizer`` section), so the engine becomes DeepSpeed's ZeRO-3
optimizer (``DeepSpeedZeroOptimizer_Stage3``) and its fp32 master copy, gradient partitions and
``engine.step()`` cover the FO partitions alone. The two optimizers own disjoint partitions: ZO edits
the ``ds_tensor`` of its parameters in place, DeepSpeed writes only the FO ones. The FO pass goes
through the engine (:meth:`Zero3Runtime.fo_forward`, ``engine.backward``, ``engine.step``), whose
backward reduce-scatters (averages) the FO gradients over the ranks::

    model, tok = runtime.load_model(load, fo_parameters=lambda m: split_fo_parameters(m, k)[0],
                                    fo_optimizer_factory=lambda named: make_fo_optimizer(named, lr=1e-4))
    fo_named, zo_named = split_fo_parameters(model, k)           # the same split again
    zo = ZOSGD(zo_named, lr=1e-6, **runtime.optimizer_kwargs())
    opt = HybridOptimizer(zo, runtime.fo_optimizer, [p for _, p in fo_named], runtime)
    loss = opt.step(lambda: model(**micro_batch).loss)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import pydantic
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.swap_tensor import partitioned_param_swapper as param_swapper
from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus
from deepspeed.runtime.utils import register_output_backward_hooks
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from transformers.integrations import HfDeepSpeedConfig

from zo_scale.backends.replicated import DistributedRuntime
from zo_scale.backends.runtime import ModelAndTokenizer
from zo_scale.core.shards import ParamShard, stream_id, whole_param_shard
from zo_scale.models.sharded_safetensors import saved_tensors, spec_of, write_hf_folder

# DeepSpeed's JIT-built CPU shared-memory all-reduce kernel (op_builder/cpu/comm.py). Only AutoTP
# inference's inference_all_reduce uses it; ZeRO-3's all-gathers and our loss all-reduce go through
# torch.distributed.
_SHM_OP = "deepspeed_shm_comm"

PathOrConfig = str | os.PathLike[str] | Mapping[str, Any]
NamedParams = list[tuple[str, torch.nn.Parameter]]


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
    to 0 when absent: every parameter partitioned. A non-zero threshold is allowed: DeepSpeed then keeps
    the small parameters whole on every rank between forwards, and :func:`zero3_shard` trains those as
    replicated parameters; not with NVMe parameter offload, where DeepSpeed drops a persistent
    parameter's partition file after its first gather. hpZ (a second copy of each partition) and
    quantized weights are refused: they are copies that a partition edit would leave stale. With NVMe
    parameter offload, :func:`zero3_shard` swaps each partition in before the sweep and writes it back
    after. The batch-size fields are required by DeepSpeed's
    config checks; pure ZO never reads them (no dataloader, no optimizer), so "auto" there becomes 1
    (the total is derived). A hybrid ZO-FO engine does read ``gradient_accumulation_steps``
    (``engine.backward`` divides the loss by it): 1 here and in the trainer, which refuses others.
    "auto" precision (``bf16``/``fp16`` ``enabled``) becomes false (fp32) here; the trainer fills it
    from ``model.dtype`` first. An "auto" NVMe swap buffer (``offload_param.buffer_size``, as the shipped
    zero3_offload_nvme.json has it) becomes DeepSpeed's default (1e8 elements) here, which holds partitions of
    up to 1e8 elements; the trainer sizes it from the model first
    (:func:`zo_scale.plan.memory.nvme_buffer_size`).
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
    # DeepSpeed's default clips gradients at norm 1.0: a hybrid run's backprop blocks would be clipped
    # under ZeRO-3 alone (zo-scale clips no gradient in any runtime)
    cfg.setdefault("gradient_clipping", 0.0)
    if "optimizer" in cfg:
        raise ValueError("ZeRO-3 ZO config must have no 'optimizer' section: DeepSpeed's optimizer keeps an fp32 "
                         "master copy of each partition and writes it over the ZO updates at engine.step()")
    zero = cfg.setdefault("zero_optimization", {})
    offload = zero.get("offload_param")
    if isinstance(offload, dict) and offload.get("buffer_size") == "auto":
        del offload["buffer_size"]  # DeepSpeed's default: this function does not know the model
    if zero.get("stage") != 3:
        raise ValueError(f"zero_optimization.stage must be 3, got {zero.get('stage')!r}")
    if not ({"stage3_param_persistence_threshold", "param_persistence_threshold"} & zero.keys()):
        # DeepSpeed's default would keep parameters up to 1e5 elements whole on every rank
        zero.update(stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
    try:
        parsed = DeepSpeedZeroConfig(**zero)
    except pydantic.ValidationError as e:  # one line naming the key, not pydantic's page
        first = e.errors()[0]
        key = ".".join(["zero_optimization", *map(str, first["loc"])])
        raise ValueError(f"DeepSpeed config {key}={first.get('input')!r}: DeepSpeed refuses it "
                         f"({first['msg']})") from None
    problems = []
    nvme = parsed.offload_param is not None and parsed.offload_param.device == OffloadDeviceEnum.nvme
    if nvme and parsed.param_persistence_threshold and parsed.model_persistence_threshold:
        problems.append("stage3_param_persistence_threshold must be 0 with offload_param.device nvme (DeepSpeed drops "
                        "a persistent parameter's NVMe partition, which the ZO update writes)")
    if parsed.zero_hpz_partition_size > 1:
        problems.append("zero_hpz_partition_size must be 1")
    if parsed.zero_quantized_weights or parsed.zero_quantized_nontrainable_weights:
        problems.append("zero_quantized_weights / zero_quantized_nontrainable_weights must be false")
    if problems:
        raise ValueError("ZeRO-3 ZO config: " + "; ".join(problems))
    return cfg


def hybrid_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The engine config of a hybrid ZO-FO run: ``config`` (checked by :func:`load_config`) with

    - ``zero_allow_untested_optimizer``: the FO optimizer comes from code, not the JSON (which still
      has no ``optimizer`` section); torch's SGD is not on DeepSpeed's list of ZeRO-tested optimizers,
      but like AdamW it is elementwise on the flat fp32 partitions;
    - ``stage3_prefetch_bucket_size`` and ``stage3_max_reuse_distance`` 0: DeepSpeed records the module
      order of one forward+backward (the FO pass) as its trace and then, in every forward, keeps a
      gathered parameter when the trace says it is used again soon, and prefetches what the trace
      says comes next. After a ZO forward the trace's next modules are the FO backward's: the tied
      embedding and the FO blocks would stay gathered (or be prefetched) while the ZO sweep edits
      their partitions, and the next forward would read the stale gathered copy (:func:`zero3_shard`
      refuses). With both 0 every module's parameters are gathered on demand and released right
      after it runs; the cost is no overlap of all-gathers with compute.
    """
    cfg = copy.deepcopy(dict(config))
    cfg["zero_allow_untested_optimizer"] = True
    zero = cfg["zero_optimization"]
    zero["stage3_prefetch_bucket_size"] = 0
    zero["stage3_max_reuse_distance"] = 0
    for alias in ("prefetch_bucket_size", "max_reuse_distance"):  # DeepSpeed accepts both spellings
        zero.pop(alias, None)
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

    A parameter DeepSpeed does not manage (no ``ds_tensor``: e.g. a PEFT adapter added after
    ``deepspeed.initialize``) is replicated: its shard is the whole tensor, and every rank applies
    the same update to its copy.
    """
    if not hasattr(param, "ds_tensor"):  # added after partitioning (a PEFT adapter): the same tensor on every rank
        return whole_param_shard(param, name)
    if param.ds_persist:
        return _persistent_shard(param, name)
    if param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        # A gathered full copy (in a forward, or a GatheredParameters block) is what the forward reads;
        # editing the partition under it would silently be lost.
        raise RuntimeError(f"ZeRO-3 parameter {name!r} is {param.ds_status.name} (gathered): the ZO update must run "
                           "between forwards")
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
    offset, valid = _partition_span(param, name)
    flat = param.ds_tensor.data.view(-1)[:valid]
    return ParamShard(param, name, stream_id(name), flat, offset, torch.Size(param.ds_shape), release)


def _persistent_shard(param: torch.Tensor, name: str) -> ParamShard:
    """A parameter DeepSpeed keeps whole on every rank (``stage3_param_persistence_threshold``) trains as a
    replicated one: its shard is the whole gathered tensor, which every rank moves alike (same seed, same
    all-reduced losses), and its ``release`` stores the rank's part back in the partition, from which
    DeepSpeed gathers it again after it partitions the parameter (around an FO step, or a save).
    Gathering one that is partitioned is a collective: every rank's sweep visits the parameters in the
    same order."""
    if param.ds_status == ZeroParamStatus.NOT_AVAILABLE:
        param.all_gather(param_list=[param])
    shard = whole_param_shard(param, name)
    shard.release = functools.partial(zero3_store, param, name)
    return shard


def _partition_span(param: torch.Tensor, name: str) -> tuple[int, int]:
    """(offset, valid): this rank's partition holds elements [offset, offset + valid) of the flattened
    parameter in its first ``valid`` elements (the rest is padding)."""
    group = param.ds_process_group
    rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
    n = param.ds_tensor.ds_numel
    if n != -(-param.ds_numel // world):  # ceil: the layout this slicing assumes (padding only at the end)
        raise RuntimeError(f"unexpected ZeRO-3 layout for {name!r}: {param.ds_numel} elements, partitions of {n}")
    offset = rank * n
    return offset, max(0, min(n, param.ds_numel - offset))


def zero3_store(param: torch.Tensor, name: str, non_blocking: bool = False) -> bool:
    """Store a gathered parameter's updated whole value (``param.data``, inside its module's forward) in
    this rank's partition (``ZOOptimizer(store_fn=...)``, through :class:`PartitionWrites`): the rank's
    elements are copied into ``ds_tensor``; with NVMe offload the partition, still in the swap buffer
    DeepSpeed read it into for the gather, is written to its file and stays in the buffer, which
    DeepSpeed's release after the module drops (unwritten, as after any forward). Per step and parameter
    that is the one write of the lazy in-forward update, and no second read: keeping the buffer matters
    for a parameter used twice (a tied embedding / LM head), which DeepSpeed keeps gathered between its
    uses and would otherwise prefetch from the file again.

    ``non_blocking``: a copy from an accelerator into a host partition (CPU offload) is queued on the
    current stream and not waited for; returns whether it was (the caller synchronizes before the host
    reads the partition). An NVMe partition's copy always completes first: its file write reads it."""
    if not hasattr(param, "ds_tensor"):  # replicated (a PEFT adapter): param.data is the stored tensor
        return False
    partition = param.ds_tensor
    if param.ds_status != ZeroParamStatus.AVAILABLE or partition.status != PartitionedParamStatus.AVAILABLE:
        raise RuntimeError(f"ZeRO-3 parameter {name!r} is not gathered with its partition at hand "
                           f"({param.ds_status.name}, partition {partition.status.name}): nothing to store it from")
    offset, valid = _partition_span(param, name)
    nvme = getattr(partition, "final_location", None) == OffloadDeviceEnum.nvme
    queued = non_blocking and not nvme and partition.device.type == "cpu" and param.device.type != "cpu"
    partition.data.view(-1)[:valid].copy_(param.data.view(-1)[offset : offset + valid], non_blocking=queued)
    if nvme:
        _write_partition_file(param)
    return queued


class PartitionWrites:
    """The order of the ZO core's writes of the partitions and DeepSpeed's reads of them, on a GPU
    (``ZOOptimizer(writing=self, store_fn=self.store)``).

    DeepSpeed all-gathers the partitions (under CPU offload: uploads them) on a stream of its own and makes
    only the compute stream wait for it (``PartitionedParameterCoordinator.fetch_sub_module``); nothing
    makes that stream wait for work on the compute stream. A sweep writes ``ds_tensor`` on the compute
    stream, so the next forward's gather could read a partition half written, with no error. Around each
    pass that writes: on entry the compute stream waits for gathers in flight (a prefetch may still read a
    partition), on exit DeepSpeed's stream waits for the writes; neither is a host sync.

    The in-forward store under CPU offload copies each updated parameter into its host partition without
    blocking (a blocking copy per parameter would stall the forward at every module: 720 host syncs a step
    at 7B, and DeepSpeed's prefetch with it); the pass that follows the forward synchronizes once, on exit,
    before the host reads a partition. ``stream``: DeepSpeed's gather stream (:func:`allgather_stream`),
    None on a synchronized device (the CPU), where every method is a no-op but the store itself.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.queued = 0  # copies to host partitions not yet waited for
        self.host_syncs = 0  # the synchronizations they cost, counted
        self.stored_bytes = 0  # partition bytes the stores wrote, counted

    def store(self, param: torch.Tensor, name: str) -> None:
        self.queued += zero3_store(param, name, non_blocking=self.stream is not None)
        if hasattr(param, "ds_tensor"):
            self.stored_bytes += _partition_span(param, name)[1] * param.ds_tensor.element_size()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        compute = None if self.stream is None else get_accelerator().current_stream()
        if compute is not None:
            compute.wait_stream(self.stream)
        yield
        if compute is not None:
            if self.queued:
                compute.synchronize()
                self.queued, self.host_syncs = 0, self.host_syncs + 1
            self.stream.wait_stream(compute)


def allgather_stream(engine: Any) -> Any:
    """The stream DeepSpeed's ZeRO-3 gathers run on (a private attribute of DeepSpeed 0.19.8's
    ``DeepSpeedZeRoOffload``, which a hybrid run's ZeRO-3 optimizer holds as ``parameter_offload``); None on
    a synchronized device (the CPU accelerator)."""
    offload = engine.optimizer
    if not isinstance(offload, DeepSpeedZeRoOffload):
        offload = offload.parameter_offload
    return offload._DeepSpeedZeRoOffload__allgather_stream


def _write_partition_file(param: torch.Tensor) -> None:
    """Write a swapped-in partition's buffer to its NVMe file and wait, keeping the buffer (DeepSpeed's
    ``swap_out_and_release`` would free it). Uses the swapper's path and buffer maps (DeepSpeed 0.19.8)."""
    swapper = param.nvme_swapper
    if swapper.pending_writes:  # its own writes are synchronous: none should be in flight
        raise RuntimeError("DeepSpeed's parameter swapper has writes in flight: cannot write a partition now")
    handle = swapper.aio_write_handle
    param_swapper.swap_out_tensors(handle, swapper._get_swap_buffers([param]), swapper._get_swap_paths([param]))
    if handle.wait() != 1:
        raise RuntimeError(f"writing the NVMe partition of ZeRO-3 parameter {param.ds_id} failed")


# -- model -----------------------------------------------------------------------------------------
class Zero3Runtime(DistributedRuntime):
    """Data parallel over ZeRO-3 partitions: each rank holds and updates 1/world of every parameter.

    ``config``: a DeepSpeed config (path or mapping), checked by :func:`load_config`. ``engine``
    (after :meth:`load_model`) is the DeepSpeedEngine; ``fo_optimizer`` is DeepSpeed's ZeRO-3
    optimizer over the FO parameters of a hybrid run (None for pure ZO); ``hf_config`` is kept alive
    because transformers reaches it through a weak reference, and its ZeRO-3 code paths
    (from_pretrained, resize_token_embeddings, generate) only run while it lives.
    """

    name = "zero3"

    def __init__(self, config: PathOrConfig, backend: str | None = None, timeout_s: float = 300.0) -> None:
        self.config = load_config(config)
        accelerator = get_accelerator()
        for section, supported in (("bf16", accelerator.is_bf16_supported), ("fp16", accelerator.is_fp16_supported)):
            if self.config.get(section, {}).get("enabled") is True and not supported():
                raise ValueError(f"{section}.enabled=true: DeepSpeed's {accelerator.device_name()} accelerator has no "
                                 f"{section}; train in float32 or the other half precision (model.dtype, or "
                                 "accelerate's mixed_precision)")
        init_distributed(backend, timeout_s=timeout_s)
        super().__init__(backend or get_accelerator().communication_backend_name(), timeout_s)
        self.hf_config = HfDeepSpeedConfig(self.config)
        self.engine: Any = None
        self.fo_optimizer: DeepSpeedZeroOptimizer_Stage3 | None = None
        self._gathered = self._swapped = 0
        self._writes: PartitionWrites | None = None  # the ZO optimizer's stores (optimizer_kwargs), counted
        self._count_all_gathers()
        self._count_swaps()

    def _count_all_gathers(self) -> None:
        """Wrap the all-gathers of DeepSpeed's comm backend (what its parameter fetches call) so that
        :attr:`gathered_bytes` adds up their outputs."""
        backend = deepspeed.comm.comm.cdb

        def counted(method: Callable[..., Any], keyword: str) -> Callable[..., Any]:
            @functools.wraps(method)
            def call(*args: Any, **kwargs: Any) -> Any:
                output = args[0] if args else kwargs[keyword]  # DeepSpeed passes it either way
                tensors = output if isinstance(output, list | tuple) else [output]
                self._gathered += sum(t.numel() * t.element_size() for t in tensors)
                return method(*args, **kwargs)
            return call

        for name in ("all_gather_into_tensor", "all_gather_base"):
            setattr(backend, name, counted(getattr(backend, name), "output_tensor"))
        backend.all_gather_coalesced = counted(backend.all_gather_coalesced, "output_tensors")

    def _count_swaps(self) -> None:
        """Wrap the two functions through which DeepSpeed's parameter swapper reads and writes NVMe
        partition files (module globals of DeepSpeed 0.19.8's swapper), so that :attr:`swapped_bytes`
        adds up the buffers they move."""

        def counted(move: Callable[..., None]) -> Callable[..., None]:
            @functools.wraps(move)
            def call(handle: Any, buffers: Sequence[torch.Tensor], paths: Sequence[str]) -> None:
                self._swapped += sum(b.numel() * b.element_size() for b in buffers)
                move(handle, buffers, paths)
            return call

        for name in ("swap_in_tensors", "swap_out_tensors"):
            setattr(param_swapper, name, counted(getattr(param_swapper, name)))

    @property
    def gathered_bytes(self) -> int:
        return self._gathered

    @property
    def swapped_bytes(self) -> int:
        return self._swapped

    @property
    def stored_bytes(self) -> int:
        return self._writes.stored_bytes if self._writes is not None else 0

    def load_model(
        self,
        load: Callable[[], ModelAndTokenizer],
        fo_parameters: Callable[[torch.nn.Module], Sequence[tuple[str, torch.nn.Parameter]]] | None = None,
        fo_optimizer_factory: Callable[[NamedParams], torch.optim.Optimizer] | None = None,
    ) -> ModelAndTokenizer:
        """Construct the model partitioned at construction, then wrap it in an engine.

        ``load`` runs while the ``HfDeepSpeedConfig`` is alive, so transformers' ``from_pretrained``
        / ``from_config`` construct each parameter inside ``deepspeed.zero.Init`` and no rank ever
        holds the whole model (a bare ``zero.Init()`` around an HF model breaks its weight init;
        this is the path transformers supports). A model built otherwise is partitioned by
        ``deepspeed.initialize`` after the fact, with the full model on every rank first.

        ``from_config`` under ZeRO-3 initialises module by module on rank 0 (transformers'
        ``initialize_weights_zero3``), so the same seed gives other random weights than without
        ZeRO-3: to compare runs, start both from saved weights (``from_pretrained``).

        Pure ZO (``fo_parameters`` None, or it returns nothing): an engine without optimizer, i.e.
        DeepSpeed's hook-only ``DeepSpeedZeRoOffload``. Hybrid: ``fo_parameters(model)`` names the FO
        parameters (e.g. ``split_fo_parameters(m, k)[0]``) and ``fo_optimizer_factory(those)`` builds a
        torch optimizer over exactly them; DeepSpeed wraps it in its ZeRO-3 optimizer (``self.fo_optimizer``),
        which owns only the FO partitions. Every other parameter is frozen while the engine is built,
        so DeepSpeed hooks no gradient reduction onto it, and gets its ``requires_grad`` back after.
        The engine is configured by :func:`hybrid_config` (no prefetch, no reuse-distance retention).
        """
        model, tokenizer = load()
        fo_named = list(fo_parameters(model)) if fo_parameters is not None else []
        if not fo_named:
            self.engine, *_ = deepspeed.initialize(model=model, config=self.config)
            if not isinstance(self.engine.optimizer, DeepSpeedZeRoOffload):
                kind = type(self.engine.optimizer).__name__
                raise RuntimeError(f"expected DeepSpeed's hook-only ZeRO-3 wrapper, got {kind}")
            return self.engine.module, tokenizer  # the hooks are on the module: calling it gathers
        if fo_optimizer_factory is None:
            raise ValueError("fo_parameters needs fo_optimizer_factory: a function from the FO (name, param) list to a "
                             "torch optimizer over exactly those parameters")
        client = fo_optimizer_factory(fo_named)
        fo_ids = {id(p) for _, p in fo_named}
        if {id(p) for g in client.param_groups for p in g["params"]} != fo_ids:
            raise ValueError("fo_optimizer_factory must return an optimizer over exactly the FO parameters: "
                             "DeepSpeed's ZeRO-3 optimizer writes every partition it owns at engine.step()")
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in fo_ids]
        for p in frozen:
            p.requires_grad_(False)
        config = hybrid_config(self.config)
        try:
            self.engine, *_ = deepspeed.initialize(model=model, optimizer=client,
                                                   model_parameters=[p for _, p in fo_named], config=config)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        if not isinstance(self.engine.optimizer, DeepSpeedZeroOptimizer_Stage3):
            raise RuntimeError(f"expected DeepSpeed's ZeRO-3 optimizer, got {type(self.engine.optimizer).__name__}")
        self.fo_optimizer = self.engine.optimizer
        return self.engine.module, tokenizer

    def optimizer_kwargs(self) -> dict[str, Any]:
        self._writes = writes = PartitionWrites(allgather_stream(self.engine))
        return {"shard_fn": zero3_shard, "loss_reduce": self.mean, "store_fn": writes.store, "writing": writes}

    # -- first-order hooks: the FO pass goes through the engine -----------------------------------
    def _engine_optimizer(self, fo: Any = None) -> DeepSpeedZeroOptimizer_Stage3:
        if self.fo_optimizer is None:
            raise RuntimeError("no FO optimizer: load the model with load_model(load, fo_parameters=..., "
                               "fo_optimizer_factory=...) for a hybrid ZO-FO run under ZeRO-3")
        if fo is not None and fo is not self.fo_optimizer:
            raise ValueError("under ZeRO-3 the FO optimizer must be runtime.fo_optimizer (DeepSpeed's, which owns "
                             f"the FO partitions), got {type(fo).__name__}")
        return self.fo_optimizer

    def fo_forward(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``loss_fn()`` (which calls the module, not the engine) with the bookkeeping ``engine.forward``
        adds around the module call in DeepSpeed 0.19.8: reset the optimizer's backward-hook counters
        before, and hook the engine's backward prologue onto the output (timers, the gradient-accumulation
        boundary, entering the backward context the gradient hooks count in). ``engine.backward`` flushes
        the last reduce bucket itself, so in the tested setup (fp32, no accumulation) the weights come
        out the same without this (checked on 2 CPU ranks); it is kept so DeepSpeed sees the call
        sequence ``engine(...)`` produces. ``_backward_prologue`` is private: DeepSpeed is pinned."""
        self._engine_optimizer().clear_backward_seen_flag()
        with torch.enable_grad():
            loss = loss_fn()
        register_output_backward_hooks(loss, preprocess_once_fn=self.engine._backward_prologue)
        return loss

    def fo_backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> float:
        """The loss averaged over ranks (one float64 all-reduce); if it is finite, ``engine.backward(loss)``,
        whose gradient hooks reduce-scatter the mean gradient into each rank's fp32 FO partitions.

        A non-finite mean skips the backward on every rank: nothing is accumulated, nothing to undo.
        """
        self._engine_optimizer()
        (mean,) = self.average_gradients(params, [float(loss.detach())])
        if math.isfinite(mean):
            self.engine.backward(loss)
            # the full gradients handed to DeepSpeed's reduce-scatter, in the parameters' dtype
            self._sent += sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
        return mean

    def average_gradients(self, params: Sequence[torch.Tensor], scalars: Sequence[float] = ()) -> list[float]:
        """The mean of ``scalars`` over ranks only: under ZeRO-3 the FO gradients never sit whole in
        ``p.grad``; ``engine.backward`` reduce-scatters (averages) them into the partitions."""
        del params
        if not scalars:
            return []
        return self.mean(torch.tensor(list(scalars), dtype=torch.float64)).tolist()

    def fo_step(self, fo: torch.optim.Optimizer) -> None:
        """``engine.step()``: the FO update on this rank's fp32 partitions, copied into their ``ds_tensor``."""
        self._engine_optimizer(fo)
        self.engine.step()

    def fo_zero_grad(self, fo: torch.optim.Optimizer) -> None:
        """Clear the engine's FO gradients (empty after a skipped backward; kept for symmetry)."""
        self._engine_optimizer(fo).zero_grad(set_to_none=True)

    def full_tensors(self, model: torch.nn.Module, own_copy: bool = True
                     ) -> Iterator[tuple[str, torch.Tensor | None]]:
        """What ``save_pretrained`` would store (:func:`saved_tensors`: parameters once, tied ones under
        their first name, then persistent buffers), whole, one at a time: each parameter is gathered
        when the caller asks for it and released when the caller asks for the next. On rank 0 a CPU
        copy (``own_copy=False``: the gathered tensor itself, valid only until the next is asked for);
        None elsewhere. A collective: every rank must run it to the end."""
        for name, tensor in saved_tensors(model):
            # not for a buffer (never partitioned), a replicated adapter, or a persistent parameter already
            # whole (GatheredParameters would partition it on the way out, and the next sweep gather it again)
            whole = not hasattr(tensor, "ds_tensor") or tensor.ds_status == ZeroParamStatus.AVAILABLE
            gathered = contextlib.nullcontext() if whole else deepspeed.zero.GatheredParameters([tensor])
            with gathered:
                yield name, tensor.data.detach().to("cpu", copy=own_copy) if self.is_main else None

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Full weights by name as CPU copies on rank 0 (the whole model in memory: for small models and
        tests; checkpoints stream instead, see :meth:`save_model`)."""
        out = dict(self.full_tensors(model))
        return out if self.is_main else None

    def save_model(self, model: torch.nn.Module, folder: Path, max_shard_bytes: int) -> None:
        """The HF folder of the full model, streamed: parameters are gathered one at a time, in the order
        of the shard plan, and rank 0 appends each to its shard file while it is gathered, so it holds
        one gathered parameter at a time (never a shard, never the model)."""
        specs = [spec_of(name, t, getattr(t, "ds_shape", None)) for name, t in saved_tensors(model)]
        stream = self.full_tensors(model, own_copy=False)
        if self.is_main:
            write_hf_folder(model, folder, specs, stream, max_shard_bytes)
        else:
            for _ in stream:  # the gathers are collectives: take part in each
                pass

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
        super().close()
