"""The planner's arithmetic, term by term, on shipped architectures (meta builds: no weights)."""

import json
import math

import pytest

from zo_scale.backends.zero3 import load_config as check_zero3_config
from zo_scale.models import architecture_config
from zo_scale.plan.memory import GiB, RunSettings, ds_config, plan_memory
from zo_scale.plan.shapes import ModelShape


@pytest.fixture(scope="module")
def llama70():
    return ModelShape.of(architecture_config("llama-2-70b"))


def test_the_shape_reads_the_counts_off_the_meta_model(llama70):
    s = llama70
    assert (s.parameters, s.layers, s.hidden, s.intermediate, s.vocab, s.kv_heads) == (
        68_976_648_192, 80, 8192, 28672, 32000, 8)
    assert s.largest_parameter == s.largest_module == 32000 * 8192  # the embedding (= the untied LM head)
    assert s.block == 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192  # q o, k v, MLP, 2 norms
    assert s.lora_per_rank == 80 * ((8192 + 8192) + (8192 + 1024))  # q_proj and v_proj (8 kv heads of 128)
    hybrid = ModelShape.of(architecture_config("llama-2-70b"), fo_layers=2)
    assert hybrid.fo_parameters == 2 * s.block + 8192 + 32000 * 8192  # 2 blocks, the final norm, the LM head


def test_zero3_splits_the_weights_and_offload_moves_them(llama70):
    e = 2
    single = plan_memory(llama70, RunSettings())
    zero3 = plan_memory(llama70, RunSettings(mode="zero3", gpus=8))
    cpu = plan_memory(llama70, RunSettings(mode="zero3", gpus=8, offload="cpu"))
    nvme = plan_memory(llama70, RunSettings(mode="zero3", gpus=8, offload="nvme"))
    assert single.gpu["weights"] == llama70.parameters * e
    assert zero3.gpu["weights"] == llama70.parameters * e // 8
    assert "weights" not in cpu.gpu and cpu.host["weights"] == zero3.gpu["weights"] * 8
    assert "weights" not in nvme.gpu and "weights" not in nvme.host
    assert nvme.nvme["weights"] == llama70.parameters * e
    buffer = max(100_000_000, math.ceil(llama70.largest_parameter / 8))
    assert nvme.host["swap buffers"] == 5 * buffer * e * 8
    # only ZeRO-3 gathers, and its working set is a module plus the prefetch bucket, whatever the offload
    assert "gathered parameters" not in single.gpu
    assert zero3.gpu["gathered parameters"] == cpu.gpu["gathered parameters"] == (
        llama70.largest_module + 50_000_000) * e
    assert nvme.per_gpu_bytes == cpu.per_gpu_bytes < zero3.per_gpu_bytes < single.per_gpu_bytes


def test_optimizer_state_and_master_weights_per_trained_element(llama70):
    full = dict(mode="zero3", gpus=8)
    base = plan_memory(llama70, RunSettings(**full))
    adam = plan_memory(llama70, RunSettings(**full, rule="adam", master_weights=True))
    assert "optimizer state" not in base.gpu
    assert adam.gpu["optimizer state"] == llama70.parameters // 8 * (8 + 4)
    lora = plan_memory(llama70, RunSettings(tuning="lora", lora_r=16, rule="momentum"))
    assert lora.gpu["adapter"] == 16 * llama70.lora_per_rank * 4
    assert lora.gpu["optimizer state"] == 16 * llama70.lora_per_rank * 4
    assert lora.host["checkpoint save"] == lora.gpu["adapter"]  # the adapter alone is saved


def test_in_forward_stacks_the_batch_and_copies_the_largest_module(llama70):
    in_place = plan_memory(llama70, RunSettings(batch=8, seq=512))
    in_forward = plan_memory(llama70, RunSettings(batch=8, seq=512, perturb="in_forward", queries=2))
    assert in_forward.gpu["activations"] == pytest.approx(4 * in_place.gpu["activations"], rel=1e-9)  # K = 2q, q = 2
    assert in_forward.gpu["perturbed copies"] == 4 * llama70.largest_module * 2
    assert "perturbed copies" not in in_place.gpu
    fzoo = plan_memory(llama70, RunSettings(batch=8, seq=512, perturb="in_forward", estimator="fzoo", queries=8))
    assert fzoo.gpu["activations"] == pytest.approx(9 * in_place.gpu["activations"], rel=1e-9)  # K = q + 1


def test_transient_terms_count_once_the_largest_phase(llama70):
    plan = plan_memory(llama70, RunSettings(mode="zero3", gpus=8, offload="cpu"))
    resident = sum(b for n, b in plan.host.items() if n not in plan.phase)
    assert plan.phase["checkpoint save"] == "save" and plan.phase["model build"] == "load"
    assert plan.host_bytes == resident + max(plan.host["checkpoint save"], plan.host["model build"])
    step = sum(b for n, b in plan.gpu.items() if plan.phase.get(n) == "step")
    assert plan.per_gpu_bytes == plan.gpu["CUDA context"] + step


def test_quantized_bases_keep_their_bytes(llama70):
    e = 2
    floats = llama70.parameters - llama70.linear
    int8 = plan_memory(llama70, RunSettings(quantization="int8", tuning="lora"))
    nf4 = plan_memory(llama70, RunSettings(quantization="nf4", tuning="lora"))
    assert int8.gpu["weights"] == llama70.linear + 4 * llama70.linear_rows + floats * e
    assert nf4.gpu["weights"] == llama70.linear // 2 + llama70.linear // 64 * 4 + floats * e


@pytest.mark.parametrize(("settings", "message"), [
    (dict(mode="zero3", quantization="int8"), "refuses"),
    (dict(offload="cpu"), "needs mode zero3"),
    (dict(gpus=4), "mode single runs one rank"),
    (dict(mode="zero3", gpus=3, nodes=2), "split evenly"),
    (dict(tuning="adapter"), "tuning: unknown 'adapter'"),
    (dict(batch=0), "batch must be at least 1"),
    (dict(seq=4, answer_tokens=4), "shorter than seq"),
])
def test_settings_the_trainer_would_refuse_are_refused(llama70, settings, message):
    with pytest.raises(ValueError, match=message):
        plan_memory(llama70, RunSettings(**settings))


def test_the_plan_fits_or_says_what_does_not(llama70):
    small = plan_memory(llama70, RunSettings(gpu_memory=24 * GiB, host_memory=64 * GiB))
    assert any("each GPU needs" in p for p in small.problems()) and not small.as_json()["fits"]
    nvme = plan_memory(llama70, RunSettings(mode="zero3", offload="nvme", gpu_memory=24 * GiB,
                                            host_memory=64 * GiB, nvme_space=100 * GiB))
    assert nvme.problems() == [f"NVMe needs {nvme.nvme_bytes / GiB:.1f} GiB, it has 100.0 GiB"]


@pytest.mark.parametrize("offload", ["none", "cpu", "nvme"])
def test_the_ds_config_is_one_the_zero3_backend_accepts(llama70, offload):
    settings = RunSettings(mode="zero3", gpus=4, offload=offload, dtype="bfloat16")
    config = ds_config(settings, llama70)
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    checked = check_zero3_config(config)
    if offload == "nvme":
        assert checked["zero_optimization"]["offload_param"]["buffer_size"] >= llama70.largest_parameter / 4
    assert ds_config(RunSettings(), llama70) is None
    json.dumps(config)
