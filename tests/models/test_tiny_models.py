import pytest
import torch

from zo_scale.models import TINY_ARCHS, build_byte_tokenizer, build_tiny_model, load_model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_is_deterministic_per_seed(arch):
    assert _same_weights(build_tiny_model(arch, seed=3), build_tiny_model(arch, seed=3))
    assert not _same_weights(build_tiny_model(arch, seed=3), build_tiny_model(arch, seed=4))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_logits_shape_and_left_padding(arch):
    model, tokenizer = load_model(f"tiny-{arch}")
    assert not model.training
    texts = ["the movie was", " great"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0, "shorter text should be padded on the left"
    single = tokenizer(texts[1:], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        alone = model(**single).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    # Left padding must not change what the model predicts after the last real token.
    torch.testing.assert_close(logits[1, -1], alone[0, -1], atol=1e-5, rtol=1e-4)


def test_load_model_seed_reaches_tiny_model():
    a, _ = load_model("tiny-llama", seed=1)
    b, _ = load_model("tiny-llama", seed=1)
    c, _ = load_model("tiny-llama", seed=2)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_tiny_model_overrides_and_defaults():
    model = build_tiny_model("llama", num_hidden_layers=4)
    assert len(model.model.layers) == 4
    assert model.config.hidden_size == 64
    assert model.config.num_key_value_heads == 2
    opt = build_tiny_model("opt", hidden_size=32)
    assert opt.get_input_embeddings().weight.shape == (len(build_byte_tokenizer()), 32)


def test_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("mistral", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_model_in_bfloat16_keeps_rotary_buffer_fp32():
    model, _ = load_model("tiny-llama", dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_unknown_tiny_arch():
    with pytest.raises(ValueError, match="gpt2.*opt, llama, mistral"):
        build_tiny_model("gpt2")


def test_byte_tokenizer_round_trips_and_pads_left():
    tokenizer = build_byte_tokenizer()
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer.encode(" great")) == 6
    assert len(tokenizer.encode("é")) == 2, "one token per UTF-8 byte"
    text = "Héllo, wörld!\n\ttabs  and 🤖 emoji"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.convert_tokens_to_ids("</s>") == tokenizer.eos_token_id
    assert len(tokenizer.encode("</s>")) == 1
