"""The optimizers of a run, stepped as one: ZO over ``trainable.named``, and for a hybrid run an FO
optimizer over ``trainable.fo_named`` (:class:`~zo_scale.train.hybrid.HybridOptimizer`).

Pure ZO (``hybrid.fo_layers=0``) is the ZO optimizer alone, exactly as before hybrid existed; pure FO
(``fo_layers=-1`` or the number of blocks) has no ZO optimizer. Both share the lr schedule's
multiplier: ZO's lr is ``optim.lr`` times it, FO's ``hybrid.fo_lr`` times it.

Checkpoint files (beside the model): ``optimizer.pt`` and ``optimizer_state.rank<r>.safetensors`` (ZO
state, each rank's per-element slices in its own file, see :mod:`zo_scale.train.sharded_state`) and
``schedule.pt`` as for pure ZO; a hybrid run adds the FO
state: ``fo_optimizer.pt`` (the torch optimizer's state dict, the same on every rank), or under
ZeRO-3 ``fo_optimizer.rank<r>.pt`` per rank (DeepSpeed's optimizer holds partitioned fp32 copies
and moments, in a layout tied to the number of ranks: such a run resumes on as many ranks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zo_scale.backends.runtime import Runtime
from zo_scale.core.optimizer import StepRecord, ZOOptimizer
from zo_scale.train import sharded_state
from zo_scale.train.build import build_optimizer, build_schedule
from zo_scale.train.checkpoint import torch_load
from zo_scale.train.config import Config, ConfigError
from zo_scale.train.trainable import Trainable, fo_optimizer_factory


class RunOptimizer:
    """``zo`` (None for pure FO) and ``fo`` (None for pure ZO), with their schedules.

    ``step(closure)`` returns the loss at theta (averaged over ranks); ``closure()`` is the loss of
    this rank's batch, called under no_grad by ZO and with autograd on for the FO pass.
    """

    def __init__(self, trainable: Trainable, cfg: Config, runtime: Runtime) -> None:
        from zo_scale.train.hybrid import HybridOptimizer

        self.runtime = runtime
        self.zo: ZOOptimizer | None = None
        self.schedules: list[torch.optim.lr_scheduler.LambdaLR] = []
        if trainable.named:
            self.zo, schedule = build_optimizer(trainable.named, cfg.optim, cfg.run.seed, cfg.run.steps,
                                                model=trainable.model, **runtime.optimizer_kwargs())
            self.schedules.append(schedule)
        self.fo: Any = None
        self.hybrid: HybridOptimizer | None = None
        if trainable.fo_named:
            # under ZeRO-3 DeepSpeed built it with the engine (it owns the FO partitions)
            engine_fo = getattr(runtime, "fo_optimizer", None)
            self.fo = engine_fo if engine_fo is not None else fo_optimizer_factory(cfg)(trainable.fo_named)
            # DeepSpeed's ZeRO-3 optimizer is no torch Optimizer; the torch one it wraps holds the lrs it reads
            torch_fo = self.fo if isinstance(self.fo, torch.optim.Optimizer) else self.fo.optimizer
            self.schedules.append(build_schedule(torch_fo, cfg.optim, cfg.run.steps))
            try:
                self.hybrid = HybridOptimizer(self.zo, self.fo, [p for _, p in trainable.fo_named], runtime)
            except ValueError as e:
                raise ConfigError(f"hybrid: {e}") from None

    @property
    def per_rank_fo_state(self) -> bool:
        """Whether the FO state is partitioned over ranks (ZeRO-3): one file per rank."""
        return self.fo is not None and not isinstance(self.fo, torch.optim.Optimizer)

    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        loss = self.hybrid.step(closure) if self.hybrid is not None else self.zo.step(closure)
        for schedule in self.schedules:
            schedule.step()
        return loss

    def flush(self) -> None:
        """Land a lazy ZO update (before evaluating or saving)."""
        if self.zo is not None:
            self.zo.flush()

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """The model at theta_t for an evaluation run within (:meth:`ZOOptimizer.reading`: LOZO's pending windows
        read, not folded); without a ZO part, nothing to land."""
        return self.zo.reading() if self.zo is not None else contextlib.nullcontext()

    @property
    def last_losses(self) -> list[float]:
        """The ZO step's loss at each point it evaluated, averaged over ranks ([] without a ZO part)."""
        return self.zo.last_losses if self.zo is not None else []

    @property
    def last_record(self) -> StepRecord | None:
        """The ZO step's record (the seed log's line); None without a ZO part."""
        return self.zo.last_record if self.zo is not None else None

    @property
    def skipped_steps(self) -> int:
        """Steps that changed nothing: a hybrid step skips its FO update whenever either part's losses are
        non-finite, so with an FO part these are its skips, else the ZO optimizer's."""
        return self.hybrid.fo_skipped_steps if self.hybrid is not None else self.zo.skipped_steps

    def skipped_by_part(self) -> dict[str, int]:
        """Skipped updates of each part of a hybrid run (``{"zo": n, "fo": m}``, the parts it has); {} for pure ZO."""
        if self.hybrid is None:
            return {}
        return {**({"zo": self.zo.skipped_steps} if self.zo is not None else {}), "fo": self.hybrid.fo_skipped_steps}

    def lrs(self) -> dict[str, float]:
        """The current lr of each part, as logged: ``lr`` (ZO) and ``fo_lr``."""
        out = {}
        if self.zo is not None:
            out["lr"] = self.zo.param_groups[0]["lr"]
        if self.fo is not None:
            out["fo_lr"] = self.fo.param_groups[0]["lr"]
        return out

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Write every part's state into ``folder``; every rank calls it and writes its own files (the ZO
        slices, DeepSpeed's per-rank FO state), rank 0 also the shared ones. No collective."""
        if self.zo is not None:
            sharded_state.save(self.zo, self.runtime, folder)
        if self.per_rank_fo_state:
            torch.save(self._fo_state(), folder / f"fo_optimizer.rank{self.runtime.rank}.pt")
        if self.runtime.is_main:
            torch.save(self.schedules[0].state_dict(), folder / "schedule.pt")
            if self.fo is not None and not self.per_rank_fo_state:
                torch.save(self._fo_state(), folder / "fo_optimizer.pt")

    def _fo_state(self) -> dict[str, Any]:
        assert self.hybrid is not None
        return {"optimizer": self.fo.state_dict(), "schedule": self.schedules[-1].state_dict(),
                "fo_skipped_steps": self.hybrid.fo_skipped_steps, "step_count": self.hybrid.step_count}

    @staticmethod
    def logged_steps(checkpoint: Path, step: int) -> int:
        """How many seed-log records the run had written by ``checkpoint`` (of step ``step``): one a step when
        it has a ZO part (whose state the checkpoint holds), none for pure FO."""
        return step if (checkpoint / sharded_state.STATE_FILE).is_file() else 0

    def load(self, checkpoint: Path, saved_world_size: int) -> None:
        """Restore every part from ``checkpoint`` (written by a run with the same optimizers)."""
        if self.zo is not None:
            sharded_state.load(self.zo, checkpoint)
        self.schedules[0].load_state_dict(torch_load(checkpoint / "schedule.pt", checkpoint))
        if self.fo is None:
            return
        if any(checkpoint.glob("fo_optimizer.rank*.pt")) != self.per_rank_fo_state:
            raise ConfigError(f"{checkpoint} holds the FO optimizer state of a hybrid run "
                              f"{'under' if not self.per_rank_fo_state else 'outside'} ZeRO-3 (DeepSpeed's is "
                              "partitioned per rank, torch's is not); resume it in the runtime that wrote it")
        if self.per_rank_fo_state:
            if saved_world_size != self.runtime.world_size:
                raise ConfigError(f"{checkpoint} holds DeepSpeed's FO optimizer state partitioned over "
                                  f"{saved_world_size} ranks; resume this hybrid ZeRO-3 run on {saved_world_size} "
                                  f"ranks, not {self.runtime.world_size}")
            path = checkpoint / f"fo_optimizer.rank{self.runtime.rank}.pt"
        else:
            path = checkpoint / "fo_optimizer.pt"
        allowed = []
        if self.per_rank_fo_state:  # DeepSpeed's state holds its ZeRO stage (an enum) and loss scaler: allowed
            from deepspeed.runtime.fp16.loss_scaler import LossScaler
            from deepspeed.runtime.zero.config import ZeroStageEnum

            allowed += [ZeroStageEnum, LossScaler]
        with torch.serialization.safe_globals(allowed):
            state = torch_load(path, checkpoint)
        if self.per_rank_fo_state:  # DeepSpeed's ZeRO-3 optimizer takes every rank's state and picks its own
            states = [None] * self.runtime.world_size
            states[self.runtime.rank] = state["optimizer"]
            self.fo.load_state_dict(states)
        else:
            self.fo.load_state_dict(state["optimizer"])
        self.schedules[-1].load_state_dict(state["schedule"])
        assert self.hybrid is not None
        self.hybrid.fo_skipped_steps, self.hybrid.step_count = state["fo_skipped_steps"], state["step_count"]
