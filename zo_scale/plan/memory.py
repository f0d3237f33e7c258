r"""Peak memory of a zo-scale run on each GPU, in host RAM and on NVMe, from the model's shape alone.

A run holds some things for its whole life (*resident*: weights, optimizer state, swap buffers, the
runtime itself) and others only in one phase (*transient*): the step's forward (ZeRO-3's gathered
parameters, activations, logits, the perturbed copies, a hybrid run's backward), the checkpoint save,
the model's load. The peak of a memory is its resident bytes plus the largest phase:

.. math::
    \mathrm{peak} = \sum_{\text{resident}} b + \max_{\text{phase}} \sum_{\text{transient in phase}} b

Per rank, with P parameters of e bytes, W ranks, R = ceil(B / W) sequences of T tokens per rank and
K row groups (``optim.perturb=in_forward``: the batch stacked K = 2q times; in place K = 1):

- weights: P e (single, replicated), P e / W (ZeRO-3), on the GPU, in host RAM (``offload=cpu``) or
  on NVMe (``offload=nvme``, with ``buffer_count`` swap buffers of the largest partition in RAM);
  int8 keeps 1 byte per linear weight plus an fp32 scale per output row, NF4 half a byte plus an fp32
  absmax per 64; LoRA adds r (in + out) fp32 elements per adapted projection (peft keeps adapters fp32);
- optimizer state: 0 (sgd, sign), 4 (momentum) or 8 (adam) bytes per trained element, +4 with master
  weights, where the trained elements live;
- gathered (ZeRO-3): the largest module's parameters plus DeepSpeed's prefetch bucket
  (``stage3_prefetch_bucket_size`` of the ds_config below), in e bytes; CPU ranks over gloo hold
  about three times that at the step's peak (fitted to the two 2-rank cases of the calibration);
- activations: K R T (a_h H + a_i I) e; on a CPU also a share of the fp32 attention scores,
  a_s K R heads T^2 4, and a fixed buffer; logits: K R positions V (e + 8) (the LM head's output, its
  fp32 copy and its log-softmax), positions = 1 for one-token answers, else answer tokens + 1;
- perturbed copies (in_forward): K copies of the largest module, in e bytes;
- hybrid (the last k blocks by backprop): their gradients, AdamW's two moments (fp32 master, moments
  and gradient partition under ZeRO-3: 16 bytes), and what autograd keeps for k blocks,
  R T k (s_h H + s_i I) e;
- checkpoint (rank 0, host): ZeRO-3's streamed save holds about two copies of the largest parameter,
  ``save_pretrained`` (single, replicated) one;
- load: ZeRO-3 builds each parameter whole before partitioning it (about three copies of the largest
  at once); single and replicated runs on a GPU build or read the model in host RAM first;
- runtime: each rank's process (Python, torch, transformers, DeepSpeed's ops) in host RAM, and on a
  GPU the CUDA context.

The coefficients are measured by ``benchmarks/plan_calibration.py``: a_h, a_i, a_s and the CPU
forward's fixed buffer fitted (least squares) to the peak of single forwards of OPT and LLaMA shapes
in fp32 and bf16, the runtime's bytes from trainer runs of a model of a few MB; the trainer cases
there then check the whole plan against the trainer's own peaks. Not measured (no GPU was available):
the CUDA context, taken as 0.5 GiB, and the activations of CUDA attention kernels, taken as the
flash/memory-efficient kernels' (no T^2 term). s_h, s_i (hybrid) are estimates the hybrid case checks.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from zo_scale.core.estimators import ESTIMATORS, make_estimator
from zo_scale.plan.shapes import ModelShape

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
# fp32 buffers per trained element (LOZO-M: an m x r factor per matrix, about 4 r / n bytes an element: ~0)
STATE_BYTES = {"sgd": 0, "sign": 0, "sign-momentum": 4, "momentum": 4, "adam": 8, "lozo-m": 0, "hizoo": 4, "ardd": 4}
# DeepSpeed's default zero_optimization.offload_param.buffer_size (elements; DeepSpeed 0.19's
# DeepSpeedZeroOffloadParamConfig; tests/train/test_swap_buffer.py checks it): the smallest swap buffer a plan or a
# run uses.
DEEPSPEED_SWAP_BUFFER = 100_000_000

# Measured by benchmarks/plan_calibration.py (results/plan_calibration.json, coefficients_used):
# activation elements per token of a run's forwards without autograd (a_h per hidden unit, a_i per
# intermediate unit; a least-squares fit, so the split between the two is loose, their sum is not),
# and a rank's process with nothing loaded. s_h, s_i (kept for a hybrid backward) are estimates.
ACTIVATION_HIDDEN, ACTIVATION_INTERMEDIATE = 9.6, 0.2
CPU_ATTENTION_SCORES = 2.15  # CPU SDPA's buffers, in units of the batch's fp32 scores (rows x heads x T^2)
CPU_FORWARD_FIXED = 179 * 2**20  # a CPU forward's own buffers whatever its batch (oneDNN scratch and the like)
SAVED_HIDDEN, SAVED_INTERMEDIATE = 10.0, 4.0
PROCESS_HOST_BYTES = {"single": 300 * 2**20, "replicated": 305 * 2**20, "zero3": 338 * 2**20}
ZERO3_BUILD_COPIES = 3  # full copies of the largest parameter while zero.Init builds or loads the model
GLOO_GATHER_COPIES = 3.0  # CPU ranks over gloo hold about 3x the gathered working set at a step's peak
CUDA_CONTEXT_BYTES = GiB // 2  # not measured here (no GPU); typical of a CUDA 12 context with cuBLAS

MODES = ("single", "replicated", "zero3")
OFFLOADS = ("none", "cpu", "nvme")
TUNINGS = ("full", "lora", "prefix")
QUANTIZATIONS = ("none", "int8", "nf4")
PERTURBS = ("in_place", "in_forward")
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class RunSettings:
    """What is planned: how the run is laid out, what it trains, on what hardware (bytes; None: unknown)."""

    mode: str = "single"
    offload: str = "none"
    gpus: int = 1  # ranks in all (one per GPU)
    nodes: int = 1
    device: str = "cuda"  # cpu: ranks compute on the CPU, so "GPU" memory is host memory
    gpu_memory: int | None = None
    host_memory: int | None = None
    nvme_space: int | None = None
    batch: int = 16  # sequences per step over all ranks (a C-option example is C sequences)
    seq: int = 256
    answer_tokens: int = 1
    dtype: str = "bfloat16"
    tuning: str = "full"
    quantization: str = "none"
    lora_r: int = 8
    virtual_tokens: int = 10
    fo_layers: int = 0
    rule: str = "sgd"
    master_weights: bool = False
    perturb: str = "in_place"
    estimator: str = "central"
    queries: int = 1
    save_shard_bytes: int = 5 * 10**9

    def check(self) -> None:
        """Raise ValueError naming the first setting the trainer would refuse or the planner cannot plan."""
        choices = {"mode": MODES, "offload": OFFLOADS, "tuning": TUNINGS, "quantization": QUANTIZATIONS,
                   "perturb": PERTURBS, "estimator": tuple(ESTIMATORS), "device": DEVICES, "rule": tuple(STATE_BYTES),
                   "dtype": tuple(DTYPE_BYTES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: unknown {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        for name in ("gpus", "nodes", "batch", "seq", "answer_tokens", "queries", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.gpus % self.nodes:
            raise ValueError(f"gpus ({self.gpus}) must split evenly over nodes ({self.nodes})")
        if self.mode == "single" and self.gpus != 1:
            raise ValueError(f"mode single runs one rank; for {self.gpus} GPUs use mode replicated or zero3")
        if self.offload != "none" and self.mode != "zero3":
            raise ValueError(f"offload {self.offload} needs mode zero3 (DeepSpeed offloads ZeRO-3 partitions)")
        if self.quantization != "none" and self.mode == "zero3":
            raise ValueError("quantization with zero3: the trainer refuses it (DeepSpeed would partition "
                             "bitsandbytes' quantized parameters as float weights); use single or replicated")
        if self.fo_layers and self.tuning != "full" and self.mode == "zero3":
            raise ValueError("fo_layers with a PEFT tuning under zero3: the trainer refuses it")
        if self.answer_tokens >= self.seq:
            raise ValueError(f"answer_tokens ({self.answer_tokens}) must be shorter than seq ({self.seq})")


@dataclass
class MemoryPlan:
    """Peak bytes per GPU (rank 0, the fullest), in host RAM per node and on NVMe, and how they add up.

    ``gpu``, ``host``, ``nvme``: name -> bytes, with ``phase`` saying which names are transient and
    in which phase (the rest are resident). ``host`` counts every rank of a node (their runtime,
    offloaded partitions, swap buffers) and rank 0's checkpoint save. ``ds_config``: the DeepSpeed
    config the plan assumed (:func:`ds_config`; None outside zero3).
    """

    settings: RunSettings
    shape: ModelShape
    gpu: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    nvme: dict[str, int] = field(default_factory=dict)
    phase: dict[str, str] = field(default_factory=dict)
    ds_config: dict[str, Any] | None = None

    @staticmethod
    def _peak(terms: dict[str, int], phase: dict[str, str]) -> int:
        resident = sum(b for name, b in terms.items() if name not in phase)
        by_phase: dict[str, int] = {}
        for name, b in terms.items():
            if name in phase:
                by_phase[phase[name]] = by_phase.get(phase[name], 0) + b
        return resident + max(by_phase.values(), default=0)

    @property
    def per_gpu_bytes(self) -> int:
        return self._peak(self.gpu, self.phase)

    @property
    def host_bytes(self) -> int:
        return self._peak(self.host, self.phase)

    @property
    def nvme_bytes(self) -> int:
        return sum(self.nvme.values())

    @property
    def node_host_bytes(self) -> int:
        """Host RAM a node needs at its peak: its host terms, plus its ranks' device terms where the ranks
        compute on the CPU (``device=cpu``: their "GPU" memory is host memory)."""
        s = self.settings
        return self.host_bytes + (self.per_gpu_bytes * s.gpus // s.nodes if s.device == "cpu" else 0)

    @property
    def rank_bytes(self) -> int:
        """Rank 0's peak when its GPU memory is host memory (``device=cpu``): what its resident set reaches."""
        ranks = self.settings.gpus // self.settings.nodes
        mine = {**self.gpu, **{f"host {k}": v // (1 if k in RANK0_HOST else ranks) for k, v in self.host.items()}}
        return self._peak(mine, {**self.phase, **{f"host {k}": p for k, p in self.phase.items()}})

    def problems(self) -> list[str]:
        """What does not fit the given hardware, in words; empty when it fits (or nothing was given)."""
        s, out = self.settings, []
        if s.device == "cuda" and s.gpu_memory is not None and self.per_gpu_bytes > s.gpu_memory:
            out.append(f"each GPU needs {self.per_gpu_bytes / GiB:.1f} GiB, it has {s.gpu_memory / GiB:.1f} GiB")
        host = self.node_host_bytes
        if s.host_memory is not None and host > s.host_memory:
            out.append(f"each node needs {host / GiB:.1f} GiB of host RAM, it has {s.host_memory / GiB:.1f} GiB")
        if s.nvme_space is not None and self.nvme_bytes > s.nvme_space:
            out.append(f"NVMe needs {self.nvme_bytes / GiB:.1f} GiB, it has {s.nvme_space / GiB:.1f} GiB")
        return out

    def as_json(self) -> dict[str, Any]:
        """One object for scripts: per_gpu_bytes, host_bytes, nvme_bytes, fits, breakdown, and the rest."""
        problems = self.problems()
        breakdown = {f"{where}/{name}": b for where, terms in (("gpu", self.gpu), ("host", self.host),
                                                               ("nvme", self.nvme)) for name, b in terms.items()}
        return {
            "per_gpu_bytes": self.per_gpu_bytes, "host_bytes": self.host_bytes, "nvme_bytes": self.nvme_bytes,
            "fits": not problems, "problems": problems, "breakdown": breakdown,
            "transient": {f"{w}/{n}": self.phase[n] for w, t in (("gpu", self.gpu), ("host", self.host))
                          for n in t if n in self.phase},
            "settings": asdict(self.settings), "model": asdict(self.shape),
            "ds_config": self.ds_config,
            **({"rank_bytes": self.rank_bytes} if self.settings.device == "cpu" else {}),
        }


RANK0_HOST = ("checkpoint save",)  # host terms that only rank 0 holds (the rest: every rank of the node)


def groups(s: RunSettings) -> int:
    """Row groups of a step's forward: all its points in one forward (2q central, q + 1 one-sided), 1 in place."""
    return make_estimator(s.estimator).forwards(s.queries) if s.perturb == "in_forward" else 1


def _weight_bytes(shape: ModelShape, s: RunSettings) -> int:
    e = DTYPE_BYTES[s.dtype]
    floats = shape.parameters - shape.linear
    if s.quantization == "int8":
        return shape.linear + 4 * shape.linear_rows + floats * e
    if s.quantization == "nf4":
        return shape.linear // 2 + shape.linear // 64 * 4 + floats * e
    return shape.parameters * e


def _adapter_elements(shape: ModelShape, s: RunSettings) -> int:
    if s.tuning == "lora":
        return s.lora_r * shape.lora_per_rank
    if s.tuning == "prefix":
        return s.virtual_tokens * shape.layers * 2 * shape.hidden
    return 0


def plan_memory(shape: ModelShape, s: RunSettings) -> MemoryPlan:
    """The memory plan of a run of ``shape`` laid out as ``s`` (see the module docstring for the terms)."""
    s.check()
    if s.fo_layers and shape.fo_layers != s.fo_layers:
        raise ValueError(f"shape was read for fo_layers={shape.fo_layers}, settings say {s.fo_layers}")
    e, W = DTYPE_BYTES[s.dtype], s.gpus
    zero3 = s.mode == "zero3"
    plan = MemoryPlan(s, shape, ds_config=ds_config(s, shape))
    gpu, host, nvme, phase = plan.gpu, plan.host, plan.nvme, plan.phase
    ranks_here = W // s.nodes
    # DeepSpeed's prefetch bucket and NVMe swap buffers, as the run will use them
    zero = (plan.ds_config or {}).get("zero_optimization", {})

    # resident: the model, what trains and its optimizer state
    weights = _weight_bytes(shape, s) // (W if zero3 else 1)
    adapter = _adapter_elements(shape, s)
    trained = adapter if s.tuning != "full" else (shape.parameters - shape.fo_parameters) // (W if zero3 else 1)
    if s.tuning == "full" and s.quantization != "none":  # ZO over the scales and the float weights
        trained = shape.linear_rows + shape.parameters - shape.linear
    state = trained * (STATE_BYTES[s.rule] + (4 if s.master_weights else 0))
    where = gpu if s.offload == "none" or s.tuning != "full" else host
    per_node = ranks_here if where is host else 1
    if s.offload == "nvme":
        nvme["weights"] = _weight_bytes(shape, s)  # every partition's swap file, all ranks
        swap = zero["offload_param"]
        host["swap buffers"] = swap["buffer_count"] * swap["buffer_size"] * e * ranks_here
    elif s.offload == "cpu":
        host["weights"] = weights * ranks_here
    else:
        gpu["weights"] = weights
    if adapter:
        gpu["adapter"] = adapter * 4
    if state:
        where["optimizer state"] = state * per_node

    # the step: a forward over K R sequences (and a hybrid backward over R)
    k, rows = groups(s), math.ceil(s.batch / W)
    forward_rows = k * rows
    positions = 1 if s.answer_tokens == 1 else s.answer_tokens + 1
    cpu_attention = CPU_ATTENTION_SCORES * forward_rows * shape.heads * s.seq**2 * 4 + CPU_FORWARD_FIXED
    step = {
        "activations": forward_rows * s.seq * (ACTIVATION_HIDDEN * shape.hidden
                                               + ACTIVATION_INTERMEDIATE * shape.intermediate) * e
        + (cpu_attention if s.device == "cpu" else 0),
        "logits": forward_rows * positions * shape.vocab * (e + 8),
    }
    if zero3:
        prefetch = zero.get("stage3_prefetch_bucket_size", 0)
        copies = GLOO_GATHER_COPIES if s.device == "cpu" and W > 1 else 1
        step["gathered parameters"] = copies * (shape.largest_module + min(prefetch, shape.block)) * e
    if s.perturb == "in_forward":
        step["perturbed copies"] = k * shape.largest_module * e
    if s.fo_layers:
        fo = shape.fo_parameters // (W if zero3 else 1)
        gpu["backprop optimizer state"] = fo * (16 if zero3 else 2 * e)
        if zero3:  # DeepSpeed reduce-scatters full-size gradients into its fp32 partitions
            step["backprop gradients"] = shape.fo_parameters * e
        else:  # kept from the backward to the next zero_grad; torch AdamW's foreach step adds one temporary
            gpu["backprop gradients"] = fo * e
            step["backprop update temporaries"] = fo * e
        step["backprop saved activations"] = int(
            rows * s.seq * s.fo_layers * (SAVED_HIDDEN * shape.hidden + SAVED_INTERMEDIATE * shape.intermediate) * e
            + rows * positions * shape.vocab * 8)
    for name, b in step.items():
        gpu[name] = int(b)
        phase[name] = "step"

    # the checkpoint save and the load
    full = s.tuning == "full"
    if zero3 and full:
        host["checkpoint save"] = 2 * shape.largest_parameter * e
    elif full:  # save_pretrained serialises one tensor at a time
        host["checkpoint save"] = shape.largest_parameter * e
    else:
        host["checkpoint save"] = adapter * 4
    phase["checkpoint save"] = "save"
    if not zero3 and s.device == "cuda" and s.quantization == "none":
        host["model load"] = _weight_bytes(shape, s) * ranks_here  # built or read on the CPU, then moved
        phase["model load"] = "load"
    if zero3:  # zero.Init: each parameter whole, then partitioned (transformers' init gathers module by module)
        (host if s.offload != "none" else gpu)["model build"] = ZERO3_BUILD_COPIES * shape.largest_parameter * e * (
            ranks_here if s.offload != "none" else 1)
        phase["model build"] = "load"

    # the runtime itself
    host["runtime"] = PROCESS_HOST_BYTES[s.mode] * ranks_here
    if s.device == "cuda":
        gpu["CUDA context"] = CUDA_CONTEXT_BYTES
    return plan


DS_CONFIGS = {"none": "zero3.json", "cpu": "zero3_offload_cpu.json", "nvme": "zero3_offload_nvme.json"}


def ds_config(s: RunSettings, shape: ModelShape, nvme_path: str = "/local_nvme") -> dict[str, Any] | None:
    """The DeepSpeed config of a zero3 plan (None otherwise): the repository's ds_configs file for
    the offload, precision set from the dtype, NVMe swap buffers fitted to the largest partition."""
    if s.mode != "zero3":
        return None
    text = (resources.files("zo_scale") / "configs" / "deepspeed" / DS_CONFIGS[s.offload]).read_text()
    cfg = copy.deepcopy(json.loads(text))
    cfg["bf16"] = {"enabled": s.dtype in ("bfloat16", "bf16")}
    cfg["fp16"] = {"enabled": s.dtype in ("float16", "fp16")}
    if s.offload == "nvme":
        offload = cfg["zero_optimization"]["offload_param"]
        offload["nvme_path"] = nvme_path
        given = offload["buffer_size"]
        offload["buffer_size"] = nvme_buffer_size(shape.largest_parameter, s.gpus, None if given == "auto" else given)
    return cfg


def nvme_buffer_size(largest_parameter: int, world: int, given: int | None = None) -> int:
    """Elements of each NVMe swap buffer (``zero_optimization.offload_param.buffer_size``) for a model whose
    largest parameter has ``largest_parameter`` elements, partitioned over ``world`` ranks.

    DeepSpeed swaps a parameter's whole partition into one buffer and asserts, as it partitions each
    parameter at start-up, that the partition fits (``AsyncPartitionedParameterSwapper.get_buffer``:
    ``numel <= buffer_size``). A partition is ceil(n / W) elements (the parameter padded to a multiple of
    W), so the largest parameter sets the size: LLaMA-2-7B's embedding (131M elements) overflows DeepSpeed's
    default of 1e8 on one rank. ``given`` (the config's number; None for "auto" or absent) is kept when it
    is large enough, else raised to the largest partition; "auto" starts from DeepSpeed's default, which
    only grows. One function for the planner (:func:`ds_config`) and the trainer
    (:func:`zo_scale.train.select_runtime.fit_swap_buffer`), so that the plan's swap buffers are the run's.
    """
    return max(DEEPSPEED_SWAP_BUFFER if given is None else given, -(-largest_parameter // world))
