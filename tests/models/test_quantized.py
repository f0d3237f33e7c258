"""bitsandbytes int8 / NF4 base models: loading, LoRA and prefix ZO over a frozen quantized base (the
QLoRA shape), and QZO-style full-parameter ZO that moves the quantization scales and never the codes.

The batch is the one of tests/adapters/test_peft_tuning.py: fixed random tokens drawn from 8 byte
tokens, so that a random tiny model (loss ~ ln 259 = 5.56) has a direction to learn.
"""

import math
import sys

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from zo_scale import ZOSGD
from zo_scale.adapters.peft_tuning import PeftSettings, apply_peft, trainable_named_parameters
from zo_scale.models import ModelLoadError, load_model, quantized_scales
from zo_scale.models.tiny import build_tiny_model, learnable_token_batch

ARCHS = ("tiny-opt", "tiny-llama")
QUANTS = ("int8", "nf4")
STEPS = 50
# (lr, eps, least drop in nats of the last 5 step losses below the first); the adapter settings are
# those of tests/adapters/test_peft_tuning.py. QZO: see the step-size notes in zo_scale/models/quantized.py.
PEFT_HYPERPARAMS = {"lora": (0.1, 1e-2, 0.1), "prefix": (20.0, 1e-1, 0.1)}
QZO_FULL = (3e-3, 1e-3, 0.25)
QZO_SCALES_ONLY = (1e-2, 1e-3, 0.05)


pytestmark = pytest.mark.usefixtures("one_thread")


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def bnb_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))}


def scale_read_by_forward(module: torch.nn.Module) -> torch.Tensor:
    """Where bnb 0.50.2's forward takes the scale from: int8 reads module.state.SCB (the weight's SCB
    moves there at the first forward), NF4 reads weight.quant_state.absmax (unpacked CPU layout)."""
    if isinstance(module, bnb.nn.Linear8bitLt):
        return module.state.SCB if module.weight.SCB is None else module.weight.SCB
    return module.weight.quant_state.absmax


