"""The ZO fine-tuning recipe, top to bottom: config -> data -> model -> optimizer -> eval -> loop -> save.

Everything a step depends on is a function of (run seed, step): the batch (:class:`BatchOrder`) and
the perturbation directions (the optimizer's seed). So a run restarted from a checkpoint at step t
continues the uninterrupted trajectory exactly, and the seed log suffices to replay it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from zo_scale.backends.runtime import Runtime, quiet_unless_main
from zo_scale.core import kernel as sweep_kernel
from zo_scale.core import noise
from zo_scale.models import model_head
from zo_scale.models.sharded_safetensors import parse_size
from zo_scale.tasks import Task, get_task, sample_k_shot, sample_splits
from zo_scale.tasks.rewards import Reward, checked, load_reward
from zo_scale.train import seedlog
from zo_scale.train.build import in_forward_unsupported
from zo_scale.train.checkpoint import (
    check_checkpoint,
    commit_checkpoint,
    latest_checkpoint,
    load_trainer_state,
    stage_checkpoint,
    staging_dir,
    writing_checkpoint,
)
from zo_scale.train.config import Config, ConfigError
from zo_scale.train.metrics import MetricsLog, peak_memory, plot_metrics
from zo_scale.train.objectives import DECODING_LOSSES, Objective, RewardObjective, make_objective, task_loss
from zo_scale.train.run_optimizer import RunOptimizer
from zo_scale.train.select_runtime import make_runtime
from zo_scale.train.trackers import Trackers, check_trackers
from zo_scale.train.trainable import load_trainable

log = logging.getLogger("zo_scale")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why and what to try."""


