"""The quality table: which method wins at the same forward budget, on real data and a real model.

SmolLM2-135M (full parameters, fp32) on SST-2 (1,000 training sentences and 300 dev sentences, each
sampled with the run seed, MeZO's template, batch 16), on RTE (1,000 training pairs, 277 validation
pairs: all of them) and on COPA (all 400 training and 100 validation examples), from ../shared/data,
each method run by the real trainer (``zo_scale.train.loop.train``) with the same seed; "the published
MeZO step" is that trainer with its ZO step replaced by mezo_reference.py's (the same data, batches, lr
and evaluation). ZO Fine-tuner's scales were meta-trained on COPA's training split: on COPA it is in-domain.
Every method gets the same number of forwards over training batches (``--forwards``): a method taking
k forwards a step gets forwards // k steps (central ZO: 2; FZOO with N perturbations: N + 1; HiZOO: 3; the
unbiased estimator: 5 on average, the forwards it took recorded; first-order AdamW: counted as 3, a forward
and a backward of about two). Each method runs at every lr of its grid
(``--lrs``: the first n values listed below); the table keeps every run, docs/benchmarks.md the best per method.
Zero-shot is measured in every run (the same number each time: the same model and eval set).

    python benchmarks/quality_table.py --forwards 2000 --lrs 2           # the table (a GPU: minutes)
    python benchmarks/quality_table.py --forwards 200 --lrs 1 --tasks sst2
    python benchmarks/quality_table.py --append --methods "ZO-Adam" --lr 1e-5   # one more run into the table
    python benchmarks/quality_table.py --quick                           # 8 forwards, 16 examples: smoke
    python benchmarks/quality_table.py --learn-scales 250                # ZO Fine-tuner's scales, once (COPA)

Accuracy on 300 examples has a binomial standard error of about 2.7 points at 70%: differences smaller
than ~5 points are not an ordering. Nothing here is tuned on the eval set beyond the grids below.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time

import common
from mezo_reference import trainer_with_mezo_step

from zo_scale.core import noise
from zo_scale.core.estimators import make_estimator
from zo_scale.core.optimizer import ESTIMATOR_DRAW
from zo_scale.train.config import Config, load_config
from zo_scale.train.learn_scales import learn_scales
from zo_scale.train.loop import train
from zo_scale.train.metrics import read_metrics

TASKS = {  # MeZO's protocol: train sampled from the train split, eval from the eval split
    "sst2": ["task.name=sst2", "task.num_train=1000", "task.num_eval=300"],
    "rte": ["task.name=rte", "task.num_train=1000", "task.num_eval=277"],  # all of RTE's validation pairs
    # COPA has 400 training and 100 validation examples: all of them (+-4.6 points at 70%)
    "copa": ["task.name=copa", "task.num_train=400", "task.num_eval=100"],
}
SCALES = common.RESULTS_DIR / "smollm2-135m_copa_scales.json"  # ZO Fine-tuner's, from --learn-scales
# the paper's meta-training: COPA's training split, batch 8, the ZO step of ZO-SGD's lr here; restarts every 5 epochs
LEARN_SCALES = ["model.name=smollm2-135m", "model.dtype=float32", "task.name=copa", "task.num_train=400",
                "run.batch_size=8", "run.log_every=5", "run.progress=false", "run.seed=0", "optim.lr=3e-5",
                "optim.eps=1e-3", "meta.restart_every=250", f"meta.output={SCALES}"]
# name: (overrides, forwards per step, lr grid). lr is optim.lr, or hybrid.fo_lr for first-order AdamW.
METHODS: dict[str, tuple[list[str], int, list[float]]] = {
    "ZO-SGD (MeZO: Gaussian, central)": (["optim.sampler=normal"], 2, [3e-5, 1e-5, 1e-4]),
    # the same update by the published step's four passes (mezo_reference.py) in the same trainer
    (MEZO_PUBLISHED := "MeZO, the published step (4 passes)"): (["optim.sampler=normal"], 2,
                                                           [3e-5, 1e-5, 1e-4]),
    "ZO-SGD (Rademacher)": (["optim.sampler=rademacher"], 2, [3e-5, 1e-5]),
    # FZOO's step is normalized: at one lr it is ~30x shorter than ZO-SGD's here (fzoo_curvature.py)
    "FZOO (N=4, Rademacher)": (["optim.sampler=rademacher", "optim.estimator=fzoo", "optim.queries=4"], 5,
                               [1e-3, 3e-4]),
    "HiZOO (alpha=1e-6)": (["optim.rule=hizoo", "optim.estimator=hizoo", "optim.hessian_smoothing=1e-6"], 3,
                           [3e-5, 1e-5]),
    "Unbiased (telescoping, rho=c=1/2)": (["optim.sampler=normal", "optim.estimator=unbiased"], 5, [3e-5, 1e-5]),
    "LOZO (r=2, nu=50)": (["optim.sampler=lowrank", "optim.rank=2", "optim.nu=50"], 2, [3e-5, 1e-5]),
    "LOZO-M (r=2, nu=50, beta=0.9)": (["optim.sampler=lowrank", "optim.rule=lozo-m", "optim.nu=50"], 2,
                                      [3e-5, 1e-5]),
    "LeZO (1/4 of the layers)": (["optim.sampler=lezo", "optim.layer_fraction=0.25"], 2, [1e-4, 3e-5]),
    # the magnitude mask reads theta: its points live inside the forward (one batched forward a step)
    "Sparse-MeZO (small 1/4 of each tensor)": (["optim.sampler=magnitude", "optim.sparsity=0.75",
                                                "optim.perturb=in_forward"], 2, [1e-4, 3e-5]),
    # sign and Adam steps move each element by about lr: 1e-4 is near ZO-SGD's per-element step at 3e-5 here
    "M-SignSGD (beta=0.9)": (["optim.sampler=rademacher", "optim.rule=sign-momentum"], 2, [1e-4, 1e-5]),
    "ZO-Adam": (["optim.sampler=rademacher", "optim.rule=adam"], 2, [1e-4, 1e-5, 3e-4]),
    # ARDD's lr is its gradient step 1/(2 L n); n = the trained elements, so its mirror step is ~0 here
    "ARDD": (["optim.rule=ardd"], 2, [3e-5, 1e-4]),
    # the scales learned once for SmolLM2 on COPA (--learn-scales), reused here as the paper reuses them
    (ZO_FINE_TUNER := "ZO Fine-tuner (scales learned on COPA)"): (["optim.sampler=normal", f"optim.scales={SCALES}"],
                                                                  2, [3e-5, 1e-5]),
    "FO AdamW (the ceiling)": (["hybrid.fo_layers=-1", "hybrid.fo_optimizer=adamw"], 3, [1e-5, 3e-5]),
}
BASE = ["model.name=smollm2-135m", "model.dtype=float32", "task.num_dev=0", "run.batch_size=16",
        "run.eval_every=0", "run.eval_batch_size=32", "run.log_every=10", "run.progress=false", "run.seed=0",
        "optim.lazy=true", "optim.eps=1e-3"]


def run_one(task: str, method: str, lr: float, forwards: int, n_eval: int | None) -> dict:
    overrides, per_step, _ = METHODS[method]
    steps = max(1, forwards // per_step)
    slug = "".join(c if c.isalnum() else "-" for c in f"{task}-{method}-{lr:g}-{forwards}".lower()).strip("-")
    out_dir = common.RESULTS_DIR / "runs" / f"quality-{slug}"
    shutil.rmtree(out_dir, ignore_errors=True)  # a checkpoint left there would resume instead of training
    if method == ZO_FINE_TUNER and not SCALES.exists():
        raise SystemExit(f"{method} needs {SCALES}: run quality_table.py --learn-scales 250 first")
    lr_key = "hybrid.fo_lr" if "hybrid.fo_layers=-1" in overrides else "optim.lr"
    cfg = load_config(None, [*BASE, *TASKS[task], *overrides, f"{lr_key}={lr}", f"run.steps={steps}",
                             *([f"task.num_eval={n_eval}"] if n_eval else []), f"run.output_dir={out_dir}"])
    start, cpu = time.perf_counter(), common.cpu_snapshot()
    with trainer_with_mezo_step() if method == MEZO_PUBLISHED else contextlib.nullcontext():
        summary = train(cfg)
    wall = time.perf_counter() - start
    train_loss = [(r["step"], r["loss"]) for r in read_metrics(out_dir / "metrics.jsonl") if r["kind"] == "train"]
    shutil.rmtree(summary["model"], ignore_errors=True)  # the saved weights: 540 MB a run, not needed here
    return {"task": task, "method": method, "lr": lr, "budget": forwards, "steps": steps,
            "forwards": forwards_taken(cfg, per_step),
            "eval_examples": summary["eval_examples"],
            "zero_shot_accuracy": summary["zero_shot_accuracy"], "final_accuracy": summary["final_accuracy"],
            "wall_s": wall, "cpu_taken_by_others": common.cpu_taken_by_others(cpu),
            "cpu_model": common.cpu_model(), "train_loss": train_loss}  # runs span machines


def forwards_taken(cfg: Config, per_step: int) -> int:
    """Forwards the run took over training batches: the estimator's per step (drawn per step for the
    unbiased one, as the optimizer draws it), ``per_step`` for first-order AdamW."""
    if cfg.hybrid.fo_layers == -1:
        return cfg.run.steps * per_step
    estimator = make_estimator(cfg.optim.estimator)
    return sum(estimator.for_step(noise.derive_seed(cfg.run.seed, t, ESTIMATOR_DRAW)).forwards(cfg.optim.queries)
               for t in range(cfg.run.steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--forwards", type=int, default=2000, help="forwards over training batches per run")
    parser.add_argument("--lrs", type=int, default=2, help="how many lrs of each method's grid to run")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD")
    parser.add_argument("--eval", type=int, help="eval examples per task (default: the task's, in TASKS)")
    parser.add_argument("--append", action="store_true",
                        help="add these runs to the saved JSON (a run of the same task, method, lr and budget is "
                             "replaced)")
    parser.add_argument("--lr", type=float, help="run this lr only (instead of the grid's first --lrs values)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the saved JSON")
    parser.add_argument("--learn-scales", type=int, metavar="STEPS",
                        help=f"meta-train ZO Fine-tuner's scales for SmolLM2 on COPA (STEPS steps) into {SCALES.name}")
    args = parser.parse_args()
    if args.learn_scales:
        start = time.perf_counter()
        out = common.RESULTS_DIR / "runs" / "learn-scales-copa"
        learned = learn_scales(load_config(None, [*LEARN_SCALES, f"run.steps={args.learn_scales}",
                                                  f"run.output_dir={out}"]))
        print(f"scales of {learned['tensors']} tensors in {learned['scale_range']}, meta-loss "
              f"{learned['first_meta_loss']:.4f} -> {learned['last_meta_loss']:.4f}, "
              f"{time.perf_counter() - start:.0f} s: {SCALES}", flush=True)
        return
    name = "quality_table" + ("_quick" if args.quick else "")
    if args.plot_only:
        plot(name, json.loads((common.RESULTS_DIR / f"{name}.json").read_text())["results"])
        return
    forwards, n_eval = (8, 16) if args.quick else (args.forwards, args.eval)
    saved = common.RESULTS_DIR / f"{name}.json"
    results = json.loads(saved.read_text())["results"] if args.append and saved.exists() else []
    settings = {"forwards_per_run": forwards, "eval_examples": n_eval or "the task's (tasks)", "base": BASE,
                "tasks": TASKS, "methods": METHODS,
                "wall_s": "per run: model load, two evals (zero-shot and final) and the steps"}
    for task in args.tasks:
        for method in args.methods:
            for lr in [args.lr] if args.lr is not None else METHODS[method][2][: args.lrs]:
                results = [r for r in results
                           if (r["task"], r["method"], r["lr"], r["budget"]) != (task, method, lr, forwards)]
                r = run_one(task, method, lr, forwards, n_eval)
                results.append(r)
                print(f"{task} {method} lr {lr:g}: {100 * r['zero_shot_accuracy']:.1f}% -> "
                      f"{100 * r['final_accuracy']:.1f}% in {r['steps']} steps ({r['forwards']} forwards), "
                      f"{r['wall_s']:.0f} s", flush=True)
                common.write_json(name, settings, results)  # after every run: a stopped table keeps its runs
    plot(name, results)


def best(results: list[dict]) -> dict[tuple[str, str], dict]:
    """The best run (final accuracy) of each (task, method) over its lr grid; a method run at another
    budget than the task's most common one is its own row, named with its budget."""
    out: dict[tuple[str, str], dict] = {}
    budgets = [(r["task"], r["budget"]) for r in results]
    for r in results:
        usual = max(set(budgets), key=lambda tb: (tb[0] == r["task"], budgets.count(tb)))[1]
        key = (r["task"], r["method"] if r["budget"] == usual else f"{r['method']}, {r['budget']} forwards")
        if key not in out or r["final_accuracy"] > out[key]["final_accuracy"]:
            out[key] = r
    return out


