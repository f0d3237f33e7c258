"""NVMe offload's swap buffers sized from the model: DeepSpeed asserts at start-up that each parameter's
partition, ceil(numel / ranks) elements, fits one buffer of ``offload_param.buffer_size`` elements, which its
default (1e8) does not from 7B up. The shipped config says "auto"; a number too small is raised, with one
warning; the planner sizes its buffers with the same function."""

import json
from importlib import resources

import pytest
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from zo_scale.backends.zero3 import load_config as check_zero3_config
from zo_scale.models.architectures import architecture_config
from zo_scale.plan.memory import DEEPSPEED_SWAP_BUFFER, RunSettings, ds_config
from zo_scale.plan.shapes import ModelShape
from zo_scale.train.config import load_config
from zo_scale.train.select_runtime import _model_default, reconcile_deepspeed_config

TINY_LARGEST = 259 * 64  # tiny-llama's embedding (and untied head): 259 byte tokens x hidden 64
KEY = "zero_optimization.offload_param.buffer_size"


def shipped_nvme_config() -> dict:
    return json.loads((resources.files("zo_scale") / "configs" / "deepspeed" / "zero3_offload_nvme.json").read_text())


def nvme(**offload):
    return {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/tmp", **offload}}}


def buffer_size(settings):
    return settings.config["zero_optimization"]["offload_param"].get("buffer_size")


def reconciled(ds, model="tiny-llama", world=1):
    cfg = load_config(None, [f"model.name={model}", "model.dtype=float32", "run.batch_size=4"])
    return reconcile_deepspeed_config(ds, cfg, world)


def test_the_planners_default_is_deepspeeds():
    assert _model_default(DeepSpeedZeroConfig, ["offload_param", "buffer_size"]) == DEEPSPEED_SWAP_BUFFER


def test_the_shipped_nvme_config_sizes_its_buffers_from_the_model():
    shipped = shipped_nvme_config()
    assert shipped["zero_optimization"]["offload_param"]["buffer_size"] == "auto"
    settings = reconciled(shipped, "random:llama-2-7b")
    assert buffer_size(settings) == settings.filled[KEY] == 32000 * 4096  # the embedding, on one rank
    assert buffer_size(reconciled(shipped, "random:llama-2-7b", world=2)) == DEEPSPEED_SWAP_BUFFER  # halves fit
    assert buffer_size(reconciled(shipped, "random:llama-3-8b", world=4)) == -(-128256 * 4096 // 4)  # the head


def test_a_given_size_too_small_is_raised_with_one_warning_naming_the_key(caplog):
    settings = reconciled(nvme(buffer_size=1000), world=2)
    assert buffer_size(settings) == TINY_LARGEST // 2
    settings.warn()
    (line,) = [r.message for r in caplog.records if KEY in r.message]
    assert line.startswith(f"DeepSpeed config: {KEY}=1000 raised to {TINY_LARGEST // 2}:")
    assert "DeepSpeed would assert at start-up" in line and "(16,576 elements) over 2 rank(s)" in line


def test_a_size_left_out_is_deepspeeds_default_and_raised_where_the_model_needs_more(caplog):
    assert buffer_size(reconciled(nvme())) is None  # tiny-llama fits DeepSpeed's default: left to DeepSpeed
    settings = reconciled(nvme(), "random:llama-3-8b")
    assert buffer_size(settings) == 128256 * 4096
    settings.warn()
    assert f"{KEY} (not given: DeepSpeed's default {DEEPSPEED_SWAP_BUFFER}) raised to {128256 * 4096}" in caplog.text


def test_a_size_large_enough_is_kept_silently(caplog):
    settings = reconciled(nvme(buffer_size=20_000))
    assert buffer_size(settings) == 20_000 and not settings.raised and KEY not in settings.filled
    settings.warn()
    assert KEY not in caplog.text


def test_cpu_offload_has_no_swap_buffers_to_size():
    ds = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "buffer_size": "auto"}}}
    assert buffer_size(reconciled(ds, "random:llama-3-8b")) == DEEPSPEED_SWAP_BUFFER  # DeepSpeed's default


@pytest.mark.parametrize(("arch", "world"), [("llama-2-7b", 1), ("llama-3-8b", 1), ("llama-3-8b", 8)])
def test_the_plan_and_the_run_size_the_buffers_alike(arch, world):
    planned = ds_config(RunSettings(mode="zero3", offload="nvme", gpus=world), ModelShape.of(architecture_config(arch)))
    shipped = shipped_nvme_config()
    assert planned["zero_optimization"]["offload_param"]["buffer_size"] == buffer_size(
        reconciled(shipped, f"random:{arch}", world))


def test_the_zero3_backend_takes_the_shipped_config_as_it_is():
    """A library caller (no trainer to size it): "auto" is DeepSpeed's default, which holds a small model."""
    shipped = shipped_nvme_config()
    checked = check_zero3_config(shipped)
    assert "buffer_size" not in checked["zero_optimization"]["offload_param"]
    assert DeepSpeedZeroConfig(**checked["zero_optimization"]).offload_param.buffer_size == DEEPSPEED_SWAP_BUFFER
