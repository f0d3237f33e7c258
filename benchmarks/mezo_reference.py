"""The published MeZO step (Malladi et al. 2023, arXiv 2305.17333, its trainer's ``zo_step`` and
``zo_update``), written from the paper's Algorithm 1 as a baseline for the benchmarks: four passes
over the trained parameters, each regenerating z ~ N(0, I) with ``torch.normal`` from a generator
reseeded with the step's seed, in the parameters' dtype:

    theta += eps z;  l+ = L(theta);  theta -= 2 eps z;  l- = L(theta);  theta += eps z
    g = (l+ - l-) / (2 eps);  theta <- theta - lr (g z + wd theta)   (wd skipped for biases and norms)

zo-scale's ZO-SGD takes the same update with fused passes and counter-based noise; this one is the
yardstick it is timed (``step_time.py``) and scored (``quality_table.py``) against. Departs from the
published code in three places: its own ``torch.Generator`` instead of the global RNG; the seed
derived from the run seed and the step instead of drawn from NumPy; and the passes in place
(``add_``; the published ones allocate a new tensor per parameter per pass, which is slower).

:func:`trainer_with_mezo_step` runs zo-scale's trainer (same data, batches, schedule, evaluation and
logs) with this step in place of the ZO optimizer's.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from zo_scale.core import noise
from zo_scale.train import loop
from zo_scale.train.run_optimizer import RunOptimizer


class MeZOReference:
    """MeZO-SGD over ``model``'s trainable parameters; ``step(closure)`` returns (l+ + l-) / 2."""

    def __init__(self, model: torch.nn.Module, lr: float, eps: float, seed: int = 0,
                 weight_decay: float = 0.0) -> None:
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.lr, self.eps, self.seed, self.weight_decay = lr, eps, seed, weight_decay
        self.generator = torch.Generator()
        self.step_count = 0

    def _noise(self, seed: int) -> Iterator[tuple[str, torch.nn.Parameter, torch.Tensor]]:
        self.generator.manual_seed(seed)
        for name, p in self.named:
            yield name, p, torch.normal(0.0, 1.0, size=p.shape, generator=self.generator, dtype=p.dtype)

    def _perturb(self, seed: int, scale: float) -> None:
        for _, p, z in self._noise(seed):
            p.data.add_(z, alpha=scale * self.eps)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        seed = noise.derive_seed(self.seed, self.step_count)
        self._perturb(seed, +1)
        loss_plus = float(closure())
        self._perturb(seed, -2)
        loss_minus = float(closure())
        self._perturb(seed, +1)
        projected_grad = (loss_plus - loss_minus) / (2 * self.eps)
        for name, p, z in self._noise(seed):
            if self.weight_decay and not ("bias" in name or "norm" in name):
                p.data.mul_(1 - self.lr * self.weight_decay)
            p.data.add_(z, alpha=-self.lr * projected_grad)
        self.step_count += 1
        return (loss_plus + loss_minus) / 2


class _MeZOStepRunOptimizer(RunOptimizer):
    """The run's optimizers with the ZO step replaced by :class:`MeZOReference` at the scheduled lr.
    The ZO optimizer is still built (its config checks, lr schedule and checkpoint files) but never steps."""

    def __init__(self, trainable: Any, cfg: Any, runtime: Any) -> None:
        super().__init__(trainable, cfg, runtime)
        if self.zo is None or self.hybrid is not None or runtime.world_size != 1:
            raise ValueError("the MeZO reference step is pure ZO in one process")
        self.reference = MeZOReference(trainable.model, cfg.optim.lr, cfg.optim.eps, cfg.run.seed,
                                       cfg.optim.weight_decay)

    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        self.reference.lr = self.zo.param_groups[0]["lr"]
        loss = self.reference.step(closure)
        with warnings.catch_warnings():  # the ZO optimizer, never stepped, makes torch warn of the call order
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            for schedule in self.schedules:
                schedule.step()
        return loss


@contextlib.contextmanager
def trainer_with_mezo_step() -> Iterator[None]:
    """Within it, ``zo_scale.train.loop.train`` steps with the published MeZO step (one process, pure ZO)."""
    original = loop.RunOptimizer
    loop.RunOptimizer = _MeZOStepRunOptimizer
    try:
        yield
    finally:
        loop.RunOptimizer = original
