"""What the ZeRO-3 equivalence test runs, shared by its ranks (zero3_worker.py) and its 1-process reference.

No DeepSpeed import here: the reference side runs without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

import zo_scale
from zo_scale.models.tiny import build_tiny_model

BATCH, SEQ, SEED = 4, 16, 7
# batching 'persist' is 'split' with this stage3_param_persistence_threshold: DeepSpeed keeps the tiny
# models' norms and biases (<= 256 elements) whole on every rank, and partitions the matrices
PERSISTENCE_THRESHOLD = 1000

# name -> build_tiny_model(arch, seed=0, **overrides). 'opt-odd' has odd numels (45, 45*127, 259*45, ...):
# with 2 ranks the last partition of each such parameter ends in one padding element.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "opt": ("opt", {}),
    "llama": ("llama", {}),
    "opt-odd": ("opt", {"hidden_size": 45, "num_attention_heads": 3, "ffn_dim": 127}),
}


def build_model(name: str) -> torch.nn.Module:
    arch, overrides = MODELS[name]
    return build_tiny_model(arch, seed=0, **overrides)


def fixed_batch() -> torch.Tensor:
    """The (BATCH, SEQ) token ids every run uses: byte tokens (no special ones), no padding, so every
    row has the same number of target tokens and the mean of per-rank mean losses is the batch mean."""
    return torch.randint(3, 259, (BATCH, SEQ), generator=torch.Generator().manual_seed(1234))


def make_optimizer(name: str, named_params: Iterable[tuple[str, torch.nn.Parameter]],
                   **kwargs: Any) -> zo_scale.ZOOptimizer:
    """The optimizers under test, by name."""
    if name == "zosgd":
        return zo_scale.ZOSGD(named_params, lr=1e-3, eps=1e-3, seed=SEED, **kwargs)
    if name == "lozo":  # low-rank z: slices of U V^T that start mid-row at partition boundaries
        return zo_scale.LOZO(named_params, lr=1e-3, eps=1e-3, rank=2, nu=3, seed=SEED, **kwargs)
    if name == "hizoo":  # the diagonal Hessian per partition, read by the perturbation and written by the update
        return zo_scale.HiZOO(named_params, lr=1e-3, eps=1e-2, alpha=0.01, seed=SEED, **kwargs)
    if name == "zoadam-lazy":  # per-shard Adam buffers, lazy fused sweeps
        return zo_scale.ZOAdam(named_params, lr=1e-3, eps=1e-3, lazy=True, seed=SEED, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}")
