"""One fused read-modify-write pass over a parameter: restore, update and perturb in a single sweep.

The published MeZO step walks all parameters four times (+eps, -2eps, +eps, update), generating z
each time. A sweep applies any list of moves to each chunk while it is in cache, generating each
direction's chunk once, in this order per element:

    theta += sum_(d, c) in before   c * z_d      # e.g. +eps * z_t: back from theta - eps z_t
    theta  = rule(theta, sum_i w_i z_i, state)  # the update of step t
    theta += sum_(d, c) in after    c * z_d      # e.g. +eps * z_(t+1): step t+1's first point

These are the same per-element operations, in the same order, as the unfused passes, so the fused
result equals the reference bit for bit (``tests/core/test_fused_step.py``).

With an fp32 master copy (for bf16/fp16 weights) the shard is never moved by increments: the update
goes into the master, and the shard is set to the master plus the perturbation it should carry
after the sweep, rounded once,

    master = rule(master, sum_i w_i z_i, state);   theta = round(master + sum_(d, c) in offsets c * z_d)

so the +eps / -2eps / +eps round trip returns exactly to round(master) instead of drifting by a
rounding error per move.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zo_scale.core.directions import Direction
from zo_scale.core.noise import CHUNK
from zo_scale.core.shards import ParamShard
from zo_scale.core.updates import UpdateRule, decay_

Moves = Sequence[tuple[Direction, float]]  # [(direction, coefficient)]: theta += coefficient * z


@dataclass
class Update:
    """The update of one step: rule applied with g_hat = sum_i weight_i * z_i."""

    rule: UpdateRule
    weights: Moves
    lr: float
    weight_decay: float


def _move_(theta: torch.Tensor, z: dict[int, torch.Tensor | None], moves: Moves) -> None:
    for d, c in moves:
        if z[id(d)] is not None:
            theta.add_(z[id(d)], alpha=c)


def sweep_shard(
    shard: ParamShard,
    before: Moves = (),
    update: Update | None = None,
    after: Moves = (),
    state: dict[str, torch.Tensor] | None = None,
    master: torch.Tensor | None = None,
    offsets: Moves = (),
) -> bool:
    """Apply ``before``, ``update`` and ``after`` to one shard in one pass. Returns whether the
    update touched this shard (False where every update direction is zero on it, e.g. other blocks).

    ``state`` holds the rule's flat buffers (same numel as ``shard.flat``) and its 0-dim ``step``.
    ``master``: an fp32 copy of the unperturbed shard (same numel); then ``before`` / ``after`` are
    ignored and ``offsets`` (the perturbation the shard carries after this sweep) is used instead.
    """
    rule_moves = update.rule.prepare(shard, update.weights, state, update.lr) if update is not None else None
    moves = (*before, *after, *offsets, *(update.weights if update else ()), *(rule_moves or ()))
    directions = {id(d): d for d, _ in moves}
    updated = False
    step = int(state["step"]) + 1 if state is not None and "step" in state else 1
    for s in range(0, shard.flat.numel(), CHUNK):
        n = min(CHUNK, shard.flat.numel() - s)
        z = {key: d.z(shard, shard.offset + s, n) for key, d in directions.items()}
        theta = shard.flat[s : s + n] if master is None else master[s : s + n]
        if master is None:
            _move_(theta, z, before)
        if update is not None:
            weight_decay = update.weight_decay if shard.decays else 0.0
            zs = [(z[id(d)], w) for d, w in update.weights if z[id(d)] is not None]
            if rule_moves is not None:
                decay_(theta, update.lr, weight_decay)
                _move_(theta, z, rule_moves)
                updated = True
            elif zs:
                chunk_state = {b: state[b][s : s + n] for b in update.rule.buffers if b in state} if state else {}
                update.rule.apply_(theta, zs, chunk_state, update.lr, weight_decay, step)
                updated = True
        if master is None:
            _move_(theta, z, after)
        else:
            perturbed = theta.clone()
            _move_(perturbed, z, offsets)
            shard.flat[s : s + n].copy_(perturbed)
    if updated and state is not None and "step" in state:
        state["step"] += 1
    return updated
