r"""Hybrid ZO-FO: the last k transformer blocks train by backprop (first order), the rest by ZO.

Backprop's memory cost is the activations autograd stores for the backward, from the first
parameter that requires a gradient onwards. Training only the last k blocks by backprop keeps that
to k blocks' worth (plus the head and the loss), while the ZO part moves the other L - k blocks at
inference memory. With theta = (theta_ZO, theta_FO), one step on a batch with loss L is

.. math::
    g_{FO} = \nabla_{\theta_{FO}} L(\theta), \qquad
    \hat g_{ZO} = \frac{L(\theta + \epsilon z) - L(\theta - \epsilon z)}{2\epsilon} z, \quad z \text{ on } \theta_{ZO}
    \text{ only}, \\
    \theta_{FO} \leftarrow \mathrm{fo}(\theta_{FO}, g_{FO}), \qquad
    \theta_{ZO} \leftarrow \mathrm{zo}(\theta_{ZO}, \hat g_{ZO})

Both estimates are taken at the same theta (a simultaneous update, not one after the other):

1. a lazy ZO optimizer's pending update lands (``zo.landing()``: with ``perturb="in_forward"`` inside the
   FO pass's forward, at each parameter's first use; else a flush before it, as a lazy in-place optimizer
   leaves the weights at theta - eps z);
2. FO pass at theta: one forward with autograd on and one backward (partial: it stops at the first
   FO block), gradients averaged over data-parallel ranks (:meth:`Runtime.fo_backward`);
3. ZO step: the pair theta +/- eps z_ZO (2 forwards, no autograd; with ``perturb="in_forward"`` one
   forward over the batch stacked twice, in which only the modules owning ZO parameters run their
   row groups with perturbed copies); the FO parameters are not in the ZO optimizer, so its noise
   never touches them;
4. FO update (``fo.step()``), gradients cleared.

So a hybrid step is 3 forwards + a partial backward (in_forward: 2 forwards, one of them over twice
the rows, so under ZeRO-3 the ZO step gathers the model once instead of twice). The FO pass is at
theta rather than reusing a ZO forward, which keeps k = all exactly pure FO (:math:`\nabla L(\theta)`,
1 forward + backward: no ZO optimizer at all) and k = 0 exactly pure ZO (no FO optimizer, no FO pass).

Which parameters are FO (:func:`split_fo_parameters`): among the trainable ones (``requires_grad``),
those in the last k blocks of the decoder's block list, the modules after it (the final norm, OPT's
``project_out``), and the LM head when it is *not* tied to the input embedding. A tied head is one
matrix that is also the input embedding: as FO it would need a gradient at the input, so autograd
would store activations from the first layer on, which is what the hybrid avoids; it stays ZO for
0 < k < L. k = L (or -1) makes every trainable parameter FO (embeddings too), k = 0 none.

``requires_grad``: the FO pass needs the ZO parameters frozen, or autograd would record the ZO
blocks as well. :class:`HybridOptimizer` sets ``requires_grad=False`` on them for the FO pass only and
restores it after (the ZO optimizer never reads ``.grad``), so the model's flags stay as the caller
set them and :func:`split_fo_parameters` gives the same split before and after. Parameters in
neither optimizer should be frozen by the caller (peft does this for an adapter's base).

Under ZeRO-3 the FO optimizer is DeepSpeed's (it owns the FO partitions): build the model with
``Zero3Runtime.load_model(load, fo_parameters=..., fo_optimizer_factory=...)`` and pass
``runtime.fo_optimizer``; see :mod:`zo_scale.backends.zero3`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from zo_scale.backends.runtime import Runtime
from zo_scale.core.optimizer import ZOOptimizer

NamedParams = list[tuple[str, nn.Parameter]]

# Children of the block list's parent that run after the last block: the final norm of OPT
# (final_layer_norm), LLaMA/Mistral (norm), GPT-2 style (ln_f), and OPT-350m's projection to the
# embedding width (project_out), which follows the final norm.
POST_BLOCK_MODULES = ("final_layer_norm", "norm", "ln_f", "final_layernorm", "project_out")
FO_OPTIMIZERS = ("adamw", "sgd")


# -- which parameters are FO ---------------------------------------------------------------------
def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks: (its qualified name, the ModuleList).

    Found generically, so wrappers (peft's ``base_model.model.``) need no special case: the longest
    ``nn.ModuleList`` of modules of one class that holds parameters and is not nested inside another
    such list (MoE experts are lists inside the blocks). OPT: ``model.decoder.layers``; LLaMA and
    Mistral: ``model.layers``. Raises ValueError (naming the model class) if there is none or the
    longest is ambiguous.
    """
    candidates = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1
        and any(True for _ in m.parameters())
    ]
    outer = [(n, m) for n, m in candidates if not any(n.startswith(o + ".") for o, _ in candidates if o != n)]
    if not outer:
        raise ValueError(f"{type(model).__name__}: found no list of transformer blocks (an nn.ModuleList of "
                         "modules of one class) to split into ZO and FO parts")
    longest = max(len(m) for _, m in outer)
    best = [(n, m) for n, m in outer if len(m) == longest]
    if len(best) > 1:
        raise ValueError(f"{type(model).__name__}: several block lists of length {longest} "
                         f"({', '.join(n for n, _ in best)}); cannot tell which one is the decoder")
    return best[0]


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def _head_tied(model: nn.Module) -> bool:
    """Whether the LM head's weight is the input embedding's (one Parameter, or one storage)."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    emb = get_in() if callable(get_in) else None
    if head is None or emb is None:
        return False
    a, b = head.weight, emb.weight
    # ZeRO-3 placeholders are empty (numel 0) and may share a data pointer, as do all meta tensors (0):
    # only identity counts there
    return a is b or (a.numel() > 0 and not a.is_meta and a.data_ptr() == b.data_ptr())


def split_fo_parameters(model: nn.Module, k: int) -> tuple[NamedParams, NamedParams]:
    """Split the trainable parameters of ``model`` into (fo_named, zo_named), both in module order.

    ``k``: how many of the L decoder blocks, counted from the last, train by backprop; 0 <= k <= L,
    or -1 for all. FO set for 0 < k < L: trainable parameters of blocks L-k..L-1, of the modules after
    the blocks (``POST_BLOCK_MODULES``) and of the LM head unless it is tied to the input embedding
    (see the module docstring). k = L or -1: every trainable parameter; k = 0: none.
    Raises ValueError for k outside [-1, L] or a model without a recognizable block list.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    name, blocks = decoder_blocks(model)
    n_blocks = len(blocks)
    if not isinstance(k, int) or k < -1 or k > n_blocks:
        raise ValueError(f"k must be in [0, {n_blocks}] ({type(model).__name__} has {n_blocks} blocks at {name}) "
                         f"or -1 for all, got {k!r}")
    if k in (-1, n_blocks):
        return trainable, []
    if k == 0:
        return [], trainable
    fo_modules: list[nn.Module] = list(blocks[n_blocks - k :])
    parent = _parent(model, name)
    fo_modules += [getattr(parent, m) for m in POST_BLOCK_MODULES if isinstance(getattr(parent, m, None), nn.Module)]
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None and not _head_tied(model):
        fo_modules.append(head)
    fo_ids = {id(p) for m in fo_modules for p in m.parameters()}
    return [(n, p) for n, p in trainable if id(p) in fo_ids], [(n, p) for n, p in trainable if id(p) not in fo_ids]


