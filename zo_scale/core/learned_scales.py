r"""Learning ZO Fine-tuner's perturbation scales: one meta-training run per base model, reused across tasks.

ZO Fine-tuner (Zhang et al. 2025, arXiv 2510.00419) perturbs tensor p along z_p = c s_p u_p
(:class:`~zo_scale.core.directions.ScaledSampler`) and learns the scales by asking what one ZO step
with them does to the loss. One meta-step on a batch, with u the step's seeded noise:

.. math::
    z_p = c\,s_p u_p, \quad g = \frac{L(\theta + \epsilon z) - L(\theta - \epsilon z)}{2\epsilon}, \quad
    \theta' = \theta - \eta\, g\, z, \quad m = L(\theta'),

    \frac{\partial m}{\partial \log s_p} = -\eta\, g\, c\, s_p \,\langle \nabla_p L(\theta'), u_p \rangle

(exact given g and c held fixed, as the paper's code does: theta' depends on s_p only through z_p). So a
meta-step is two forwards and one forward-backward at theta'; log s takes an Adam step on that gradient.
Between meta-steps the model moves along a first-order trajectory (SGD with momentum on the gradient
at theta', clipped), reset to the start every ``restart_every`` steps, so that the scales are learned
over the states a fine-tune passes through, as the paper's code does.

Where zo-scale departs from the paper: the learned object is one log-scale per tensor trained by Adam,
where the paper trains a small network per tensor (inputs: the tensor's weight mean and variance, the last
step's two losses, its last output) by SGD; so the scales here are constant through a fine-tune. Memory:
the meta-training holds two copies of the weights (theta and the start), the gradients and the momentum:
5 model sizes, for models that fit with backprop; the scales it writes are what large runs load.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from zo_scale.core import noise
from zo_scale.core.shards import canonical_name, stream_id


class ScaleLearner:
    """Meta-trains one perturbation scale per parameter tensor (see the module docstring).

    ``params``: (name, parameter) pairs, the tensors a fine-tune will perturb. ``eps``: the ZO step's eps.
    ``zo_lr``: eta, the lr of the ZO step the scales are judged by. ``lr``: Adam's on log s.
    ``base_lr``, ``base_momentum``, ``max_grad_norm``: the first-order trajectory (0 keeps theta at its
    start). ``restart_every``: steps between resets of theta to its start (0: never). The closure
    returns the batch's loss as a 0-dim tensor and is called under no_grad for the two points and with
    grad for the meta-loss.
    """

    def __init__(self, params: Iterable[tuple[str, torch.Tensor]], eps: float = 1e-3, zo_lr: float = 1e-6,
                 lr: float = 1e-2, base_lr: float = 1e-2, base_momentum: float = 0.8, max_grad_norm: float = 1.0,
                 restart_every: int = 0, seed: int = 0, kind: str = "normal") -> None:
        self.named = [(canonical_name(n), p) for n, p in params]
        if not self.named:
            raise ValueError("ScaleLearner needs at least one parameter")
        for name, value in {"eps": eps, "zo_lr": zo_lr, "lr": lr}.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if base_lr < 0 or not 0 <= base_momentum < 1 or max_grad_norm <= 0 or restart_every < 0:
            raise ValueError(f"base_lr >= 0, 0 <= base_momentum < 1, max_grad_norm > 0 and restart_every >= 0; got "
                             f"{base_lr}, {base_momentum}, {max_grad_norm}, {restart_every}")
        self.eps, self.zo_lr, self.base_lr, self.base_momentum = eps, zo_lr, base_lr, base_momentum
        self.max_grad_norm, self.restart_every, self.seed, self.kind = max_grad_norm, restart_every, seed, kind
        self.log_scales = torch.zeros(len(self.named), dtype=torch.float64, requires_grad=True)
        self.meta_optimizer = torch.optim.Adam([self.log_scales], lr=lr)
        self.sizes = torch.tensor([p.numel() for _, p in self.named], dtype=torch.float64)
        self.start = [p.detach().clone() for _, p in self.named]
        self.theta = [p.detach().clone() for _, p in self.named]
        self.momentum = [torch.zeros_like(p) for _, p in self.named]
        self.step_count = 0

    def scales(self) -> dict[str, float]:
        """c s_p by name: the normalized scales (sum_p d_p (c s_p)^2 = sum_p d_p), as a ScaledSampler uses them."""
        return dict(zip((n for n, _ in self.named), self._normalized().tolist(), strict=True))

    def _normalized(self) -> torch.Tensor:
        s = self.log_scales.detach().exp()
        return s * torch.sqrt(self.sizes.sum() / (self.sizes * s * s).sum())

    # u and the points come from add_noise_: one fused sweep per tensor (a compiled kernel), where
    # generating u eagerly costs seconds per 10^8 elements
    def _u(self, i: int, seed: int) -> torch.Tensor:
        name, p = self.named[i]
        u = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        return noise.add_noise_(u, self.kind, seed, stream_id(name), 0, 1.0).view_as(p)

    def _set(self, coefficient: float, seed: int, cs: torch.Tensor) -> None:
        """theta + coefficient * z into the parameters, from the kept theta (no drift from round trips)."""
        for i, (name, p) in enumerate(self.named):
            p.data.copy_(self.theta[i])
            noise.add_noise_(p.data.view(-1), self.kind, seed, stream_id(name), 0, coefficient * float(cs[i]))

    def step(self, closure: Callable[[], torch.Tensor]) -> dict[str, float]:
        """One meta-step; returns the step's losses: ``loss`` (the mean of the two points), ``meta_loss``
        (at theta'), ``grad`` (g)."""
        seed = noise.derive_seed(self.seed, self.step_count)
        cs = self._normalized()
        with torch.no_grad():
            self._set(self.eps, seed, cs)
            plus = float(closure())
            self._set(-self.eps, seed, cs)
            minus = float(closure())
            g = (plus - minus) / (2 * self.eps)
            self._set(-self.zo_lr * g, seed, cs)
        for _, p in self.named:
            p.grad = None
        with torch.enable_grad():
            meta_loss = closure()
            meta_loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in self.named]
        with torch.no_grad():
            projections = torch.tensor([float(torch.dot(grads[i].view(-1).float(), self._u(i, seed).view(-1).float()))
                                        for i in range(len(self.named))], dtype=torch.float64)
            self.log_scales.grad = -self.zo_lr * g * cs * projections
        self.meta_optimizer.step()
        self._base_step(grads)
        return {"loss": (plus + minus) / 2, "meta_loss": float(meta_loss.detach()), "grad": g}

    @torch.no_grad()
    def _base_step(self, grads: list[torch.Tensor]) -> None:
        norm = math.sqrt(sum(float(gr.double().pow(2).sum()) for gr in grads))
        clip = min(1.0, self.max_grad_norm / (norm + 1e-12))
        self.step_count += 1
        restart = self.restart_every and self.step_count % self.restart_every == 0
        for i, (_, p) in enumerate(self.named):
            if restart:
                self.theta[i].copy_(self.start[i])
                self.momentum[i].zero_()
            else:
                self.momentum[i].mul_(self.base_momentum).add_(grads[i], alpha=clip)
                self.theta[i].add_(self.momentum[i], alpha=-self.base_lr)
            p.data.copy_(self.theta[i])
            p.grad = None
