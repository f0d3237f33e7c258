"""ZeRO-3 backend: 2 real ranks (gloo, DeepSpeed's CPU accelerator) against a 1-process run without DeepSpeed.

One torchrun launch runs every case (each ~3 s; the launch itself ~10 s on 2 cores); the 1-process
references run here. What each check pins down:

- initial weights: ``from_pretrained`` under ZeRO-3 partitions and gathers the saved weights exactly;
- losses: the all-reduced per-rank losses equal the 1-process full-batch losses (rel 1e-6);
- 'same' batching (every rank the whole batch): the weights equal the 1-process run's (rel 1e-6;
  exact on this machine): the ranks' forwards see the same weights bit for bit;
- 'split' batching (data parallel): a half-batch forward rounds differently from the full batch
  (~1e-7 relative), and the central difference divides that by 2 eps, so the projected gradients
  differ by ~1e-4 relative and the weights by ~1e-4 of how far they moved. The sharded arithmetic
  itself is checked exactly instead: replaying the ZeRO-3 run's logged scalars in one process must
  give its weights bit for bit;
- collectives: exactly one all-reduce per step (the losses); the rest are DeepSpeed's all-gathers;
- 'persist' (a persistence threshold, as HF's configs set): the parameters DeepSpeed keeps whole on every
  rank train as replicated ones, checked like 'split'.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from zo_scale.core.optimizer import StepRecord

sys.path.insert(0, str(Path(__file__).parent))
from two_ranks import launch_two_ranks  # noqa: E402
from zero3_cases import MODELS, build_model, fixed_batch, make_optimizer  # noqa: E402

ROOT = Path(__file__).parents[2]
WORKER = Path(__file__).parent / "zero3_worker.py"
CONFIG = ROOT / "ds_configs" / "zero3.json"
STEPS = 10
CASES = [
    "opt:zosgd:same",
    "opt:zosgd:split",
    "llama:zosgd:split",
    "opt-odd:zosgd:split",  # odd numels: the last rank's partitions end in padding
    "llama:lozo:split",
    "opt:zoadam-lazy:split",
    "llama:hizoo:split",
    "opt:zoadam-lazy:persist",  # norms and biases persistent: whole on every rank, their Adam state too
]
LAUNCH_TIMEOUT_S = 300


def test_deepspeed_is_installed():
    """The backend needs DeepSpeed: missing, this fails (it is a dependency of the backend, not optional)."""
    import deepspeed  # noqa: F401

    from zo_scale.backends import zero3  # noqa: F401


def test_load_config_refuses_what_would_undo_or_hide_zo_updates():
    from zo_scale.backends.zero3 import load_config

    cfg = load_config(CONFIG)
    assert cfg["zero_optimization"]["stage"] == 3 and "optimizer" not in cfg
    filled = load_config({"zero_optimization": {"stage": 3}})["zero_optimization"]
    assert filled["stage3_param_persistence_threshold"] == 0 == filled["stage3_model_persistence_threshold"]
    bad = [
        ({"zero_optimization": {"stage": 2}}, "stage must be 3"),
        ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}, "no 'optimizer'"),
        ({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100,
                                "offload_param": {"device": "nvme", "nvme_path": "/tmp"}}}, "persistence"),
        ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}, "hpz"),
        ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}, "quantized"),
    ]
    for config, message in bad:
        with pytest.raises(ValueError, match=message):
            load_config(config)


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    """Launch the 2-rank worker once for all cases; returns {case: saved results} and the launch time."""
    return launch_two_ranks(WORKER, CASES, build_model, tmp_path_factory.mktemp("zero3"),
                            ["--config", str(CONFIG), "--steps", str(STEPS)], timeout_s=LAUNCH_TIMEOUT_S)


def reference(model_name: str, opt_name: str, records: list[dict] | None = None) -> tuple[list[float], dict]:
    """The 1-process run (no DeepSpeed, whole-parameter shards): its losses and final weights.

    With ``records`` it replays those steps' logged scalars instead of running forwards.
    """
    model = build_model(model_name)
    opt = make_optimizer(opt_name, model.named_parameters())
    batch = fixed_batch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run 1 thread each: same GEMM kernels and summation order
    try:
        if records is None:
            losses = [opt.step(lambda: model(input_ids=batch, labels=batch).loss) for _ in range(STEPS)]
        else:
            losses = [opt.step(replay=StepRecord(**r)) for r in records]
        opt.flush()
    finally:
        torch.set_num_threads(threads)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("case", CASES)
def test_zero3_matches_one_process(zero3_runs, case):
    results, _ = zero3_runs
    run = results[case]
    model_name, opt_name, batching = case.split(":")
    assert run["world"] == 2

    saved = dict(build_model(model_name).named_parameters())
    assert sorted(run["initial"]) == sorted(saved)
    if batching == "persist":  # some parameters persistent, some partitioned
        assert 0 < len(run["persistent"]) < len(saved), run["persistent"]
    for name, param in saved.items():
        assert torch.equal(run["initial"][name], param), f"{name}: from_pretrained under ZeRO-3 changed it"

    losses, weights = reference(model_name, opt_name)
    assert max_rel(run["losses"], losses) <= 1e-6, (run["losses"], losses)
    moved = max((weights[n] - saved[n]).abs().max().item() for n in weights)
    assert moved > 1e-3, "the steps must move the weights for the comparison to mean anything"
    worst = max(((run["final"][n] - w).abs().max() / w.abs().max()).item() for n, w in weights.items())
    worst_abs = max((run["final"][n] - w).abs().max().item() for n, w in weights.items())
    if batching == "same":
        assert worst <= 1e-6, worst
    else:
        assert worst_abs <= 2e-3 * moved, (worst_abs, moved)  # observed ~1e-4 * moved, see the module doc
        _, replayed = reference(model_name, opt_name, run["records"])
        for name, w in replayed.items():
            assert torch.equal(run["final"][name], w), f"{name}: sharded update differs from the 1-process one"


@pytest.mark.parametrize("case", ["opt:zosgd:split", "llama:lozo:split"])
def test_one_loss_all_reduce_per_step(zero3_runs, case):
    counts = zero3_runs[0][case]["collectives"]
    assert counts.get("c10d::allreduce_") == 1, counts  # central, 1 query: the 2 losses in one all-reduce
    assert counts.get("c10d::_allgather_base_", 0) >= 2, counts  # DeepSpeed gathers for each of the 2 forwards
    assert set(counts) <= {"c10d::allreduce_", "c10d::_allgather_base_"}, counts


def test_models_cover_padding():
    """'opt-odd' must really have odd numels (partitions with a padded tail on rank 1 of 2)."""
    assert MODELS["opt-odd"][0] == "opt"
    assert any(p.numel() % 2 for p in build_model("opt-odd").parameters())
