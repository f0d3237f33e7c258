"""The streamed HF folder: sharded safetensors + index written a shard at a time, loadable by from_pretrained."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from zo_scale.models.sharded_safetensors import (
    INDEX_FILE,
    TensorSpec,
    parse_size,
    plan_shards,
    saved_tensors,
    spec_of,
    write_hf_folder,
    write_sharded,
)
from zo_scale.models.tiny import build_tiny_model


def test_sizes_read_as_transformers_reads_them():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size(" 1.5 kb ") == 1500
    assert parse_size(4096) == 4096
    for bad in ("lots", "5 parsecs", 0, "-1GB", True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_shards_are_planned_greedily_and_a_large_tensor_sits_alone():
    specs = [TensorSpec(n, (k,), torch.uint8) for n, k in [("a", 4), ("b", 4), ("c", 20), ("d", 1), ("e", 7)]]
    names = lambda plan: [[s.name for s in shard] for shard in plan]  # noqa: E731
    assert names(plan_shards(specs, 10)) == [["a", "b"], ["c"], ["d", "e"]]
    assert names(plan_shards(specs, 100)) == [["a", "b", "c", "d", "e"]]


def stream(model):
    named = saved_tensors(model)
    return [spec_of(n, t) for n, t in named], ((n, t.detach()) for n, t in named)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_each_file_reads_back_with_safetensors_own_reader(tmp_path, dtype):
    torch.manual_seed(0)
    tensors = {"x": (torch.randn(3, 5) * 10).to(dtype), "y": (torch.randn(7) * 10).to(dtype),
               "z": torch.ones(0, 4, dtype=dtype)}
    write_sharded(tmp_path, [spec_of(n, t) for n, t in tensors.items()], tensors.items(), 10**9)
    back = load_file(tmp_path / "model.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_the_streamed_folder_loads_as_the_model_saved_by_save_pretrained(arch, tmp_path):
    """OPT ties its LM head to the embedding: stored once, as save_pretrained stores it."""
    model = build_tiny_model(arch)
    model.save_pretrained(tmp_path / "hf", max_shard_size=40_000)
    write_hf_folder(model, tmp_path / "streamed", *stream(model), max_shard_bytes=40_000)
    index = json.loads((tmp_path / "streamed" / INDEX_FILE).read_text())
    files = sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert index["weight_map"].keys() == json.loads((tmp_path / "hf" / INDEX_FILE).read_text())["weight_map"].keys()
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    assert (tmp_path / "streamed" / "config.json").read_text() == (tmp_path / "hf" / "config.json").read_text()
    want, got = (AutoModelForCausalLM.from_pretrained(tmp_path / d).state_dict() for d in ("hf", "streamed"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_one_shard_is_a_plain_model_file_and_a_stream_out_of_step_is_refused(tmp_path):
    model = build_tiny_model("llama")
    assert write_sharded(tmp_path / "one", *stream(model), max_shard_bytes=10**9) == ["model.safetensors"]
    sizes, tensors = stream(model)
    with pytest.raises(ValueError, match="out of step"):
        write_sharded(tmp_path / "bad", sizes[1:], tensors, 10**9)
    sizes, tensors = stream(model)
    with pytest.raises(ValueError, match="more tensors"):
        write_sharded(tmp_path / "long", sizes[:-1], tensors, 10**9)
