import json

import huggingface_hub.constants
import pytest
import torch

from zo_scale.models import ARCHITECTURES, ModelLoadError, architecture_config, load_model, meta_model

# Parameter counts the model cards publish (Llama-2 and Mistral to the element; the others as rounded there).
PUBLISHED = {
    "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096,
    "llama-3-70b": 70.6e9, "qwen2.5-72b": 72.7e9, "opt-1.3b": 1.3e9, "opt-6.7b": 6.7e9, "opt-13b": 13e9,
    "opt-30b": 30e9, "opt-66b": 66e9, "opt-175b": 175e9,
}


def test_every_family_member_the_issue_names_is_shipped():
    assert set(ARCHITECTURES) == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_shipped_architecture_builds_on_meta_with_its_published_size(name):
    model = meta_model(architecture_config(name))
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    count = sum(p.numel() for p in params)
    exact = isinstance(PUBLISHED[name], int)  # the others' names round to 2-3 digits
    assert count == PUBLISHED[name] if exact else abs(count / PUBLISHED[name] - 1) < 0.02, count


def _tiny_config(tmp_path, **overrides):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 300,
              **overrides}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_random_model_from_a_config_file_or_folder_is_seeded_and_byte_tokenized(tmp_path):
    path = _tiny_config(tmp_path)
    a, tokenizer = load_model(f"random:{path}", seed=3)
    b, _ = load_model(f"random:{tmp_path}", seed=3)
    c, _ = load_model(f"random:{path}", seed=4)
    assert len(tokenizer) == 259 and a.config.num_hidden_layers == 2
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert load_model(f"random:{path}", dtype="bfloat16")[0].dtype == torch.bfloat16


def test_random_model_refusals_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="vocab_size 100 is smaller than the 259 tokens"):
        load_model(f"random:{_tiny_config(tmp_path, vocab_size=100)}")
    with pytest.raises(ModelLoadError, match="cannot be quantized"):
        load_model("random:llama-2-7b", quantization="int8")
    with pytest.raises(ModelLoadError, match="no model architecture 'llama-9-1b'.*llama-2-70b"):
        load_model("random:llama-9-1b")
