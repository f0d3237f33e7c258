"""Real-data quality: SmolLM2-135M on SST-2, zero-shot vs after N ZO steps, for ZO-SGD, ZO-Adam and LOZO
(``--set rules``), or full-parameter ZO vs LoRA ZO (``--set peft``).

Each method runs the real trainer (``zo_scale.train.loop.train``) from the demo config: SmolLM2-135M
(full parameters, fp32), MeZO's SST-2 template, 512 training sentences from the package sample,
batch 16, the same steps, seed and eval set, and the central estimator (2 forwards a step), so the
forward budget is equal. Recorded per method: zero-shot and final accuracy, steps, wall time, time
per step. Accuracy is whatever it is: nothing is tuned against the eval set beyond the lr choices
listed in the JSON.

    python benchmarks/real_data_quality.py            # 100 steps, 200 eval sentences (~20 min on 2 cores)
    python benchmarks/real_data_quality.py --set peft # full vs LoRA ZO, same forward budget (~20 min)
    python benchmarks/real_data_quality.py --quick    # 4 steps, 32 eval sentences: a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import common

from zo_scale.train.cli import DEMO_CONFIG
from zo_scale.train.config import load_config
from zo_scale.train.loop import train
from zo_scale.train.metrics import read_metrics

SETS = {  # on top of the demo config (Rademacher directions, lr 3e-5, eps 1e-3, batch 16)
    "rules": {
        "ZO-SGD (Rademacher)": ["optim.rule=sgd"],
        "ZO-SGD (Gaussian, MeZO)": ["optim.rule=sgd", "optim.sampler=normal"],
        "ZO-Adam": ["optim.rule=adam"],
        "LOZO (r=2, nu=50)": ["optim.rule=sgd", "optim.sampler=lowrank", "optim.rank=2", "optim.nu=50"],
    },
    # MeZO's LoRA setting (r=8, alpha=16 on q/v, lr 1e-4, eps 1e-2) and lrs 10x and 100x larger
    "peft": {
        "full ZO (lr 3e-5)": [],
        "LoRA ZO (lr 1e-4)": ["peft.method=lora", "optim.lr=1e-4", "optim.eps=1e-2"],
        "LoRA ZO (lr 1e-3)": ["peft.method=lora", "optim.lr=1e-3", "optim.eps=1e-2"],
        "LoRA ZO (lr 1e-2)": ["peft.method=lora", "optim.lr=1e-2", "optim.eps=1e-2"],
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval", type=int, default=200, help="SST-2 dev sentences evaluated")
    parser.add_argument("--set", choices=SETS, default="rules", help="which methods to compare")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the saved JSON")
    args = parser.parse_args()
    steps, n_eval = (4, 32) if args.quick else (args.steps, args.eval)
    name = ("real_data_quality" if args.set == "rules" else f"real_data_{args.set}") + ("_quick" if args.quick else "")
    methods = SETS[args.set]
    if args.plot_only:
        saved = json.loads((common.RESULTS_DIR / f"{name}.json").read_text())
        plot(name, saved["results"], saved["settings"]["steps"], saved["settings"]["eval_examples"])
        return
    results = {}
    for method, overrides in methods.items():
        slug = "".join(c if c.isalnum() else "-" for c in method.lower()).strip("-")
        out_dir = common.RESULTS_DIR / "runs" / f"{name}-{slug}"
        shutil.rmtree(out_dir, ignore_errors=True)  # a checkpoint left there would resume instead of training
        cfg = load_config(DEMO_CONFIG, [*overrides, f"run.steps={steps}", f"task.num_eval={n_eval}",
                                        "run.eval_every=0", "run.progress=false", f"run.output_dir={out_dir}"])
        start = time.perf_counter()
        summary = train(cfg)
        wall = time.perf_counter() - start
        train_loss = [(r["step"], r["loss"]) for r in read_metrics(out_dir / "metrics.jsonl") if r["kind"] == "train"]
        results[method] = {
            "overrides": overrides, "zero_shot_accuracy": summary["zero_shot_accuracy"],
            "final_accuracy": summary["final_accuracy"], "steps": steps, "wall_s": wall,
            "train_loss": train_loss,
        }
        print(f"{method}: {100 * summary['zero_shot_accuracy']:.1f}% -> {100 * summary['final_accuracy']:.1f}% "
              f"in {steps} steps, {wall:.0f} s")

    settings = {"base": str(DEMO_CONFIG), "steps": steps, "eval_examples": n_eval, "methods": methods,
                "time_per_step": "wall_s includes model load, two evals and checkpointing"}
    common.write_json(name, settings, results)
    plot(name, results, steps, n_eval)


def plot(name: str, results: dict, steps: int, n_eval: int) -> None:
    fig, (ax_acc, ax_loss) = common.new_figure(12, 4.8, ncols=2)
    labels = [m.replace(" (", "\n(") for m in results]
    ax_acc.bar(labels, [100 * r["final_accuracy"] for r in results.values()], color="tab:orange", label="after ZO")
    ax_acc.axhline(100 * next(iter(results.values()))["zero_shot_accuracy"], color="k", ls="--", label="zero-shot")
    ax_acc.set_ylabel(f"SST-2 dev accuracy (%, {n_eval} sentences)")
    ax_acc.set_ylim(40, 80)
    ax_acc.set_title(f"SmolLM2-135M after {steps} ZO steps")
    ax_acc.tick_params(axis="x", labelsize=8)
    ax_acc.legend(loc="upper right")
    for method, r in results.items():
        ax_loss.plot(*zip(*r["train_loss"], strict=True), label=method)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss (CE over label words, nats)")
    ax_loss.legend(fontsize=8)
    fig.suptitle(common.machine_label(), fontsize=8)
    common.save_figure(fig, name)
    print(json.dumps({m: (r["zero_shot_accuracy"], r["final_accuracy"]) for m, r in results.items()}))

if __name__ == "__main__":
    main()
