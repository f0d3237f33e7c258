"""zo-scale: zeroth-order (forward-only) fine-tuning of large language models.

The core (``zo_scale.core``) depends on torch alone; models, tasks and the trainer build on it.
"""

from zo_scale.core import noise
from zo_scale.core.aliases import LOZO, LOZOM, ZOSGD, BlockZO, SparseZO, ZOAdam, ZOConservative, ZOSignSGD
from zo_scale.core.directions import BlockSampler, DenseSampler, LowRankSampler, SparseSampler
from zo_scale.core.optimizer import StepRecord, ZOOptimizer
from zo_scale.core.updates import SGD, Adam, LozoMomentum, Momentum, Sign

__all__ = [
    "LOZO", "LOZOM", "SGD", "Adam", "BlockSampler", "BlockZO", "DenseSampler", "LowRankSampler", "LozoMomentum",
    "Momentum", "Sign", "SparseSampler", "SparseZO", "StepRecord", "ZOAdam", "ZOConservative", "ZOOptimizer", "ZOSGD",
    "ZOSignSGD", "noise",
]
