"""The cost of an evolution-strategies step on a reward: a population decoded in one generation, or point by point.

Model: SmolLM2-135M-Instruct (shipped, fp32), ``--batch`` prompts of the generated ``arithmetic`` task, a
population of N = 2 x ``--queries`` members (antithetic pairs), ``--new-tokens`` tokens of greedy decoding each,
the ``numeric`` reward, ``optim.estimator=es`` (z-scored fitness). Timed round-robin (median of ``--repeats``
after two warmups: a lazy step's second pass compiles a kernel of its own), each ZO variant on its own copy of
the model:

    (a) 1 generation, N x B rows    greedy decoding of the prompts stacked N times, no perturbation (baseline)
    (b) N generations of B rows     what decoding each member alone costs, no perturbation
    (c) ES, LOZO, in_forward        LOZO's directions (rank 2, nu 50, lazy): the N members are row groups of one
                                    decoding; no Linear or Embedding weight copied, the update held in windows
    (d) ES, LOZO, in place          the weights moved to each member's point, one decoding of B rows each

Ratios: every variant over (a) and over (b). Not run by CI (about 10 minutes on 2 cores)::

    .venv/bin/python benchmarks/es_step.py                 # population 32, batch 2, 8 new tokens
    .venv/bin/python benchmarks/es_step.py --queries 4     # population 8

Writes ``benchmarks/results/es_step_n<N>.{json,png}``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import common
import torch

import zo_scale
from zo_scale.core.estimators import EvolutionStrategies
from zo_scale.models import load_model
from zo_scale.models.greedy import greedy_decode
from zo_scale.tasks import get_task
from zo_scale.tasks.rewards import load_reward
from zo_scale.train.objectives import RewardObjective

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=2)
parser.add_argument("--queries", type=int, default=16, help="antithetic pairs: the population is twice this")
parser.add_argument("--new-tokens", type=int, default=8)
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()
N = 2 * args.queries
name = f"es_step_n{N}"

model, tokenizer = load_model("smollm2-135m", dtype="float32")
objective = RewardObjective(tokenizer, load_reward("numeric"), max_length=256, max_new_tokens=args.new_tokens)
batch = objective.encode(get_task("arithmetic").examples("train")[: args.batch])
prompts = [ex.prompt for ex in batch]
print(f"SmolLM2-135M fp32, {args.batch} prompts, population {N}, {args.new_tokens} new tokens, "
      f"{torch.get_num_threads()} threads")


def one_generation() -> None:
    greedy_decode(model, prompts * N, tokenizer.pad_token_id, args.new_tokens, (tokenizer.eos_token_id,))


def separate_generations() -> None:
    for _ in range(N):
        greedy_decode(model, prompts, tokenizer.pad_token_id, args.new_tokens, (tokenizer.eos_token_id,))


def es_step(perturb: str) -> Callable[[], None]:
    m = copy.deepcopy(model)
    opt = zo_scale.LOZO(m.named_parameters(), lr=1e-4, eps=1e-2, rank=2, nu=50, queries=args.queries, lazy=True,
                        estimator=EvolutionStrategies("zscore"), perturb=perturb,
                        model=m if perturb == "in_forward" else None)
    if perturb == "in_forward":
        return lambda: opt.step(lambda groups: objective.loss(m, batch, groups))
    return lambda: opt.step(lambda: objective.loss(m, batch))


variants: dict[str, Callable[[], None]] = {
    f"(a) 1 generation, {N} x {args.batch} rows": one_generation,
    f"(b) {N} generations of {args.batch} rows": separate_generations,
    "(c) ES, LOZO, in_forward": es_step("in_forward"),
    "(d) ES, LOZO, in place": es_step("in_place"),
}
labels = list(variants)
timings = common.time_interleaved(variants, warmup=2, repeats=args.repeats)  # a lazy step's second pass compiles
one_s, separate_s = (timings[label].median_s for label in labels[:2])
results = {}
for label, t in timings.items():
    results[label] = {"median_s": t.median_s, "times_s": t.times_s, "ratio_vs_one_generation": t.median_s / one_s,
                      "ratio_vs_separate_generations": t.median_s / separate_s}
    print(f"{label:34s} {t.median_s:7.2f} s  x{t.median_s / one_s:.3f} of (a)  x{t.median_s / separate_s:.3f} of (b)"
          f"  (times {[round(x, 2) for x in t.times_s]})")

settings = {"model": "smollm2-135m (SmolLM2-135M-Instruct, shipped)", "dtype": "fp32", "batch": args.batch,
            "population": N, "new_tokens": args.new_tokens, "task": "arithmetic (generated, seed 0), its first rows",
            "reward": "numeric", "estimator": "es (zscore)", "rank": 2, "nu": 50, "lazy": True,
            "warmup": 2, "repeats": args.repeats, "timing": "round-robin over the variants, median of repeats"}
notes = ["ratio_vs_one_generation: median time / that of (a), one greedy decoding of the prompts stacked N times "
         "with the model at theta: the floor of an in_forward ES step (its decoding, without perturbations).",
         "ratio_vs_separate_generations: median time / that of (b), N decodings of the B prompts: what decoding "
         "each member alone costs (the in-place step's decodings, without its weight moves).",
         "An ES step's time includes its update (held in LOZO's pending windows for the matrices, landed in the "
         "next step's forward for the 1-D parameters)."]
print("wrote", common.write_json(name, settings, results, notes))

fig, ax = common.new_figure()
common.step_times(ax, timings, one_s, ["tab:gray", "tab:gray", "tab:blue", "tab:orange"])
ax.set_title(f"ES step on a reward: SmolLM2-135M, fp32, population {N}, {args.batch} prompts, "
             f"{args.new_tokens} new tokens\nxN: median ratio to (a)\n{common.machine_label()}", fontsize=10)
print("wrote", common.save_figure(fig, name))