def quantized_tensors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(codes, scale) of every bitsandbytes layer, cloned."""
    return {n: (m.weight.data.clone(), scale_read_by_forward(m).clone()) for n, m in bnb_layers(model).items()}


def train(model: torch.nn.Module, params: list, lr: float, eps: float, ids: torch.Tensor, steps: int = STEPS):
    optimizer = ZOSGD(params, lr=lr, eps=eps, seed=0)
    return [optimizer.step(lambda: lm_loss(model, ids)) for _ in range(steps)]


def assert_loss_fell(losses: list[float], least_drop: float, label: str) -> None:
    last = sum(losses[-5:]) / 5
    assert all(math.isfinite(x) for x in losses), f"{label}: {losses}"
    assert last < losses[0] - least_drop, f"{label}: first {losses[0]:.4f}, last 5 mean {last:.4f}"


# -- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_load_model_quantizes_the_linear_layers_and_keeps_the_rest_float(arch, quantization):
    ids = learnable_token_batch()
    reference, _ = load_model(arch)
    model, tokenizer = load_model(arch, quantization=quantization)
    assert not model.training and tokenizer.padding_side == "left"

    layers = bnb_layers(model)
    linears = [n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert sorted(layers) == sorted(linears)  # every decoder linear layer, lm_head left in float
    code_dtype = torch.int8 if quantization == "int8" else torch.uint8
    assert all(m.weight.dtype == code_dtype for m in layers.values())
    assert all(scale_read_by_forward(m).dtype == torch.float32 for m in layers.values())
    floats = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    assert floats and all(p.dtype == torch.float32 for p in floats.values())
    assert any("embed_tokens" in n for n in floats)

    expected, got = logits(reference, ids), logits(model, ids)
    error = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert 0 < error < (0.05 if quantization == "int8" else 0.25) * scale, (error, scale)


@pytest.mark.parametrize("quantization", QUANTS)
def test_bf16_quantized_model_runs_with_float32_scales(quantization):
    model, _ = load_model("tiny-llama", dtype="bf16", quantization=quantization)
    ids = learnable_token_batch()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and math.isfinite(out.loss.item())
    dtypes = {n: t.dtype for n, t in quantized_scales(model)}
    assert {d for n, d in dtypes.items() if n.endswith((".SCB", ".absmax"))} == {torch.float32}
    assert {d for n, d in dtypes.items() if not n.endswith((".SCB", ".absmax"))} == {torch.bfloat16}


def test_unknown_quantization_names_the_choices():
    with pytest.raises(ModelLoadError, match=r"unknown quantization 'int4'; choose one of none, int8, nf4"):
        load_model("tiny-opt", quantization="int4")


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'zo-scale\[quant\]'"):
        load_model("tiny-opt", quantization="nf4")
    with pytest.raises(ImportError, match=r"pip install 'zo-scale\[quant\]'"):
        quantized_scales(load_model("tiny-opt")[0])
    load_model("tiny-opt")  # no quantization asked for: bitsandbytes is not needed


def test_a_quantized_checkpoint_loads_only_with_its_own_quantization(tmp_path):
    model, _ = load_model("tiny-llama", quantization="int8")
    model.save_pretrained(tmp_path)
    for wrong in ("none", "nf4"):
        with pytest.raises(ModelLoadError, match=rf"saved int8-quantized; load them with quantization='int8', "
                                                 rf"not '{wrong}'"):
            load_model("tiny-llama", weights=tmp_path, quantization=wrong)
    reloaded, _ = load_model("tiny-llama", weights=tmp_path, quantization="int8")
    assert sorted(bnb_layers(reloaded)) == sorted(bnb_layers(model))


def test_an_unquantized_checkpoint_is_quantized_on_load(tmp_path):
    ids = learnable_token_batch()
    saved = build_tiny_model("opt", seed=3).eval()
    saved.save_pretrained(tmp_path)
    model, _ = load_model("tiny-opt", weights=tmp_path, quantization="nf4")  # seed 0 would build other weights
    assert len(bnb_layers(model)) == 2 * 6  # 2 layers x (q, k, v, out_proj, fc1, fc2)
    got = logits(model, ids)
    error = (got - logits(saved, ids)).abs().mean()
    assert 0 < error < (got - logits(load_model("tiny-opt", seed=0)[0], ids)).abs().mean() / 3


# -- adapters over a frozen quantized base (QLoRA shape) ---------------------------------------


@pytest.mark.parametrize("method", ["lora", "prefix"])
@pytest.mark.parametrize("quantization", QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_zo_trains_an_adapter_over_a_quantized_base_that_stays_bitwise_unchanged(arch, quantization, method):
    base, _ = load_model(arch, quantization=quantization)
    model = apply_peft(base, PeftSettings(method=method), seed=0)
    trainable = trainable_named_parameters(model)
    names = {n for n, _ in trainable}
    assert names and all(("lora_" if method == "lora" else "prompt_encoder") in n for n in names)
    frozen_before = {n: t.clone() for n, t in model.state_dict().items() if n not in names}
    assert any(n.endswith((".SCB", ".absmax")) for n in frozen_before)  # the scales are in the comparison
    quantized_before = quantized_tensors(model)
    assert quantized_before

    lr, eps, least_drop = PEFT_HYPERPARAMS[method]
    losses = train(model, trainable, lr, eps, learnable_token_batch())

    assert_loss_fell(losses, least_drop, f"{arch} {quantization} {method}")
    after = model.state_dict()
    assert [n for n, t in frozen_before.items() if not torch.equal(after[n], t)] == []
    for name, (codes, scale) in quantized_tensors(model).items():
        assert torch.equal(codes, quantized_before[name][0]) and torch.equal(scale, quantized_before[name][1]), name


# -- QZO: full-parameter ZO through the scales ------------------------------------------------


@pytest.mark.parametrize("quantization", QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_scales_are_the_tensors_the_forward_reads(arch, quantization):
    model, _ = load_model(arch, quantization=quantization)
    ids = learnable_token_batch()
    params = quantized_scales(model)
    layers = bnb_layers(model)
    kind = "SCB" if quantization == "int8" else "absmax"

    by_name = dict(params)
    assert len(by_name) == len(params)
    assert sorted(n for n in by_name if n.endswith(f".weight.{kind}")) == sorted(f"{n}.weight.{kind}" for n in layers)
    first = "model.decoder.layers.0.self_attn.q_proj" if arch == "tiny-opt" else "model.layers.0.self_attn.q_proj"
    assert f"{first}.weight.{kind}" in by_name
    floats = {n for n, p in model.named_parameters() if p.is_floating_point()}
    assert {n for n in by_name if not n.endswith(f".weight.{kind}")} == floats  # every float parameter
    for name, module in layers.items():
        out_features, in_features = module.out_features, module.in_features
        expected = (out_features,) if quantization == "int8" else (math.ceil(out_features * in_features / 64),)
        scale = by_name[f"{name}.weight.{kind}"]
        assert scale.shape == expected and scale.dtype == torch.float32 and scale.is_contiguous(), name

    before = logits(model, ids)  # the first forward moves int8's SCB into module.state: still the same tensor
    for name, module in layers.items():
        assert scale_read_by_forward(module) is by_name[f"{name}.weight.{kind}"], name
    scale = by_name[f"{first}.weight.{kind}"]
    with torch.no_grad():
        scale.mul_(1.5)
    moved = logits(model, ids)
    with torch.no_grad():
        scale.div_(1.5)
    assert not torch.allclose(moved, before, atol=1e-4)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantization", QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_qzo_moves_the_scales_and_float_weights_never_the_codes(arch, quantization):
    model, _ = load_model(arch, quantization=quantization)
    params = quantized_scales(model)
    before = quantized_tensors(model)
    floats_before = {n: p.detach().clone() for n, p in params if not n.endswith((".SCB", ".absmax"))}

    lr, eps, least_drop = QZO_FULL
    losses = train(model, params, lr, eps, learnable_token_batch())

    assert_loss_fell(losses, least_drop, f"{arch} {quantization} QZO full")
    for name, (codes, scale) in quantized_tensors(model).items():
        assert torch.equal(codes, before[name][0]), f"{name}: the quantized codes changed"
        assert not torch.equal(scale, before[name][1]), f"{name}: the scale did not move"
    assert all(not torch.equal(p, floats_before[n]) for n, p in params if n in floats_before)


@pytest.mark.parametrize("quantization", QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_qzo_scales_only_trains_the_scales_alone(arch, quantization):
    model, _ = load_model(arch, quantization=quantization)
    params = quantized_scales(model, scales_only=True)
    assert params and all(n.endswith((".SCB", ".absmax")) for n, _ in params)
    before = quantized_tensors(model)
    floats_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()}

    lr, eps, least_drop = QZO_SCALES_ONLY
    losses = train(model, params, lr, eps, learnable_token_batch())

    assert_loss_fell(losses, least_drop, f"{arch} {quantization} QZO scales only")
    for name, (codes, scale) in quantized_tensors(model).items():
        assert torch.equal(codes, before[name][0]) and not torch.equal(scale, before[name][1]), name
    assert all(torch.equal(p, floats_before[n]) for n, p in model.named_parameters() if n in floats_before)


@pytest.mark.parametrize("quantization", QUANTS)
def test_trained_scales_survive_save_and_reload(quantization, tmp_path):
    arch, ids = "tiny-llama", learnable_token_batch()
    model, _ = load_model(arch, quantization=quantization)
    untrained = logits(model, ids)
    params = quantized_scales(model)
    lr, eps, _ = QZO_FULL
    train(model, params, lr, eps, ids, steps=5)
    expected = logits(model, ids)
    assert not torch.allclose(expected, untrained, atol=1e-4)

    model.save_pretrained(tmp_path)
    reloaded, _ = load_model(arch, weights=tmp_path, quantization=quantization)
    assert torch.equal(logits(reloaded, ids), expected)
    trained = dict(params)
    for name, scale in quantized_scales(reloaded):
        assert torch.equal(scale, trained[name]), name


@pytest.mark.parametrize("quantization", QUANTS)
def test_a_model_loaded_from_a_quantized_checkpoint_resaves_only_in_bnb_format(quantization, tmp_path):
    """transformers 5.23 cannot invert the bnb deserialisation it applied at a pre-quantized load, so a
    plain save_pretrained raises; save_original_format=False writes bnb's own state dict, which reloads."""
    arch, ids = "tiny-llama", learnable_token_batch()
    load_model(arch, quantization=quantization)[0].save_pretrained(tmp_path / "first")
    model, _ = load_model(arch, weights=tmp_path / "first", quantization=quantization)
    train(model, quantized_scales(model), *QZO_FULL[:2], ids, steps=3)
    expected = logits(model, ids)

    with pytest.raises(NotImplementedError):
        model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "second", save_original_format=False)
    reloaded, _ = load_model(arch, weights=tmp_path / "second", quantization=quantization)
    assert torch.equal(logits(reloaded, ids), expected)