def binomial_se(r: dict) -> float:
    """One binomial standard error of a run's final accuracy, in points."""
    return 100 * (r["final_accuracy"] * (1 - r["final_accuracy"]) / r["eval_examples"]) ** 0.5


def in_methods_order(top: dict[tuple[str, str], dict]) -> list[str]:
    """The row names of ``best``'s table in METHODS' order, a longer run of a method after it."""
    order = {m: i for i, m in enumerate(METHODS)}
    runs = {row: r for (_, row), r in top.items()}
    return sorted(runs, key=lambda row: (order.get(runs[row]["method"], len(order)), runs[row]["budget"], row))


def plot(name: str, results: list[dict]) -> None:
    """One panel a task (TASKS' order), one row a method on the same line in every panel (METHODS'
    order; a longer run below its method): its best lr's accuracy with +-1 s.e., the lr beside it."""
    top = best(results)
    tasks = [t for t in TASKS if t in {task for task, _ in top}]
    rows = in_methods_order(top)
    y = {m: -i for i, m in enumerate(rows)}  # first method on top
    accs = [100 * r["final_accuracy"] for r in top.values()]
    lo = min([*accs, *(100 * r["zero_shot_accuracy"] for r in top.values())]) - 8
    fig, axes = common.new_figure(4.5 * len(tasks) + 2.5, 0.32 * len(rows) + 1.6, ncols=len(tasks))
    axes = axes if len(tasks) > 1 else [axes]
    for i, (ax, task) in enumerate(zip(axes, tasks, strict=True)):
        runs = {m: r for (t, m), r in top.items() if t == task}
        for m, r in runs.items():
            color = "tab:blue" if m.startswith("FO ") else "tab:orange"
            ax.errorbar(100 * r["final_accuracy"], y[m], xerr=binomial_se(r), fmt="o", color=color, capsize=2)
            ax.annotate(f"{100 * r['final_accuracy']:.1f} ({r['lr']:g})", (100 * r["final_accuracy"], y[m]),
                        xytext=(6, 3), textcoords="offset points", fontsize=6)
        ax.axvline(100 * next(iter(runs.values()))["zero_shot_accuracy"], color="k", ls="--", lw=1)
        ax.set_yticks(list(y.values()), rows if i == 0 else [""] * len(rows), fontsize=8)
        ax.set_ylim(-len(rows) + 0.5, 0.5)
        ax.grid(axis="y", lw=0.3)
        ax.set_xlim(lo, max(accs) + 8)  # one scale for every task
        budgets = [r["budget"] for r in runs.values()]
        ax.set_title(f"{task}: {max(budgets, key=budgets.count)} training forwards (or as marked)", fontsize=9)
        ax.set_xlabel("accuracy (%) of the best lr (in brackets)\nbars: +-1 binomial s.e.; dashed: zero-shot",
                      fontsize=8)
    fig.suptitle(common.machine_label(), fontsize=8)
    common.save_figure(fig, name)
    print(json.dumps({f"{t} {m}": (r["lr"], r["final_accuracy"]) for (t, m), r in top.items()}))


if __name__ == "__main__":
    main()
