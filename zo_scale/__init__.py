"""zo-scale: zeroth-order (forward-only) fine-tuning of large language models.

The core (``zo_scale.core``) depends on torch alone; models, tasks and the trainer build on it.
"""

import logging

from zo_scale.core import noise
from zo_scale.core.aliases import (
    ARDD,
    FZOO,
    LOZO,
    LOZOM,
    ZOSGD,
    BlockZO,
    HiZOO,
    LeZO,
    SparseMeZO,
    SparseZO,
    ZOAdam,
    ZOConservative,
    ZOFineTuner,
    ZOSignSGD,
)
from zo_scale.core.directions import (
    BlockSampler,
    DenseSampler,
    LayerSubsetSampler,
    LowRankSampler,
    MagnitudeSampler,
    ScaledSampler,
    SparseSampler,
)
from zo_scale.core.estimators import Central, CentralCurvature, Forward, ForwardGradient, NormalizedForward, Unbiased
from zo_scale.core.learned_scales import ScaleLearner
from zo_scale.core.optimizer import StepRecord, ZOOptimizer
from zo_scale.core.updates import (
    SGD,
    AcceleratedDirectional,
    Adam,
    DiagonalHessian,
    LozoMomentum,
    Momentum,
    Sign,
    SignMomentum,
)

# peft imports bitsandbytes, which warns at import that an optional CPU kernel package ('kernels') is
# missing; its 4-bit matmul runs without it. Dropped, so that every command does not start with that line.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "gemm_4bit_forward" not in record.msg)

__all__ = [
    "ARDD", "AcceleratedDirectional", "Adam", "BlockSampler", "BlockZO", "Central", "CentralCurvature",
    "DenseSampler", "DiagonalHessian", "FZOO", "Forward", "ForwardGradient", "HiZOO", "LOZO", "LOZOM",
    "LayerSubsetSampler", "LeZO", "LowRankSampler", "LozoMomentum", "MagnitudeSampler", "Momentum",
    "NormalizedForward", "SGD", "ScaleLearner", "ScaledSampler", "Sign", "SignMomentum", "SparseMeZO",
    "SparseSampler", "SparseZO", "StepRecord", "Unbiased", "ZOAdam", "ZOConservative", "ZOFineTuner", "ZOOptimizer",
    "ZOSGD", "ZOSignSGD", "noise",
]
