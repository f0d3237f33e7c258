r"""Forward gradients: the exact directional derivative :math:`\nabla L(\theta) \cdot z` by forward-mode AD.

Instead of the finite difference (L(theta + eps z) - L(theta - eps z)) / (2 eps), one ``torch.func.jvp``
pass computes the loss and :math:`\nabla L \cdot z` together (Baydin et al. 2022, "Gradients without
backpropagation"): no eps, no truncation error, and one forward-mode pass instead of two forwards.

.. warning::
    It costs memory that the finite-difference estimators do not: the tangent z of every trained
    parameter is materialized (one more copy of the trained weights), and every activation carries
    a tangent (about twice the activation memory of a forward). Use it for small trained sets
    (adapters, a few layers) or for the quality of the estimate, not for full 70B models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


class _CallClosure(torch.nn.Module):
    """Holds the model as a submodule so ``functional_call`` can swap its parameters while
    ``closure`` (which calls the model) runs."""

    def __init__(self, model: torch.nn.Module, closure: Callable[[], Any]) -> None:
        super().__init__()
        self.model = model
        self.closure = closure

    def forward(self) -> torch.Tensor:
        loss = self.closure()
        return loss if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))


def loss_and_directional_derivative(
    model: torch.nn.Module, closure: Callable[[], Any], tangents: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """(L(theta), grad L(theta) . z) for the parameters named in ``tangents`` (names as in
    ``model.named_parameters()``; each tangent shaped like its parameter)."""
    wrapper = _CallClosure(model, closure)
    params = dict(model.named_parameters())
    unknown = set(tangents) - set(params)
    if unknown:
        raise KeyError(f"tangents for parameters the model does not have: {sorted(unknown)[:3]}")
    primals = {f"model.{n}": params[n].detach() for n in tangents}
    dual = {f"model.{n}": t for n, t in tangents.items()}

    def loss_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(wrapper, p, ())

    # forward-mode AD is independent of autograd, but functorch wants it on; fused attention kernels
    # (flash, memory-efficient) have no forward-AD rule, so attention runs as its math decomposition
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        loss, derivative = torch.func.jvp(loss_of, (primals,), (dual,))
    return float(loss), float(derivative)
