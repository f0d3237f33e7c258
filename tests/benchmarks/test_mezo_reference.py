"""The published MeZO step the benchmarks measure zo-scale against (benchmarks/mezo_reference.py)."""

import sys
from pathlib import Path

import pytest
import torch

from zo_scale.core import noise
from zo_scale.train import loop
from zo_scale.train.config import load_config
from zo_scale.train.seedlog import read_records

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from mezo_reference import MeZOReference, trainer_with_mezo_step  # noqa: E402


def test_one_step_is_mezo_sgd_on_a_quadratic():
    """f(theta) = 1/2 sum (theta - a)^2: the central difference along z is exactly z . (theta - a), so every
    quantity of the step is known: the points theta +- eps z, then theta - lr (g z + wd theta) (the bias: no wd)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()  # float32 losses would leave g only to ~1e-3
    targets = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    points = []

    def closure():
        points.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return sum(0.5 * (p - targets[n]).pow(2).sum() for n, p in model.named_parameters())

    lr, eps, wd = 0.1, 1e-3, 0.5
    loss = MeZOReference(model, lr, eps, seed=7, weight_decay=wd).step(closure)

    generator = torch.Generator().manual_seed(noise.derive_seed(7, 0))
    z = {n: torch.normal(0.0, 1.0, size=p.shape, generator=generator, dtype=p.dtype)
         for n, p in model.named_parameters()}
    for n in start:
        torch.testing.assert_close(points[0][n], start[n] + eps * z[n])
        torch.testing.assert_close(points[1][n], start[n] - eps * z[n])
    g = sum((z[n] * (start[n] - targets[n])).sum() for n in start)
    torch.testing.assert_close(model.weight.detach(), start["weight"] * (1 - lr * wd) - lr * g * z["weight"])
    torch.testing.assert_close(model.bias.detach(), start["bias"] - lr * g * z["bias"])
    f0 = sum(0.5 * (start[n] - targets[n]).pow(2).sum() for n in start)
    assert loss == pytest.approx(float(f0) + 0.5 * eps**2 * sum(float(z[n].pow(2).sum()) for n in start), rel=1e-5)


def test_the_trainer_steps_with_it_inside_the_context_only(tmp_path, tiny_overrides):
    def run(name):
        cfg = load_config(None, [*tiny_overrides, "run.steps=3", f"run.output_dir={tmp_path / name}"])
        return loop.train(cfg), tmp_path / name / "seedlog.jsonl"

    original = loop.RunOptimizer
    with trainer_with_mezo_step():
        summary, log = run("mezo")
    assert loop.RunOptimizer is original
    assert list(read_records(log)) == []  # zo-scale's optimizer never stepped: no seed-log records
    assert summary["steps"] == 3 and 0.0 <= summary["final_accuracy"] <= 1.0
    _, log = run("zo")
    assert [r.step for r in read_records(log)] == [0, 1, 2]

    with pytest.raises(RuntimeError), trainer_with_mezo_step():
        raise RuntimeError
    assert loop.RunOptimizer is original