class BatchOrder:
    """Step t's batch: positions [t B, (t + 1) B) of an endless sequence of seeded epoch permutations."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise ConfigError("task.num_train: the training split is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed

    @functools.lru_cache(maxsize=2)  # noqa: B019 - a step touches at most two epochs; one order per run
    def permutation(self, epoch: int) -> list[int]:
        perm = list(range(self.n))
        random.Random(noise.derive_seed(self.seed, epoch)).shuffle(perm)
        return perm

    def indices(self, step: int) -> list[int]:
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [self.permutation(p // self.n)[p % self.n] for p in positions]


# What fixes a run's trajectory: a resume may change anything else (e.g. run.steps, to train longer).
TRAJECTORY: dict[str, tuple[str, ...] | None] = {
    "model": None, "task": None, "optim": None, "peft": None, "hybrid": None, "run": ("seed", "batch_size"),
}


def _check(cfg: Config) -> None:
    for key in ("steps", "batch_size", "eval_batch_size", "log_every", "max_nonfinite"):
        if getattr(cfg.run, key) < 1:
            raise ConfigError(f"run.{key} must be >= 1, got {getattr(cfg.run, key)}")
    for key in ("save_every", "eval_every"):  # 0: only at the end (before and after, for eval)
        if getattr(cfg.run, key) < 0:
            raise ConfigError(f"run.{key} must be >= 0 (0: only at the end), got {getattr(cfg.run, key)}")
    if cfg.task.source not in ("files", "hub"):
        raise ConfigError(f"task.source: unknown {cfg.task.source!r}; choose files or hub")
    if cfg.task.k_shot < 0:
        raise ConfigError(f"task.k_shot must be >= 0 (0: num_train/num_dev instead), got {cfg.task.k_shot}")
    if cfg.task.num_eval == 0:
        raise ConfigError("task.num_eval=0: the run evaluates before and after training; give it at least 1 "
                          "example (-1: the whole eval split)")
    check_trackers(cfg.run.trackers)


def _check_task(cfg: Config, kind: str) -> None:
    try:
        cfg.task.loss = task_loss(kind, cfg.task.loss)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.task.loss in DECODING_LOSSES and (cfg.optim.estimator == "jvp" or cfg.hybrid.fo_layers):
        raise ConfigError(f"task.loss={cfg.task.loss} has no gradient: it cannot train by " +
                          ("optim.estimator=jvp" if cfg.optim.estimator == "jvp" else "backprop (hybrid.fo_layers)"))
    if (cfg.task.reward != "auto" or cfg.task.temperature) and kind != "reward":
        key = (f"task.reward={cfg.task.reward!r}" if cfg.task.reward != "auto" else
               f"task.temperature={cfg.task.temperature}")
        raise ConfigError(f"{key} applies to the continuations of a reward task; task {cfg.task.name} is a {kind} "
                          "task (train it by task.loss, or give a reward task)")


def _reward(cfg: Config, task: Task) -> Reward | None:
    """A reward task's reward, checked (:func:`~zo_scale.tasks.rewards.checked`); None for other tasks."""
    if task.kind != "reward":
        return None
    name = task.reward if cfg.task.reward == "auto" else cfg.task.reward
    if name is None:
        raise ConfigError(f"task {cfg.task.name} has no reward of its own: set task.reward (a built-in reward, or "
                          "module:function)")
    return checked(load_reward(name, [task.root] if task.root is not None else []), name)


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) the fine-tune described by ``cfg``; returns the summary also written to summary.json.

    Under a launcher every rank calls this; ``dist.*`` picks how they share the work (see
    :mod:`zo_scale.train.select_runtime`). Rank r takes rows [r B/W, (r+1) B/W) of each global batch
    of B = ``run.batch_size`` rows and 1/W of each evaluation; rank 0 alone writes files and logs.
    """
    _check(cfg)
    runtime = make_runtime(cfg)
    quiet_unless_main(runtime)
    summary = _train(cfg, runtime)
    runtime.close()
    return summary


def _train(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    out = Path(cfg.run.output_dir)
    main = runtime.is_main
    shard_bytes = parse_size(cfg.run.save_shard_size)
    torch.manual_seed(cfg.run.seed)
    reason = in_forward_unsupported(cfg, runtime.name)
    if reason is not None:  # recorded as what runs: config.yaml, the seed log and resumes say in_place
        log.warning("optim.perturb=in_forward cannot run here (%s): taking the in-place step", reason)
        cfg.optim.perturb = "in_place"

    # data: MeZO's protocol (or LM-BFF's k per class), in the prompts the model's head reads, tokenized once
    head = model_head(cfg.model.name)
    task = get_task(cfg.task.name)
    task = task.on_hub() if cfg.task.source == "hub" else task
    task = task.for_masked_lm() if head == "masked" else task
    _check_task(cfg, task.kind)  # and task.loss=auto becomes the loss it means, as config.yaml records it
    if cfg.task.k_shot:
        train_ex, dev_ex, eval_ex = sample_k_shot(task, cfg.task.k_shot, cfg.task.num_eval, cfg.run.seed,
                                                  cfg.task.data_dir)
    else:
        train_ex, dev_ex, eval_ex = sample_splits(
            task, cfg.task.num_train, cfg.task.num_dev, cfg.task.num_eval, cfg.run.seed, cfg.task.data_dir
        )
    if not eval_ex:
        raise ConfigError(f"task {cfg.task.name}: its eval split has no examples to evaluate on")
    if not train_ex:
        raise ConfigError(f"task {cfg.task.name}: no training examples (task.num_train={cfg.task.num_train})")
    if cfg.run.batch_size > len(train_ex):
        log.warning("run.batch_size=%d is larger than the %d training examples: every batch repeats each example "
                    "about %.1f times", cfg.run.batch_size, len(train_ex), cfg.run.batch_size / len(train_ex))

    # resume: a whole checkpoint fixes the weights and the step; it must continue this run's trajectory
    config_json = cfg.as_json()
    checkpoint_dir = out / "checkpoint"
    checkpoint = latest_checkpoint(checkpoint_dir)
    start, nonfinite_in_a_row, zero_shot, logged, log_kept = 0, 0, None, 0, 0
    if checkpoint is not None:
        state = check_checkpoint(checkpoint)  # a damaged file is named before the model loads
        defaults = Config().as_json()  # a checkpoint from before a key existed ran with its default
        defaults["optim"]["perturb"] = "in_place"  # the default before 'auto' (which a checkpoint never records)
        changed = [f"{s}.{k}" for s, keys in TRAJECTORY.items() for k in config_json[s]
                   if (keys is None or k in keys)
                   and state["config"].get(s, {}).get(k, defaults[s][k]) != config_json[s][k]]
        if changed:
            raise ConfigError(f"{checkpoint} was written with other values of {changed}; resuming would not continue "
                              f"that run (use a new run.output_dir)")
        start, nonfinite_in_a_row = state["step"], state["nonfinite_in_a_row"]
        zero_shot = state.get("zero_shot", state.get("zero_shot_accuracy"))  # the key's name until generation tasks
        # the seed log goes on from the checkpoint's step: checked now, changed only once the run is set up
        logged = RunOptimizer.logged_steps(checkpoint, start)
        log_kept = seedlog.check_resume(out / "seedlog.jsonl", logged)
        log.info("resuming from %s at step %d", checkpoint, start)

    trainable = load_trainable(cfg, runtime, checkpoint)
    model, tokenizer = trainable.model, trainable.tokenizer
    objective = make_objective(task.kind, tokenizer, head, cfg.task.loss, cfg.task.max_length, cfg.task.max_new_tokens,
                               _reward(cfg, task), cfg.task.temperature)
    train_enc, eval_enc = objective.encode(train_ex), objective.encode(eval_ex)
    dev_enc = objective.encode(dev_ex) if dev_ex else eval_enc
    headline = objective.metrics[0]
    batches = BatchOrder(len(train_enc), cfg.run.batch_size, cfg.run.seed)
    rows = cfg.run.batch_size // runtime.world_size  # select_runtime checked that it divides

    # ZO over what this run trains (weights, adapter or scales) on this rank's shards; FO over its last k blocks
    optimizer = RunOptimizer(trainable, cfg, runtime)
    if checkpoint is not None:
        optimizer.load(checkpoint, state["world_size"])
    metrics = None
    if main:  # the run directory appears only now that config, data and model are valid
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config_json, sort_keys=False))
        if runtime.deepspeed_config is not None:  # as DeepSpeed got it: "auto" filled, Trainer-owned keys set aside
            (out / "deepspeed_config.json").write_text(json.dumps(runtime.deepspeed_config, indent=2))
        seedlog.start_log(out / "seedlog.jsonl", config_json, logged, log_kept)
        trackers = Trackers(cfg.run.trackers, out.name, out / "trackers", config_json) if cfg.run.trackers else None
        metrics = MetricsLog(out / "metrics.jsonl", out / "tensorboard" if cfg.run.tensorboard else None,
                             keep_steps_upto=start, trackers=trackers)

    def evaluate(step: int, examples: list[Any], split: str) -> dict[str, float]:
        """Every metric of the objective (accuracy; or F1 and exact match for generation), logged."""
        with optimizer.reading():  # LOZO's pending windows are read through their correction, not folded
            values = distributed_metrics(objective, model, examples, cfg.run.eval_batch_size, runtime)
        if metrics is not None:
            metrics.log(step, "eval", **values, split=split, examples=len(examples))
        return values

    def save(step: int) -> None:
        with writing_checkpoint(checkpoint_dir, step):
            optimizer.flush()
            if main:
                stage_checkpoint(checkpoint_dir)
            runtime.barrier()
            staged = staging_dir(checkpoint_dir)  # every rank writes its part, streamed: no rank holds the model
            if trainable.kind != "adapter":  # an adapter is replicated on every rank: rank 0 saves it whole
                runtime.save_model(model, staged / trainable.folder, shard_bytes)
            optimizer.save(staged)
            runtime.barrier()
            if main:
                state = {"step": step, "nonfinite_in_a_row": nonfinite_in_a_row, "zero_shot": zero_shot,
                         "config": config_json, "world_size": runtime.world_size, "runtime": runtime.name}
                commit_checkpoint(checkpoint_dir, tokenizer, state, trainable.folder,
                                  adapter_model=model if trainable.kind == "adapter" else None)
        runtime.barrier()  # no rank goes on (or exits) before the checkpoint is whole

    # ZeRO-3 parameters are empty placeholders: ds_numel is their full size
    n_params = sum(getattr(p, "ds_numel", p.numel()) for _, p in trainable.named + trainable.fo_named)
    log.info("model %s (%s, %s trainable elements: %s), task %s: %d train / %d dev / %d eval examples; %s runtime, "
             "%d rank(s)", cfg.model.name, cfg.model.dtype, f"{n_params:,}", trainable.kind, cfg.task.name,
             len(train_enc), len(dev_ex), len(eval_enc), runtime.name, runtime.world_size)
    if start == 0:
        zero_shot = evaluate(0, eval_enc, "eval")[headline]
        log.info("zero-shot eval %s: %.1f%% (%d examples)", headline, 100 * zero_shot, len(eval_enc))

    window: list[float] = []
    tick, steps, moved, population = time.perf_counter(), 0, [0, 0, 0, 0], []  # since the last train log line
    bar = tqdm(range(start, cfg.run.steps), initial=start, total=cfg.run.steps, desc="zo", unit="step",
               disable=not (cfg.run.progress and main), dynamic_ncols=True)
    for t in bar:
        mine = batches.indices(t)[runtime.rank * rows : (runtime.rank + 1) * rows]
        closure = functools.partial(objective.loss, model, [train_enc[i] for i in mine])  # closure(groups=None)
        if isinstance(objective, RewardObjective):  # its rollouts' sampling seed: one a step, every point shares it
            closure = functools.partial(closure, seed=noise.derive_seed(cfg.run.seed, t, ROLLOUT_DRAW))

        before = _bytes_moved(runtime)
        loss = optimizer.step(closure)  # the loss is averaged over ranks: every branch below agrees
        steps, moved = steps + 1, [m + b - a for m, a, b in zip(moved, before, _bytes_moved(runtime), strict=True)]
        record = optimizer.last_record  # None for pure FO: nothing random to log
        if cfg.dist.check_seeds and record is not None:
            runtime.check_same(record.seed, f"the seed of step {t}")
        if main and record is not None:
            seedlog.append(out / "seedlog.jsonl", record)
        population += optimizer.last_losses  # the loss at each point the step evaluated: an ES population
        if math.isfinite(loss):
            nonfinite_in_a_row = 0
            window.append(loss)
        else:
            nonfinite_in_a_row += 1
            log.warning("step %d: non-finite loss, step skipped (%d in a row)", t, nonfinite_in_a_row)
            if nonfinite_in_a_row >= cfg.run.max_nonfinite:
                optimizer.flush()
                fp32 = "" if cfg.model.dtype in ("float32", "fp32") else ", or use model.dtype=float32"
                saved = latest_checkpoint(checkpoint_dir)
                kept = ("no checkpoint was written yet" if saved is None else
                        f"the last checkpoint ({saved}, step {load_trainer_state(saved)['step']}) is intact")
                raise TrainingError(
                    f"the loss was non-finite for {nonfinite_in_a_row} steps in a row (last at step {t}); "
                    f"lower optim.lr or optim.eps (hybrid.fo_lr for the backprop part){fp32}; {kept}."
                )
        if (t + 1) % cfg.run.log_every == 0 or t + 1 == cfg.run.steps:
            elapsed = time.perf_counter() - tick
            mean_loss = sum(window) / len(window) if window else float("nan")
            if metrics is not None:
                metrics.log(t + 1, "train", loss=mean_loss, **optimizer.lrs(),
                            steps_per_s=len(window) / elapsed if elapsed > 0 else 0.0,
                            skipped_total=optimizer.skipped_steps,
                            **{f"skipped_{part}_total": n for part, n in optimizer.skipped_by_part().items()},
                            **{f"{k}_bytes_per_step": m / steps for k, m in zip(BYTES_MOVED, moved, strict=True)},
                            **(_rewards(population) if task.kind == "reward" else {}))
            bar.set_postfix(loss=f"{mean_loss:.4f}", **{k: f"{v:.2e}" for k, v in optimizer.lrs().items()})
            window, tick, steps, moved, population = [], time.perf_counter(), 0, [0, 0, 0, 0], []
        if cfg.run.eval_every and (t + 1) % cfg.run.eval_every == 0 and t + 1 < cfg.run.steps:
            value = evaluate(t + 1, dev_enc, "dev" if dev_ex else "eval")[headline]
            if main:
                bar.write(f"step {t + 1}: {'dev' if dev_ex else 'eval'} {headline} {100 * value:.1f}%")
        if cfg.run.save_every and (t + 1) % cfg.run.save_every == 0:
            save(t + 1)
    bar.close()

    final = evaluate(cfg.run.steps, eval_enc, "eval")
    save(cfg.run.steps)
    # one collective: every rank's high-water marks and what ran its sweeps (a rank that lost its compiled
    # kernel shows here), on rank 0
    ranks = runtime.gather((peak_memory(), sweep_kernel.report()))
    peaks = [peak for peak, _ in ranks] if ranks is not None else None
    kernels = [ran for _, ran in ranks] if ranks is not None else None
    summary = {
        "metric": headline, f"zero_shot_{headline}": zero_shot, **{f"final_{m}": v for m, v in final.items()},
        "steps": cfg.run.steps,
        "eval_examples": len(eval_enc), "skipped_steps": optimizer.skipped_steps,
        "skipped_updates": optimizer.skipped_by_part() or {"zo": optimizer.skipped_steps},
        "output_dir": str(out), "model": str(checkpoint_dir / trainable.folder),
        "runtime": runtime.name, "world_size": runtime.world_size, "peak_memory_bytes": peaks,
        "sweep_kernel": kernels,
    }
    if metrics is not None:
        metrics.close()
        plot_metrics(out / "metrics.jsonl", out / "loss_curve.png",
                     f"ZO fine-tuning: {cfg.model.name} on {cfg.task.name} ({cfg.optim.rule}, {cfg.optim.sampler})",
                     headline)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# What a step moves, per rank, as metrics.jsonl logs it (<name>_bytes_per_step): the optimizers' own
# collectives, ZeRO-3's parameter all-gathers, NVMe offload's partition reads and writes.
BYTES_MOVED = ("comm", "gathered", "swapped", "stored")
ROLLOUT_DRAW = -7  # the tag of a step's seed for its rollouts' sampling (noise.derive_seed; samplers use -1 to -5)


def _rewards(population: list[float]) -> dict[str, float]:
    """The mean, best and worst mean reward of the points evaluated (the ES population's members; a reward
    objective's loss is minus the mean reward)."""
    finite = [-x for x in population if math.isfinite(x)]
    if not finite:
        return {}
    return {"reward_mean": sum(finite) / len(finite), "reward_max": max(finite), "reward_min": min(finite)}


def _bytes_moved(runtime: Runtime) -> tuple[int, int, int, int]:
    return runtime.comm_bytes, runtime.gathered_bytes, runtime.swapped_bytes, runtime.stored_bytes


def distributed_metrics(
    objective: Objective, model: torch.nn.Module, examples: list[Any], batch_size: int, runtime: Runtime
) -> dict[str, float]:
    """Every metric of ``objective``, averaged over ``examples``, rank r scoring examples r, r+W, r+2W, ...;
    a collective.

    Every rank runs the same number of forwards (ZeRO-3's gathers are collectives): ranks with one
    example fewer score a repeat of their first one and leave it out of the sums.
    """
    mine = examples[runtime.rank :: runtime.world_size]
    share = -(-len(examples) // runtime.world_size)
    values = objective.per_example(model, mine + mine[:1] * (share - len(mine)), batch_size)
    names = list(values)
    sums = runtime.sum([float(sum(values[name][: len(mine)])) for name in names])
    return {name: total / len(examples) for name, total in zip(names, sums, strict=True)}
