"""PEFT adapters under ZO: LoRA, prefix and prompt tuning on the tiny OPT and LLaMA models.

The batch is fixed random tokens drawn from 8 byte tokens: a random tiny model already predicts all
259 tokens about uniformly (loss ~ ln 259 = 5.56), so a batch uniform over the whole vocabulary
would leave an adapter nothing to learn, while 8 tokens give it a direction to move in.
"""

import pytest
import torch
from peft import PeftModel

from zo_scale import ZOSGD
from zo_scale.adapters.peft_tuning import (
    PeftSettings,
    apply_peft,
    merge_and_export,
    save_adapter,
    trainable_named_parameters,
)
from zo_scale.core.shards import canonical_name
from zo_scale.models import load_model
from zo_scale.models.tiny import learnable_token_batch

ARCHS = ("tiny-opt", "tiny-llama")
STEPS = 50
# (lr, eps, least drop in nats of the last 5 step losses below the first). A random tiny model's loss
# is nearly flat in the adapter weights (logits are tiny), hence lrs far above MeZO's for real models.
HYPERPARAMS = {"lora": (0.1, 1e-2, 0.1), "prefix": (20.0, 1e-1, 0.1), "prompt": (100.0, 1e-1, 0.02)}
ADAPTER_MARK = {"lora": ".lora_", "prefix": "prompt_encoder.", "prompt": "prompt_encoder."}


pytestmark = pytest.mark.usefixtures("one_thread")


def adapted(arch: str, method: str, **kw) -> torch.nn.Module:
    model, _ = load_model(arch)
    return apply_peft(model, PeftSettings(method=method, **kw), seed=0)


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_adapter(model: torch.nn.Module) -> None:
    """Move the adapter off its initial value (LoRA's B starts at 0, so an untrained LoRA is the base)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in trainable_named_parameters(model):
            p.add_(0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
@pytest.mark.parametrize("arch", ARCHS)
def test_zo_trains_the_adapter_and_leaves_the_base_bitwise_unchanged(arch, method):
    model = adapted(arch, method)
    trainable = trainable_named_parameters(model)
    names = {n for n, _ in trainable}
    assert names and all(ADAPTER_MARK[method] in n for n in names), sorted(names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in names)
    base_before = {n: t.clone() for n, t in model.state_dict().items() if n not in names}
    adapter_before = {n: p.detach().clone() for n, p in trainable}

    lr, eps, least_drop = HYPERPARAMS[method]
    ids = learnable_token_batch()
    optimizer = ZOSGD(trainable, lr=lr, eps=eps, seed=0)
    losses = [optimizer.step(lambda: lm_loss(model, ids)) for _ in range(STEPS)]

    last = sum(losses[-5:]) / 5
    assert last < losses[0] - least_drop, f"{arch} {method}: first {losses[0]:.4f}, last 5 mean {last:.4f}"
    after = model.state_dict()
    changed = [n for n, t in base_before.items() if not torch.equal(after[n], t)]
    assert not changed, f"base tensors changed: {changed}"
    assert all(not torch.equal(p, adapter_before[n]) for n, p in trainable)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_defaults_wrap_q_and_v_and_keep_base_names_for_noise_streams(arch):
    model = adapted(arch, "lora")
    names = [n for n, _ in trainable_named_parameters(model)]
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert wrapped == {"q_proj", "v_proj"}
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for n, p in trainable_named_parameters(model):  # rank 8: A is (8, in), B is (out, 8)
        assert p.shape[0 if ".lora_A." in n else 1] == 8, (n, p.shape)
    # the ZO core strips peft's prefix: each LoRA weight's stream key is its name in the unwrapped model
    base_names = {n for n, _ in model.get_base_model().named_parameters()}
    assert {canonical_name(n) for n in names} <= base_names


def test_lora_default_dropout_makes_train_mode_forwards_repeatable():
    model = adapted("tiny-opt", "lora")
    randomize_adapter(model)  # with B = 0 the LoRA branch (and its dropout) would not show in the output
    model.train()
    ids = learnable_token_batch()
    assert torch.equal(lm_loss(model, ids), lm_loss(model, ids))


def test_apply_peft_seed_fixes_the_initial_adapter():
    first, second = adapted("tiny-llama", "prefix"), adapted("tiny-llama", "prefix")
    (_, a), = trainable_named_parameters(first)
    (_, b), = trainable_named_parameters(second)
    assert torch.equal(a, b)


def test_method_none_returns_the_model_with_every_parameter_trainable():
    model, _ = load_model("tiny-opt")
    assert apply_peft(model, PeftSettings()) is model
    assert len(trainable_named_parameters(model)) == len(list(model.parameters()))


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_saved_adapter_reloads_onto_a_fresh_base_with_identical_logits(method, tmp_path):
    arch, ids = "tiny-llama", learnable_token_batch()
    model = adapted(arch, method)
    randomize_adapter(model)
    expected = logits(model, ids)
    save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()

    fresh_base, _ = load_model(arch)
    base_logits = logits(fresh_base, ids)
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path)
    got = logits(reloaded, ids)
    assert torch.equal(got, expected)
    assert not torch.allclose(got[:, -ids.shape[1]:], base_logits, atol=1e-3)  # the adapter did load


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_merge_and_export_saves_a_plain_model_with_the_adapted_logits(arch, tmp_path):
    ids = learnable_token_batch()
    model = adapted(arch, "lora")
    randomize_adapter(model)
    expected = logits(model, ids)
    base_logits = logits(load_model(arch)[0], ids)

    merged = merge_and_export(model, tmp_path)
    exported, _ = load_model(arch, weights=tmp_path)
    assert not isinstance(exported, PeftModel)
    assert not any("lora" in n for n, _ in exported.named_parameters())
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(exported, ids), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the merge carried a real change


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_merging_a_prefix_or_prompt_adapter_is_a_clear_error(method, tmp_path):
    with pytest.raises(ValueError, match="cannot merge a .* adapter .*only LoRA merges"):
        merge_and_export(adapted("tiny-opt", method), tmp_path)
    assert not any(tmp_path.iterdir())


def test_unknown_method_is_named():
    model, _ = load_model("tiny-opt")
    with pytest.raises(ValueError, match=r"unknown PEFT method 'adapterx'; choose one of none, lora, prefix, prompt"):
        apply_peft(model, PeftSettings(method="adapterx"))


def test_missing_target_module_is_named():
    model, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match=r"LoRA target module\(s\) \['c_attn'\] not found"):
        apply_peft(model, PeftSettings(method="lora", target_modules=["q_proj", "c_attn"]))
    assert not any(p.requires_grad is False for p in model.parameters())  # nothing was wrapped or frozen


def test_adapter_functions_reject_an_unwrapped_model(tmp_path):
    model, _ = load_model("tiny-opt")
    with pytest.raises(ValueError, match="expected a model wrapped by apply_peft"):
        save_adapter(model, tmp_path)
