"""A sweep kernel that fails to compile: eager with a warning on the CPU, an error elsewhere; what ran is on record."""

import json
import logging

import pytest
import torch

from zo_scale.core import kernel, noise
from zo_scale.train.cli import main


@pytest.fixture
def fresh_kernel(monkeypatch):
    """No sweep has compiled, run or failed yet in this process (the kernel module keeps that record)."""
    monkeypatch.setattr(kernel, "_compiled", {})
    monkeypatch.setattr(kernel, "_tallies", {})
    monkeypatch.delenv(kernel.ENV, raising=False)


@pytest.fixture
def broken_compiler(monkeypatch, fresh_kernel):
    """torch.compile raises; returns the list of calls it got."""
    calls = []

    def broken(fn, **kwargs):
        calls.append(fn)
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(torch, "compile", broken)
    return calls


def sweep(x, mode):
    return noise.add_noise_(x.clone(), "normal", 1, 2, 0, 0.5, kernel=mode)


def test_auto_on_the_cpu_falls_back_to_eager_with_a_warning_and_a_record(broken_compiler, caplog):
    x = torch.randn(kernel.MIN_COMPILED_NUMEL)
    reference = sweep(x, "eager")
    with caplog.at_level(logging.WARNING, logger="zo_scale.core.kernel"):
        assert torch.equal(sweep(x, "auto"), reference)
        assert torch.equal(sweep(x, "auto"), reference)
    assert len(broken_compiler) == 1  # the second sweep went straight to eager
    (warning,) = caplog.records
    assert warning.levelno == logging.WARNING
    assert "torch.compile failed (RuntimeError: no C compiler)" in warning.getMessage()
    assert "optim.kernel: eager" in warning.getMessage()
    assert kernel.report() == {"cpu": {"implementation": "eager (compile failed: RuntimeError: no C compiler)",
                                       "compiled_calls": 0, "eager_calls": 3,
                                       "compile_failure": "RuntimeError: no C compiler"}}
    assert "torch.compile failed" in kernel.describe("auto", torch.device("cpu"))


def test_compiled_mode_raises_instead_of_falling_back(broken_compiler):
    with pytest.raises(kernel.KernelCompileError, match="no C compiler.*'compiled' never falls back") as raised:
        sweep(torch.randn(100), "compiled")
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert kernel.report() == {}  # no pass ran, compiled or eager


def test_only_auto_on_the_cpu_may_fall_back():
    assert kernel.fallback_allowed("auto", torch.device("cpu"))
    assert not kernel.fallback_allowed("auto", torch.device("cuda"))
    assert not kernel.fallback_allowed("auto", torch.device("cuda", 3))
    assert not kernel.fallback_allowed("compiled", torch.device("cpu"))


def test_a_failed_compile_on_an_accelerator_raises_and_names_the_fix(broken_compiler):
    shard = torch.empty(8, device="meta")  # not the CPU: what decides is the device, before any launch
    with pytest.raises(kernel.KernelCompileError) as raised:
        kernel.run("auto", lambda plan: lambda t: None, "plan", shard, numel=8)
    message = str(raised.value)
    assert "failed on meta (RuntimeError: no C compiler)" in message
    assert "optim.kernel: eager" in message and "ZO_SCALE_KERNEL=eager" in message
    assert "hundreds of times slower" in message
    assert kernel.report() == {}  # nothing fell back
    assert kernel.compiles("auto", torch.device("meta"), 8)  # and the next sweep there tries again


def test_the_report_counts_compiled_and_eager_passes(fresh_kernel):
    sweep(torch.randn(kernel.MIN_COMPILED_NUMEL), "auto")  # compiled
    sweep(torch.randn(100), "auto")  # a small shard on the CPU: eager
    assert kernel.report() == {"cpu": {"implementation": "compiled and eager", "compiled_calls": 1,
                                       "eager_calls": 1, "compile_failure": None}}


def test_a_training_run_records_what_ran_its_sweeps_in_the_summary(fresh_kernel, tmp_path, tiny_overrides):
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides, "run.steps=2", "optim.kernel=eager", f"run.output_dir={out}"]) == 0
    (ran,) = json.loads((out / "summary.json").read_text())["sweep_kernel"]  # one rank
    assert list(ran) == ["cpu"]
    assert ran["cpu"]["implementation"] == "eager" and ran["cpu"]["compile_failure"] is None
    assert ran["cpu"]["compiled_calls"] == 0 and ran["cpu"]["eager_calls"] > 0
