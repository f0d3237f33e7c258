"""The ``zo-scale`` command: ``train``, ``demo``, ``replay``, ``plan``, ``mezo`` and ``learn-scales``.

    zo-scale train --config my.yaml optim.lr=1e-6 run.steps=1000
    zo-scale train --config my.yaml --fo-layers 2 hybrid.fo_lr=1e-5   # last 2 blocks by backprop
    zo-scale demo                       # SmolLM2-135M on an SST-2 sample, zero-shot vs fine-tuned
    zo-scale replay runs/x/seedlog.jsonl runs/x/replayed   # rebuild the weights from the seed log
    zo-scale plan --model llama-2-70b --mode zero3 --offload cpu --gpus 8 --gpu-memory 80   # memory per GPU
    zo-scale mezo --task_name SST2 --trainer zo --learning_rate 1e-6 ...   # MeZO's run.py flags (--dry-run: map only)
    zo-scale learn-scales task.name=copa run.steps=300   # ZO Fine-tuner's scales, then train optim.scales=<file>

Under a launcher, ``launch/train.py`` is ``zo-scale train``; it also takes the flags launchers add:

    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json --config my.yaml
    torchrun --nproc_per_node 2 launch/train.py --config my.yaml        # replicated data parallel
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml launch/train.py --config my.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from importlib import resources
from pathlib import Path

import yaml

from zo_scale.core.kernel import KernelCompileError
from zo_scale.models import ModelLoadError
from zo_scale.plan.report import add_arguments as add_plan_arguments
from zo_scale.plan.report import run as run_plan
from zo_scale.tasks import TaskDataError
from zo_scale.train.checkpoint import CheckpointWriteError
from zo_scale.train.config import ConfigError, load_config
from zo_scale.train.learn_scales import learn_scales
from zo_scale.train.loop import TrainingError, train
from zo_scale.train.mezo_flags import describe, mezo_overrides
from zo_scale.train.seedlog import replay
from zo_scale.train.select_runtime import is_main_process

DEMO_CONFIG = resources.files("zo_scale") / "configs" / "demo.yaml"
# ImportError: an optional extra the config asks for is missing (the message names the pip command)
# a sweep kernel that cannot compile on an accelerator is named in one line too: its fix is a setting
USER_ERRORS = (ConfigError, TaskDataError, ModelLoadError, TrainingError, CheckpointWriteError, FileNotFoundError,
               ValueError, ImportError, KernelCompileError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zo-scale", description="Zeroth-order fine-tuning of causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="fine-tune with a YAML config and section.key=value overrides")
    p_train.add_argument("--config", type=Path, help="YAML with sections model, task, optim, run")
    p_train.add_argument("--deepspeed", metavar="JSON", help="DeepSpeed config (same as dist.deepspeed_config=JSON)")
    p_train.add_argument("--fo-layers", type=int, metavar="K",
                         help="hybrid ZO-FO: the last K blocks train by backprop, -1 all (same as hybrid.fo_layers=K)")
    p_train.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by `deepspeed`
    p_train.add_argument("overrides", nargs="*", help="e.g. optim.lr=1e-6 run.steps=500")
    p_learn = sub.add_parser("learn-scales", help="meta-train ZO Fine-tuner's per-tensor perturbation scales for a "
                             "base model (then: zo-scale train optim.scales=<the file>)")
    p_learn.add_argument("--config", type=Path, help="YAML with sections model, task, optim, meta, run")
    p_learn.add_argument("overrides", nargs="*", help="e.g. task.name=copa run.steps=300 meta.lr=1e-2")
    p_demo = sub.add_parser("demo", help="ZO fine-tune SmolLM2-135M on an SST-2 sample (~10 min on 2 CPU cores)")
    p_demo.add_argument("overrides", nargs="*")
    p_replay = sub.add_parser("replay", help="rebuild fine-tuned weights from the base model and a seed log")
    p_replay.add_argument("log", type=Path)
    p_replay.add_argument("output", type=Path)
    p_plan = sub.add_parser("plan", help="peak memory per GPU, host RAM and NVMe of a run, from the model's config")
    add_plan_arguments(p_plan)
    p_mezo = sub.add_parser("mezo", help="run a MeZO run.py command line (its flags mapped onto a config)")
    p_mezo.add_argument("--dry-run", action="store_true", help="print the mapped config and stop; every other flag "
                        "is MeZO's, e.g. --task_name SST2 --zo_eps 1e-3")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # a MeZO command line's flags are its own
    if extra and args.command != "mezo":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        if args.command == "plan":
            return run_plan(args)
        if args.command == "replay":
            print(f"replayed weights written to {replay(args.log, args.output)}")
            return 0
        if args.command == "mezo":
            return _mezo(extra, args.dry_run)
        if args.command == "learn-scales":
            learned = learn_scales(load_config(args.config, args.overrides))
            low, high = learned["scale_range"]
            print(f"perturbation scales of {learned['tensors']} tensors ({low:.3g} to {high:.3g}) written to "
                  f"{learned['scales_file']}; meta-loss {learned['first_meta_loss']:.4f} -> "
                  f"{learned['last_meta_loss']:.4f} over {learned['steps']} steps")
            return 0
        config_path = DEMO_CONFIG if args.command == "demo" else args.config
        overrides = list(args.overrides)
        if getattr(args, "deepspeed", None):
            overrides.append(f"dist.deepspeed_config={args.deepspeed}")
        if getattr(args, "fo_layers", None) is not None:
            overrides.append(f"hybrid.fo_layers={args.fo_layers}")
        summary = train(load_config(config_path, overrides))
    except USER_ERRORS as e:
        _report_error(e)
        return 2
    if summary["world_size"] > 1:
        if is_main_process():
            _report(summary)
        # The run is saved and the process group closed. A finished ZeRO-3 rank has been seen to abort
        # in interpreter teardown ('terminate called without an active exception': a C++ thread object
        # destroyed while joinable); leaving without the teardown keeps that from failing a finished run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    _report(summary)
    return 0


def _mezo(flags: list[str], dry_run: bool) -> int:
    """``zo-scale mezo``: a MeZO ``python run.py`` command line (Malladi et al. 2023) as a zo-scale run
    (:func:`~zo_scale.train.mezo_flags.mezo_overrides`). Prints the flags set aside, in one warning line, and
    the config they amount to; trains unless ``dry_run``. A config error names the flag behind its key."""
    mezo = mezo_overrides(flags)
    if mezo.set_aside:
        print(f"zo-scale mezo: warning: set aside {'; '.join(mezo.set_aside)}", file=sys.stderr)
    try:
        cfg = load_config(None, mezo.overrides)
        print(f"zo-scale mezo: {describe(mezo.overrides)}\n" + yaml.safe_dump(cfg.as_json(), sort_keys=False))
        if dry_run:
            return 0
        summary = train(cfg)
    except ConfigError as e:  # the user typed MeZO's flag, not the config key it became
        raise mezo.name_flag(e) from None
    _report(summary)
    return 0


def _report_error(err: Exception) -> None:
    """The error as one line on stderr, the exit code 2 left to the caller. Under a launcher every rank meets
    the same config, data and model, so rank 0 alone prints; a torchrun-style launcher (torchrun,
    ``accelerate launch``) also gets each rank's line through its error file, so that its failure summary
    names the problem, and there another rank's own error shows. Without such a file (the ``deepspeed``
    launcher), other ranks print errors other than a ConfigError (which every rank raises alike) too."""
    rank = os.environ.get("RANK", "0")
    line = f"zo-scale: error: {err}" if rank == "0" else f"zo-scale: error (rank {rank}): {err}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
    if rank == "0" or not (error_file or isinstance(err, ConfigError)):
        print(line, file=sys.stderr)


def _report(summary: dict) -> None:
    metric = summary["metric"]
    zero = summary[f"zero_shot_{metric}"]
    print(f"\nzero-shot {metric}: {'n/a (resumed run)' if zero is None else f'{100 * zero:.1f}%'}"
          f"   fine-tuned {metric}: {100 * summary[f'final_{metric}']:.1f}%"
          f"   ({summary['eval_examples']} eval examples, {summary['steps']} ZO steps)")
    print(f"outputs in {summary['output_dir']}: metrics.jsonl, loss_curve.png, seedlog.jsonl, checkpoint/")


if __name__ == "__main__":
    sys.exit(main())
