import huggingface_hub.constants
import pytest
import torch

from zo_scale.models import ModelLoadError, build_byte_tokenizer, build_tiny_model, load_model, resolve_dtype


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
    ],
)
def test_resolve_dtype(name, expected):
    assert resolve_dtype(name) is expected


def test_bad_dtype_lists_choices():
    with pytest.raises(ValueError, match="float64.*float32.*bf16.*fp16"):
        resolve_dtype("float64")
    with pytest.raises(ValueError, match="int8"):
        load_model("tiny-opt", dtype="int8")


def test_unknown_hub_name_raises_model_load_error(monkeypatch):
    # Offline mode makes the hub lookup fail at once instead of retrying the network for ~25 s.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="no-such-model-xyz") as info:
        load_model("no-such-model-xyz")
    message = str(info.value)
    assert "tiny-opt" in message and "smollm2-135m" in message
    assert "\n" not in message


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_bad_local_folder_raises_model_load_error(tmp_path, kind):
    folder = tmp_path / "model"
    if kind == "empty":
        folder.mkdir()
    with pytest.raises(ModelLoadError, match=str(folder)):
        load_model(str(folder))


def test_load_local_folder(tmp_path):
    model = build_tiny_model("llama", seed=5)
    tokenizer = build_byte_tokenizer()
    # A saved tokenizer without a pad token must come back padding with eos.
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded, loaded_tokenizer = load_model(str(tmp_path), dtype="bf16")
    assert loaded_tokenizer.padding_side == "left"
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token == "</s>"
    assert not loaded.training
    assert loaded.dtype == torch.bfloat16
    expected = model.state_dict()["model.embed_tokens.weight"].to(torch.bfloat16)
    assert torch.equal(loaded.state_dict()["model.embed_tokens.weight"], expected)
