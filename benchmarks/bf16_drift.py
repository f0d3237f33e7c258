"""Low-precision drift of the +/- eps round trip, with and without the fp32 master copy.

A ZO step moves every weight by +eps z, -2 eps z, +eps z (then the update). In bf16 each move
rounds, so even with lr = 0 the weights wander away from where they started; with
``master_weights=True`` the weights are set from an fp32 copy instead and return exactly; with
``perturb="in_forward"`` the stored weights never move (the perturbed points are transient copies
inside one forward, closure ``common.stacked_lm_losses``), so there is nothing to drift.

Model: OPT-125m's shape, random init (``common.opt_125m``), batch ``--rows`` x ``--seq`` random
tokens, ZO-SGD (lazy, Gaussian z, eps 1e-3), ``--steps`` steps. For each lr (0 and ``--lr``) and
each of fp32, bf16, bf16 + master, bf16 in_forward: ||theta - theta_0|| / ||theta_0|| from the run's own start
(lr = 0: pure drift), and ||theta - theta_fp32|| / ||theta_fp32 - theta_0|| (lr > 0: how far from
the fp32 run, as a fraction of how far the fp32 run moved).

Run (about 2 minutes on 2 cores):
    .venv/bin/python benchmarks/bf16_drift.py
Writes benchmarks/results/bf16_drift.{json,png}.
"""

from __future__ import annotations

import argparse

import common
import torch

import zo_scale

VARIANTS = {"fp32": ("fp32", False, "in_place"), "bf16": ("bf16", False, "in_place"),
            "bf16 + master": ("bf16", True, "in_place"), "bf16 in_forward": ("bf16", False, "in_forward")}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def start_and_final(dtype: str, master: bool, perturb: str, lr: float, ids: torch.Tensor,
                    steps: int) -> tuple[dict, dict]:
    model = common.opt_125m(dtype)
    start = weights(model)
    opt = zo_scale.ZOSGD(model.named_parameters(), lr=lr, eps=1e-3, seed=0, lazy=True, master_weights=master,
                         perturb=perturb, model=model)
    for _ in range(steps):
        if perturb == "in_forward":
            opt.step(lambda groups: common.stacked_lm_losses(model, ids, groups))
        else:
            opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    opt.flush()
    return start, weights(model)


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


def zeros(like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in like.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()
    ids = common.lm_batch(args.rows, args.seq)
    results = {}
    for lr in (0.0, args.lr):
        runs = {name: start_and_final(*variant, lr, ids, args.steps) for name, variant in VARIANTS.items()}
        fp32_start, fp32_final = runs["fp32"]
        moved = distance(fp32_final, fp32_start)
        results[f"lr={lr:g}"] = {
            name: {"distance_from_start_over_start_norm": distance(final, start) / distance(start, zeros(start)),
                   "distance_from_fp32_run_over_fp32_move": distance(final, fp32_final) / moved if moved else None}
            for name, (start, final) in runs.items()
        }
        drift = {k: f"{v['distance_from_start_over_start_norm']:.2e}" for k, v in results[f"lr={lr:g}"].items()}
        print(f"lr={lr:g}: distance from start / start norm:", drift)
    notes = ["each run starts from the same random weights, rounded to its dtype; distances in fp32 arithmetic."]
    print("wrote", common.write_json("bf16_drift", vars(args), results, notes))

    fig, axes = common.new_figure(11, 4.0, ncols=2)
    names = [n for n in results["lr=0"]]
    axes[0].bar(names, [results["lr=0"][n]["distance_from_start_over_start_norm"] for n in names],
                color=["#4c72b0", "#dd8452", "#55a868", "#8172b2"])
    axes[0].set_title(f"lr = 0, {args.steps} steps: ||theta - theta_0|| / ||theta_0||")
    key = f"lr={args.lr:g}"
    axes[1].bar(names[1:], [results[key][n]["distance_from_fp32_run_over_fp32_move"] for n in names[1:]],
                color=["#dd8452", "#55a868", "#8172b2"])
    axes[1].set_title(f"lr = {args.lr:g}: distance from the fp32 run / fp32 move")
    fig.savefig(common.RESULTS_DIR / "bf16_drift.png", dpi=120)


if __name__ == "__main__":
    main()
