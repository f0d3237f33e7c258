"""``model.device`` per rank: under a launcher every rank's process group and DeepSpeed use cuda:$LOCAL_RANK,
so the model goes there too; an explicit index is honoured where it means that GPU, read as each rank's own
where it is the single-GPU default (cuda:0), and refused by key where it would put every rank on one GPU."""

import pytest
import torch

from zo_scale.train.config import ConfigError
from zo_scale.train.select_runtime import rank_device, resolve_device


@pytest.fixture
def rank_1_of_2(monkeypatch):
    """The second of two ranks on this machine (torchrun's env), CUDA mocked present."""
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize("written", ["auto", "cuda", "cuda:0", "cuda:1"])
def test_every_spelling_of_this_ranks_gpu_is_its_local_rank(rank_1_of_2, written):
    assert rank_device(written) == "cuda:1"


def test_the_cpu_stays_the_cpu_under_a_launcher(rank_1_of_2):
    assert rank_device("cpu") == "cpu"


def test_another_index_under_a_launcher_is_refused_naming_the_fix(rank_1_of_2):
    with pytest.raises(ConfigError, match=r"model.device=cuda:3 under a launcher of 2 ranks: .* cuda:1 "
                                          r"\(LOCAL_RANK\).* use model.device=cuda"):
        rank_device("cuda:3")


def test_without_a_launcher_an_index_is_the_gpu_written(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_device("cuda:3") == "cuda:3"
    assert rank_device("cuda") == "cuda:0"


@pytest.mark.parametrize(("local_world", "warned"), [("2", True), ("1", False)])
def test_cuda_0_read_as_each_ranks_gpu_is_said_once_by_rank_0(monkeypatch, caplog, local_world, warned):
    """Rank 0 says it (the others are quiet); with one rank per machine cuda:0 is every rank's GPU anyway."""
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": local_world}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda:0") == "cuda:0"
    assert ("model.device=cuda:0 under a launcher of 2 ranks: each rank trains on its own GPU" in caplog.text) == warned
    caplog.clear()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda:0") == "cuda:1"
    assert caplog.text == ""
