r"""Why FZOO did not learn in the quality table: how much of its one-sided differences is curvature.

FZOO's estimate (``optim.estimator=fzoo``) weighs perturbation u_i by d_i / sigma, d_i = L(theta + eps u_i)
- L(theta), sigma the spread of the N perturbed losses. Expanding d_i to second order,

.. math::
    d_i = \underbrace{\epsilon\, u_i^\top \nabla L}_{s_i\ \text{(signal)}}
        + \underbrace{\tfrac{\epsilon^2}{2}\, u_i^\top H u_i}_{h_i\ \text{(curvature)}} + O(\epsilon^3),

and for Rademacher u_i the curvature term is about the same positive number eps^2 tr(H) / 2 for every
i. Dividing by sigma removes the spread, not that common offset: the step (1/N) sum_i (s_i + h_i) u_i /
sigma carries h / sigma times a random direction (1/N) sum_i u_i. Central differences cancel it: s_i =
(L(theta + eps u_i) - L(theta - eps u_i)) / 2, h_i = (L(theta + eps u_i) + L(theta - eps u_i)) / 2 - L(theta).

This measures s_i and h_i at the start of the quality table's runs (SmolLM2-135M, fp32, SST-2 batches of
16 with MeZO's prompt and the ce loss), N = 8 Rademacher directions per batch, 4 batches, eps = 1e-3 and
1e-4, and reports the ratio that sets how much of FZOO's step is curvature noise,

    curvature / signal = sqrt(sum_i h_i^2) / sqrt(sum_i s_i^2)

(the two parts of the step are near-orthogonal in 135M dimensions, so their lengths compare this way).
A ratio well above 1 means the step is mostly a random direction.

It also reports how long FZOO's step is against ZO-SGD's at the same lr, both with Rademacher directions
of length sqrt(d): ZO-SGD moves lr |s_i / eps| sqrt(d) per direction, FZOO lr sqrt(sum_i a_i^2) / N sqrt(d)
with a_i = d_i / sigma (the N directions near-orthogonal), so

    ZO-SGD step / FZOO step = rms_i(s_i / eps) / (sqrt(sum_i a_i^2) / N),

the factor by which FZOO's lr must exceed ZO-SGD's for steps of the same length.

    python benchmarks/fzoo_curvature.py            # SmolLM2 on SST-2 (about 3 minutes on 2 CPU cores)
    python benchmarks/fzoo_curvature.py --quick    # tiny-llama on the SST-2 sample: smoke
"""

from __future__ import annotations

import argparse
import math

import common
import torch

from zo_scale.models import load_model
from zo_scale.tasks import get_task, sample_splits
from zo_scale.train.objectives import ChoiceObjective


def rademacher_like(params: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2, p.shape, generator=g, dtype=p.dtype).mul_(2).sub_(1) for p in params]


@torch.no_grad()
def loss_at(objective: ChoiceObjective, model: torch.nn.Module, batch: list, params: list[torch.Tensor],
            u: list[torch.Tensor] | None, scale: float) -> float:
    """L(theta + scale u), theta restored afterwards (fp32: the round trip is exact to rounding)."""
    if u is not None:
        for p, d in zip(params, u, strict=True):
            p.add_(d, alpha=scale)
    value = objective.loss(model, batch).item()
    if u is not None:
        for p, d in zip(params, u, strict=True):
            p.sub_(d, alpha=scale)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    model_name, task, n_dirs, n_batches = ("tiny-llama", "sst2-demo", 4, 2) if args.quick else \
        ("smollm2-135m", "sst2", 8, 4)
    torch.manual_seed(0)
    model, tokenizer = load_model(model_name)
    params = [p for p in model.parameters() if p.requires_grad]
    dims = sum(p.numel() for p in params)
    train_ex, _, _ = sample_splits(get_task(task), 16 * n_batches, 0, 16, seed=0)
    objective = ChoiceObjective(tokenizer, "causal", "ce", 256)
    encoded = objective.encode(train_ex)
    results = []
    for eps in (1e-3, 1e-4):
        for b in range(n_batches):
            batch = encoded[16 * b : 16 * (b + 1)]
            l0 = loss_at(objective, model, batch, params, None, 0.0)
            s, h, d = [], [], []
            for i in range(n_dirs):
                u = rademacher_like(params, seed=1000 * b + i)
                plus = loss_at(objective, model, batch, params, u, eps)
                minus = loss_at(objective, model, batch, params, u, -eps)
                s.append((plus - minus) / 2)
                h.append((plus + minus) / 2 - l0)
                d.append(plus - l0)
            mean_plus = sum(x + l0 for x in d) / n_dirs
            sigma = math.sqrt(sum((x + l0 - mean_plus) ** 2 for x in d) / n_dirs)
            ratio = math.sqrt(sum(x * x for x in h)) / max(math.sqrt(sum(x * x for x in s)), 1e-30)
            zo_sgd = math.sqrt(sum((x / eps) ** 2 for x in s) / n_dirs)
            fzoo = math.sqrt(sum((x / sigma) ** 2 for x in d)) / n_dirs if sigma else float("nan")
            results.append({"eps": eps, "batch": b, "loss": l0, "signal": s, "curvature": h, "sigma": sigma,
                            "mean_curvature_over_sigma": (sum(h) / n_dirs) / sigma if sigma else None,
                            "curvature_over_signal": ratio, "zo_sgd_step_over_fzoo_step": zo_sgd / fzoo,
                            # eps^2 tr(H) / 2 is the mean of h_i: tr(H) estimated, per dimension
                            "trace_h_per_dim": 2 * (sum(h) / n_dirs) / eps**2 / dims})
            print(f"eps {eps:g} batch {b}: loss {l0:.4f}, sigma {sigma:.3g}, mean h / sigma "
                  f"{results[-1]['mean_curvature_over_sigma']:.3g}, curvature / signal {ratio:.3g}, "
                  f"ZO-SGD step / FZOO step at one lr {zo_sgd / fzoo:.3g}")
    def median(key: str, eps: float) -> float:
        return sorted(r[key] for r in results if r["eps"] == eps)[n_batches // 2]

    summary = {f"{eps:g}": {k: median(k, eps) for k in ("curvature_over_signal", "zo_sgd_step_over_fzoo_step")}
               for eps in (1e-3, 1e-4)}
    path = common.write_json("fzoo_curvature" + ("_quick" if args.quick else ""),
                             {"model": model_name, "task": task, "directions": n_dirs, "batches": n_batches,
                              "batch_size": 16, "dims": dims, "loss": "ce", "dtype": "fp32"},
                             {"runs": results, "summary": summary},
                             notes=["s_i, h_i in nats; ratio = |h| / |s| over the N directions of a batch"])
    fig, ax = common.new_figure(7, 3.5)
    for eps, color in ((1e-3, "tab:red"), (1e-4, "tab:blue")):
        rows = [r for r in results if r["eps"] == eps]
        ax.bar([f"eps {eps:g}\nbatch {r['batch']}" for r in rows], [r["curvature_over_signal"] for r in rows],
               color=color)
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_ylabel("|curvature| / |signal| in FZOO's differences")
    ax.set_title(f"{model_name} on {task}: one-sided differences, {n_dirs} Rademacher directions")
    print(f"wrote {path} and {common.save_figure(fig, path.stem)}")


if __name__ == "__main__":
    main()