# -- errors and bitsandbytes' CPU repacking ----------------------------------------------------


def test_quantized_scales_of_a_float_model_is_a_clear_error():
    model, _ = load_model("tiny-opt")
    with pytest.raises(ValueError, match=r"OPTForCausalLM has no bitsandbytes-quantized layers .*quantization='int8'"):
        quantized_scales(model)


def test_double_quantized_nf4_scales_are_refused(tmp_path):
    build_tiny_model("llama").save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map={"": "cpu"})
    with pytest.raises(ValueError, match=r"q_proj uses double quantization.*bnb_4bit_use_double_quant=False"):
        quantized_scales(model)


def test_nf4_layers_keep_their_float32_layout_through_forwards():
    """bnb repacks Linear4bit at its first inference forward on AVX512-BF16 CPUs, into bf16 scales
    that ZO moves would not reach; load_model turns that off, and quantized_scales refuses a repacked model."""
    model, _ = load_model("tiny-llama", quantization="nf4")
    ids = learnable_token_batch()
    logits(model, ids)
    for name, module in bnb_layers(model).items():
        state = module.weight.quant_state
        assert not getattr(state, "packing_format_for_cpu", False), name
        blocks = math.ceil(module.out_features * module.in_features / 64)
        assert state.absmax.dtype == torch.float32 and state.absmax.shape == (blocks,), name

    repacking, _ = load_model("tiny-llama", quantization="nf4")
    for module in bnb_layers(repacking).values():
        module.support_avx512bf16_for_cpu = bnb.functional.has_avx512bf16()  # bnb's own default
    logits(repacking, ids)
    first = next(iter(bnb_layers(repacking).values()))
    if bnb.functional.has_avx512bf16():
        assert first.weight.quant_state.packing_format_for_cpu
        assert first.weight.quant_state.absmax.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="already repacked into bitsandbytes' CPU inference layout"):
            quantized_scales(repacking)
    else:  # no fused bf16 kernel on this CPU: bnb never repacks
        assert not getattr(first.weight.quant_state, "packing_format_for_cpu", False)
        assert quantized_scales(repacking)