def make_fo_optimizer(
    named_params: Sequence[tuple[str, nn.Parameter]],
    name: str = "adamw",
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.0,
) -> torch.optim.Optimizer:
    """A torch optimizer over the FO parameters: ``torch.optim.AdamW`` (``betas``) or ``torch.optim.SGD``
    (``momentum``). Weight decay (decoupled for AdamW, L2 for SGD, as torch defines them) applies to
    matrices only, not to biases and norm weights (1-D), as in the ZO optimizers: with
    ``weight_decay > 0`` there are two param groups, decayed first."""
    if name not in FO_OPTIMIZERS:
        raise ValueError(f"unknown FO optimizer {name!r}; choose one of {FO_OPTIMIZERS}")
    if not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay: {weight_decay}")
    params = [p for _, p in named_params]
    if not params:
        raise ValueError("make_fo_optimizer: no FO parameters (k = 0 needs no FO optimizer)")
    groups: list[dict[str, Any]] = [{"params": params, "weight_decay": 0.0}]
    if weight_decay > 0.0:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


# -- the optimizer -------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """``requires_grad=False`` on ``params`` for the block, then each one's own flag back."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


class HybridOptimizer:
    """A ZO optimizer and an FO optimizer over disjoint parameters, stepped together on one batch.

    Args:
        zo: the :class:`ZOOptimizer` over the ZO parameters (None for pure FO, k = all).
        fo: a torch optimizer over the FO parameters (None for pure ZO, k = 0); under ZeRO-3,
            ``runtime.fo_optimizer`` (DeepSpeed's).
        fo_params: the FO parameters (under ZeRO-3 DeepSpeed's optimizer holds flat partitions instead
            of them, so they are passed explicitly).
        runtime: how ranks share the work (:mod:`zo_scale.backends`); one process by default. The ZO
            optimizer must have been built with ``runtime.optimizer_kwargs()``.

    ``step(loss_fn)``: ``loss_fn()`` returns the 0-dim loss of this rank's current batch at the
    current parameters; it is called once with autograd on (the FO pass) and 2 times under
    ``torch.no_grad()`` by the ZO optimizer (see the module docstring for the order); with a ZO
    optimizer of ``perturb="in_forward"`` the ZO step calls ``loss_fn(K)`` once instead, which returns
    the losses of the batch stacked K times, shape (K,) (:class:`ZOOptimizer`). Returns the
    loss at theta: the ZO estimate (mean of the pair, averaged over ranks) when there is a ZO part,
    else the FO loss (averaged over ranks). ``last_fo_loss`` keeps the FO pass's exact L(theta).

    A non-finite FO loss (on any rank) skips the FO update on every rank and counts in
    ``fo_skipped_steps``; the ZO optimizer skips its own update on a non-finite pair the same way
    (``zo.skipped_steps``), and then the FO update is skipped too (counted in ``fo_skipped_steps``):
    a pair that blew up says the step's batch or lr is unsound for the whole model, not for one part.
    So with an FO part, ``fo_skipped_steps`` counts the steps that changed nothing.
    """

    def __init__(
        self,
        zo: ZOOptimizer | None,
        fo: torch.optim.Optimizer | None,
        fo_params: Sequence[nn.Parameter],
        runtime: Runtime | None = None,
    ) -> None:
        if zo is None and fo is None:
            raise ValueError("HybridOptimizer needs a ZO optimizer, an FO optimizer, or both")
        fo_params = list(fo_params)
        if (fo is None) != (not fo_params):
            raise ValueError("fo_params must list the FO optimizer's parameters: non-empty exactly when fo is given")
        not_trainable = [i for i, p in enumerate(fo_params) if not p.requires_grad]
        if not_trainable:
            raise ValueError(f"FO parameters {not_trainable} (positions in fo_params) have requires_grad=False")
        self.zo, self.fo, self.fo_params = zo, fo, fo_params
        self.zo_params = [p for g in zo.param_groups for p in g["params"]] if zo is not None else []
        fo_ids = {id(p) for p in fo_params}
        if any(id(p) in fo_ids for p in self.zo_params):
            raise ValueError("a parameter is in both the ZO and the FO optimizer; split them with split_fo_parameters")
        self.runtime = runtime if runtime is not None else Runtime()
        self.step_count = 0
        self.fo_skipped_steps = 0
        self.last_fo_loss: float | None = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The ZO optimizer's param groups, then the FO optimizer's (edit their ``lr`` to schedule; a torch
        LRScheduler needs a torch Optimizer, so schedule ``zo`` and ``fo`` one by one)."""
        return [*(self.zo.param_groups if self.zo else []), *(self.fo.param_groups if self.fo else [])]

    def step(self, loss_fn: Callable[..., torch.Tensor]) -> float:
        """One hybrid step (see the class docstring); returns the loss at theta."""
        fo_loss = None
        if self.fo is not None:
            # ZO parameters frozen: autograd records from the first FO block on, nothing before it
            with frozen(self.zo_params):
                # the FO pass must see theta: the ZO update pending from the last step lands first (in this
                # forward itself where the ZO optimizer can, see ZOOptimizer.landing)
                with self.zo.landing() if self.zo is not None else contextlib.nullcontext():
                    loss = self.runtime.fo_forward(loss_fn)
                fo_loss = self.runtime.fo_backward(loss, self.fo_params)
            del loss  # the graph is consumed (or, if skipped, dropped here): free it before the ZO forwards
            self.last_fo_loss = fo_loss
        result = fo_loss
        if self.zo is not None:
            result = self.zo.step(loss_fn)  # the FO parameters are still at theta: both estimates agree on it
        if self.fo is not None:
            if math.isfinite(fo_loss) and math.isfinite(result):
                self.runtime.fo_step(self.fo)
            else:
                self.fo_skipped_steps += 1
                self.runtime.fo_zero_grad(self.fo)
        self.step_count += 1
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the FO gradients (``step`` already does; the ZO side has none)."""
        if self.fo is not None:
            self.fo.zero_grad(set_to_none=set_to_none)

    def flush(self) -> None:
        """Apply a lazy ZO optimizer's pending update (before evaluating or saving the model)."""
        if self.zo is not None:
            self.zo.flush()

    def state_dict(self) -> dict[str, Any]:
        """{"zo": the ZO state (flushed), "fo": the FO optimizer's state, "hybrid": counters}.

        Under ZeRO-3, "fo" is this rank's DeepSpeed ZeRO-3 optimizer state (its own partitioned format:
        resume with the same number of ranks).
        """
        return {
            "zo": self.zo.state_dict() if self.zo is not None else None,
            "fo": self.fo.state_dict() if self.fo is not None else None,
            "hybrid": {"step_count": self.step_count, "fo_skipped_steps": self.fo_skipped_steps},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore both optimizers and the counters; the state must come from the same split."""
        for key, opt in (("zo", self.zo), ("fo", self.fo)):
            if (state_dict.get(key) is None) != (opt is None):
                raise ValueError(f"state_dict {'has' if opt is None else 'lacks'} a {key!r} optimizer state, this "
                                 f"HybridOptimizer {'has none' if opt is None else 'has one'} (a different k?)")
        if self.zo is not None:
            self.zo.load_state_dict(state_dict["zo"])
        if self.fo is not None:
            self.fo.load_state_dict(state_dict["fo"])
        self.step_count = state_dict["hybrid"]["step_count"]
        self.fo_skipped_steps = state_dict["hybrid"]["fo_skipped_steps"]
