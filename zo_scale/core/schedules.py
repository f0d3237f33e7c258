"""Learning-rate schedules as multipliers of the base lr, for ``torch.optim.lr_scheduler.LambdaLR``.

    warmup (t < w):   t / w                                  (linear ramp from 0)
    constant:         1
    linear:           (T - t) / (T - w)                      (to 0 at the last step T)
    cosine:           (1 + cos(pi (t - w) / (T - w))) / 2    (to 0 at T)
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(kind: str, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The multiplier of step t (0-based) for a run of ``total_steps`` steps."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; choose one of {SCHEDULES}")
    if not 0 <= warmup_steps < max(total_steps, 1):
        raise ValueError(f"warmup_steps must be in [0, total_steps), got {warmup_steps} of {total_steps}")

    def multiplier(t: int) -> float:
        if t < warmup_steps:
            return t / warmup_steps
        progress = (t - warmup_steps) / max(total_steps - warmup_steps, 1)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return multiplier
