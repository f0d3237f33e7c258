"""The trainer under every launcher, with real processes (2 CPU ranks over gloo), against one process.

Every run starts from the same saved tiny LLaMA (``from_pretrained``: under ZeRO-3, ``from_config``
would initialise other random weights) and trains ZO-Adam (per-element state, so the per-rank
optimizer state slices are exercised) on 8-row batches of the SST-2 demo sample, 4 rows a rank.

What 'matches' means: each rank's loss is the mean over its half batch, and a half-batch forward
rounds differently from the full batch (~1e-7 relative), so losses agree to ~1e-6 relative and the
weights to a small fraction of how far they moved (see test_zero3.py for the exact checks of the
sharded arithmetic). Runs that share the partitioning (the deepspeed launcher, accelerate, CPU
offload: all ZeRO-3 over 2 ranks) agree bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from zo_scale.adapters.peft_tuning import PeftSettings, apply_peft
from zo_scale.models import load_model
from zo_scale.models.tiny import build_byte_tokenizer, build_tiny_model
from zo_scale.train.cli import main as cli_main
from zo_scale.train.config import load_config
from zo_scale.train.loop import train

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
STEPS = 6
IN_FORWARD = ["optim.perturb=in_forward"]
# a rule without per-element state: the lazy update lands on each gathered parameter inside the forward
LANDS_IN_FORWARD = [*IN_FORWARD, "optim.rule=sgd"]
TIMEOUT_S = 300
# A dead rank must end the job within this long (torchrun notices a dead worker and stops the rest).
BOUNDED_EXIT_S = 60


def overrides(model_dir: Path, out: Path, steps: int = STEPS, save_every: int = 0) -> list[str]:
    """The runs' common config: in place unless a test appends IN_FORWARD (auto would take the perturbed
    forward under ZeRO-3 and in place on one process, and these tests compare the two steps knowingly)."""
    return [f"model.name={model_dir}", "task.name=sst2-demo", "task.num_train=64", "task.num_eval=32",
            "task.max_length=64", "optim.rule=adam", "optim.lr=1e-3", "optim.eps=1e-3", "optim.perturb=in_place",
            f"run.steps={steps}", "run.batch_size=8", "run.eval_batch_size=8", "run.log_every=1",
            f"run.save_every={save_every}", "run.progress=false", f"run.output_dir={out}"]


def launch(cmd: list[str], log: Path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    return result


def launched(cmd: list[str], out: Path, timeout: float = TIMEOUT_S) -> Path:
    """Run a launcher command to completion; the run's output folder."""
    log = out.with_suffix(".log")
    result = launch(cmd, log, timeout)
    assert result.returncode == 0, f"{cmd[0]} failed ({result.returncode}):\n{log.read_text()[-4000:]}"
    return out


def free_port() -> int:
    """A TCP port free right now, for the launcher's rendezvous (fixed ports collide with other jobs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun() -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "launch/train.py"]


def train_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights, from however many safetensors shards it has."""
    return {k: v for f in sorted((out / "checkpoint" / "model").glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_close_run(run: Path, ref: Path, base: dict[str, torch.Tensor]) -> None:
    """Same trajectory up to half-batch rounding: losses to 1e-5 relative, weights to 1% of their move."""
    losses, ref_losses = train_losses(run), train_losses(ref)
    assert len(losses) == len(ref_losses) == STEPS
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    got, want = weights(run), weights(ref)
    assert got.keys() == want.keys()
    for name in want:
        moved = (want[name] - base[name]).abs().max()
        assert moved > 0, f"{name} did not move in the reference run"
        assert (got[name] - want[name]).abs().max() <= 0.01 * moved, name


def assert_same_run(run: Path, ref: Path) -> None:
    assert train_losses(run) == train_losses(ref)
    got, want = weights(run), weights(ref)
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    model, tokenizer = load_model("tiny-llama", seed=3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_weights(base_model: Path) -> dict[str, torch.Tensor]:
    return load_file(base_model / "model.safetensors")


@pytest.fixture(scope="module")
def reference(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1-process run (in this process)."""
    out = tmp_path_factory.mktemp("runs") / "single"
    summary = train(load_config(None, overrides(base_model, out)))
    assert summary["runtime"] == "single" and summary["world_size"] == 1
    return out


@pytest.fixture(scope="module")
def zero3_run(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks under ZeRO-3, started by DeepSpeed's own launcher (it needs --num_gpus on a CPU machine)."""
    out = tmp_path_factory.mktemp("runs") / "deepspeed-zero3"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
           "--deepspeed", "ds_configs/zero3.json", *overrides(base_model, out)]
    return launched(cmd, out)


def test_torchrun_replicated_matches_one_process(base_model, base_weights, reference, tmp_path):
    out = launched([*torchrun(), *overrides(base_model, tmp_path / "run"), "dist.check_seeds=true"],
                   tmp_path / "run")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["runtime"], summary["world_size"]) == ("replicated", 2)
    assert_close_run(out, reference, base_weights)
    # the only bytes ZO's data parallelism sends: the step's two losses, float64, once a step
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["comm_bytes_per_step"] for r in rows if r["kind"] == "train"} == {16.0}


def test_deepspeed_launcher_zero3_matches_one_process(zero3_run, reference, base_weights):
    summary = json.loads((zero3_run / "summary.json").read_text())
    assert (summary["runtime"], summary["world_size"]) == ("zero3", 2)
    assert_close_run(zero3_run, reference, base_weights)
    # the streamed weights are a plain HF folder: they load for inference without DeepSpeed
    model, _ = load_model(str(base_model_of(zero3_run)), weights=zero3_run / "checkpoint" / "model")
    assert torch.equal(model.state_dict()["lm_head.weight"], weights(zero3_run)["lm_head.weight"])


def base_model_of(run: Path) -> Path:
    return Path(json.loads((run / "checkpoint" / "trainer_state.json").read_text())["config"]["model"]["name"])


def test_accelerate_launch_with_deepspeed_config_equals_deepspeed_launcher(base_model, zero3_run, tmp_path):
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "accelerate_configs/deepspeed_zero3.yaml",
           "--main_process_port", str(free_port()), "launch/train.py", *overrides(base_model, tmp_path / "run")]
    out = launched(cmd, tmp_path / "run")
    assert json.loads((out / "summary.json").read_text())["runtime"] == "zero3"
    assert_same_run(out, zero3_run)


def test_cpu_offload_equals_zero3(base_model, zero3_run, tmp_path):
    cmd = [*torchrun(), "--deepspeed", "ds_configs/zero3_offload_cpu.json",
           *overrides(base_model, tmp_path / "run")]
    assert_same_run(launched(cmd, tmp_path / "run"), zero3_run)


def test_zero3_lora_replicates_the_adapter_and_matches_one_process(base_model, tmp_path):
    """The adapter is an ordinary tensor on each rank over the partitioned base (see trainable.py):
    both ranks apply the same update, and the run follows the 1-process one."""
    lora = ["peft.method=lora", "optim.lr=0.1", "optim.eps=1e-2"]
    ref = tmp_path / "single"
    train(load_config(None, [*overrides(base_model, ref), *lora]))
    out = launched([*torchrun(), "--deepspeed", "ds_configs/zero3.json", *overrides(base_model, tmp_path / "run"),
                    *lora], tmp_path / "run")
    assert json.loads((out / "summary.json").read_text())["runtime"] == "zero3"
    assert torch.allclose(torch.tensor(train_losses(out)), torch.tensor(train_losses(ref)), rtol=1e-5, atol=0)
    got, want = (load_file(r / "checkpoint" / "adapter" / "adapter_model.safetensors") for r in (out, ref))
    assert got.keys() == want.keys() and any(".lora_B." in k for k in want)
    start = apply_peft(load_model(str(base_model))[0], PeftSettings(method="lora"), seed=0)  # run.seed is 0
    initial = {k.replace(".default.", "."): v for k, v in start.state_dict().items() if ".lora_" in k}
    for name in want:
        moved = (want[name] - initial[name]).abs().max()
        assert moved > 0, f"{name} did not move in the reference run"
        assert (got[name] - want[name]).abs().max() <= 0.01 * moved, name
    assert not (out / "checkpoint" / "model").exists()  # only the adapter: the base never left its partitions


def test_zero3_hybrid_matches_one_process_and_resumes_on_as_many_ranks(base_model, base_weights, tmp_path, capsys):
    """Hybrid k=1 under ZeRO-3: DeepSpeed's optimizer owns the FO partitions (last block, final norm,
    untied head), ZO the rest. The run follows the 1-process hybrid run; a checkpoint (with DeepSpeed's
    per-rank FO state) resumes on 2 ranks onto the same weights, and refuses 1."""
    hybrid = ["hybrid.fo_layers=1", "hybrid.fo_lr=1e-3"]
    ref = tmp_path / "single"
    train(load_config(None, [*overrides(base_model, ref), *hybrid]))
    zero3 = [*torchrun(), "--deepspeed", "ds_configs/zero3.json"]
    out = launched([*zero3, *overrides(base_model, tmp_path / "run"), *hybrid], tmp_path / "run")
    assert_close_run(out, ref, base_weights)
    assert sorted(p.name for p in (out / "checkpoint").glob("fo_optimizer*")) == [
        "fo_optimizer.rank0.pt", "fo_optimizer.rank1.pt"]

    split = tmp_path / "split"
    launched([*zero3, *overrides(base_model, split, steps=STEPS // 2), *hybrid], split)
    launched([*torchrun(), "--deepspeed", "ds_configs/zero3.json", *overrides(base_model, split), *hybrid], split)
    assert_same_run(split, out)
    code = cli_main(["train", *overrides(base_model, split, steps=STEPS + 2), *hybrid])  # 1 rank: refused
    assert code == 2 and "FO optimizer state of a hybrid run under ZeRO-3" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["model.quantization=int8"], "model.quantization=int8 with ZeRO-3"),
    (["peft.method=lora", "hybrid.fo_layers=1"], "hybrid.fo_layers with peft under ZeRO-3"),
])
def test_zero3_refuses_what_it_cannot_run_with_a_clear_error(base_model, tmp_path, extra, message):
    out = tmp_path / "run"
    result = launch([*torchrun(), "--deepspeed", "ds_configs/zero3.json", *overrides(base_model, out), *extra],
                    tmp_path / "run.log")
    assert result.returncode != 0
    assert message in (tmp_path / "run.log").read_text()
    assert not out.exists()


def aio_unavailable_reason() -> str | None:
    """Why DeepSpeed's async I/O op (NVMe offload) cannot be built here, or None if it can."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        return None
    return "DeepSpeed's async_io op needs libaio (apt-get install libaio-dev); see docs/scale-out.md"


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA with 256 x 2048 MLP matrices: their 2-rank partitions are 1 MiB, the smallest
    DeepSpeed swaps to NVMe (smaller ones stay in CPU memory)."""
    folder = tmp_path_factory.mktemp("base") / "wide-llama"
    build_tiny_model("llama", seed=3, hidden_size=256, intermediate_size=2048).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return folder


def per_step(run: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["kind"] == "train"]


def model_bytes(folder: Path, min_partition_bytes: int = 0) -> int:
    """Bytes of the saved weights (fp32), counting only tensors whose 2-rank partition has at least
    ``min_partition_bytes``."""
    return sum(v.numel() * 4 for v in load_file(folder / "model.safetensors").values()
               if v.numel() * 4 // 2 >= min_partition_bytes)


@pytest.mark.needs_aio
def test_nvme_offload_equals_zero3_and_in_forward_swaps_a_third(aio_built, wide_model, tmp_path):
    """Partitions of 1 MiB and more live in files between forwards; each is swapped in for the ZO
    sweep and written back. In place a step moves 6x their bytes: 2 forwards read each once, and
    2 sweeps read and write each. perturb=in_forward with ZO-SGD moves 2x: the forward reads each
    once, and the last step's (lazy) update lands on it there and is written back: no update sweep
    (Adam's moments live with the partition: its in_forward update stays a sweep, 3x). LOZO holds its
    updates of those matrices in windows (pending_window): 1x, and 2x where V is redrawn (every nu = 2
    steps here: the window folds in the forward and is written back), (nu + 1) / nu a step. With
    optim.pending_steps = 3, ZO-SGD writes the partitions every third step: 1x, 1x, 1x, 2x, 1x, 1x (the forward
    lands the updates due on transient copies in between), bit for bit the run that writes every step. DeepSpeed's
    async_io op is JIT-built once a machine (about 3 minutes on 2 cores), in the background while
    the other tests run (tests/conftest.py)."""
    reason = aio_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    config = json.loads((ROOT / "ds_configs" / "zero3_offload_nvme.json").read_text())
    config["zero_optimization"]["offload_param"]["nvme_path"] = str(tmp_path / "nvme")
    (tmp_path / "nvme.json").write_text(json.dumps(config))
    runs = {}
    lozo = [*LANDS_IN_FORWARD, "optim.sampler=lowrank", "optim.nu=2"]
    every_third = [*LANDS_IN_FORWARD, "optim.pending_steps=3"]
    for name, ds_config, extra in [("zero3", "ds_configs/zero3.json", []), ("nvme", tmp_path / "nvme.json", []),
                                   ("nvme in_forward", tmp_path / "nvme.json", LANDS_IN_FORWARD),
                                   ("nvme lozo", tmp_path / "nvme.json", lozo),
                                   ("nvme pending", tmp_path / "nvme.json", every_third)]:
        out = tmp_path / name.replace(" ", "-")
        runs[name] = launched([*torchrun(), "--deepspeed", str(ds_config), *overrides(wide_model, out), *extra], out,
                              timeout=900)
    assert_same_run(runs["nvme"], runs["zero3"])
    swap_dirs = sorted(p.name for p in (tmp_path / "nvme").rglob("rank*"))  # DeepSpeed's swap folders
    assert swap_dirs == ["rank0", "rank1"]
    swapped = model_bytes(wide_model, min_partition_bytes=1 << 20) / 2  # this rank's share
    assert swapped > 0.8 * model_bytes(wide_model) / 2
    assert per_step(runs["zero3"], "swapped_bytes_per_step") == [0.0] * STEPS
    assert per_step(runs["nvme"], "swapped_bytes_per_step") == [6 * swapped] * STEPS
    assert per_step(runs["nvme in_forward"], "swapped_bytes_per_step") == [swapped] + [2 * swapped] * (STEPS - 1)
    assert per_step(runs["nvme lozo"], "swapped_bytes_per_step") == [(1 + (t > 0 and t % 2 == 0)) * swapped
                                                                     for t in range(STEPS)]
    assert per_step(runs["nvme pending"], "swapped_bytes_per_step") == [(1 + (t > 0 and t % 3 == 0)) * swapped
                                                                        for t in range(STEPS)]
    assert_same_run(runs["nvme pending"], runs["nvme in_forward"])
    share = model_bytes(wide_model) / 2  # every partition (the small ones kept in memory too): the stores write them
    assert per_step(runs["nvme in_forward"], "stored_bytes_per_step") == [0.0] + [share] * (STEPS - 1)
    assert per_step(runs["nvme pending"], "stored_bytes_per_step") == [(t > 0 and t % 3 == 0) * share
                                                                       for t in range(STEPS)]
    base = load_file(wide_model / "model.safetensors")
    for name, extra in [("nvme in_forward", LANDS_IN_FORWARD), ("nvme lozo", lozo)]:
        single = tmp_path / f"single {name}".replace(" ", "-")
        train(load_config(None, [*overrides(wide_model, single), *extra]))
        assert_close_run(runs[name], single, base)


def test_checkpoint_from_two_zero3_ranks_resumes_on_one(base_model, base_weights, reference, tmp_path):
    """The checkpoint is streamed: the weights in HF shards of at most run.save_shard_size (with their
    index), each rank's slices of Adam's moments in its own file; one process resumes from it."""
    out = tmp_path / "run"
    cmd = [*torchrun(), "--deepspeed", "ds_configs/zero3.json", *overrides(base_model, out, steps=STEPS // 2),
           "run.save_shard_size=100KB"]
    launched(cmd, out)
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"], state["runtime"]) == (STEPS // 2, 2, "zero3")
    folder = out / "checkpoint" / "model"
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").is_file()
    assert max(f.stat().st_size for f in shards) < 100_000 + max(v.numel() * 4 for v in base_weights.values())
    assert sorted(p.name for p in (out / "checkpoint").glob("optimizer_state.rank*")) == [
        "optimizer_state.rank0.safetensors", "optimizer_state.rank1.safetensors"]
    summary = train(load_config(None, overrides(base_model, out)))  # the same run, now 1 process, to the end
    assert (summary["runtime"], summary["steps"]) == ("single", STEPS)
    assert_close_run(out, reference, base_weights)


def test_zero3_bf16_master_weights_return_exactly_with_lr_0(base_model, tmp_path):
    """bf16 under ZeRO-3 ("auto" precision filled from model.dtype): with the fp32 master copy of each
    shard, 6 steps of +/- eps round trips at lr 0 leave every weight bit for bit where it started."""
    out = tmp_path / "run"
    cmd = [*torchrun(), "--deepspeed", "ds_configs/zero3.json", *overrides(base_model, out),
           "model.dtype=bfloat16", "optim.master_weights=true", "optim.lr=0", "optim.rule=sgd"]
    launched(cmd, out)
    start = {k: v.to(torch.bfloat16) for k, v in load_file(base_model / "model.safetensors").items()}
    final = weights(out)
    assert all(final[k].dtype == torch.bfloat16 and torch.equal(final[k], start[k]) for k in start)


@pytest.fixture(scope="module")
def zero3_in_forward(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Through DeepSpeed's launcher, as zero3_run (the CPU-offload run against it goes through torchrun)."""
    out = tmp_path_factory.mktemp("runs") / "zero3-in-forward"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
           "--deepspeed", "ds_configs/zero3.json", *overrides(base_model, out), *IN_FORWARD]
    return launched(cmd, out)


def test_in_forward_zero3_gathers_the_model_once_a_step_and_matches_in_place(base_model, base_weights, zero3_run,
                                                                               zero3_in_forward):
    """In place, each of a step's two forwards all-gathers every parameter; with the perturbation
    inside the forward there is one forward, so one gather, and only the losses' all-reduce besides."""
    assert_close_run(zero3_in_forward, zero3_run, base_weights)
    assert per_step(zero3_run, "gathered_bytes_per_step") == [2 * model_bytes(base_model)] * STEPS
    assert per_step(zero3_in_forward, "gathered_bytes_per_step") == [model_bytes(base_model)] * STEPS
    assert per_step(zero3_in_forward, "comm_bytes_per_step") == [16.0] * STEPS


def test_in_forward_update_landed_in_the_forward_under_zero3_and_cpu_offload(base_model, base_weights, tmp_path):
    """ZO-SGD: each rank lands the last step's update on the gathered parameter in its module's forward
    and stores its own slice into the partition (in CPU memory under offload). The runs follow the
    1-process one, and CPU offload equals ZeRO-3 bit for bit; still one gather a step."""
    single = tmp_path / "single"
    train(load_config(None, [*overrides(base_model, single), *LANDS_IN_FORWARD]))
    runs = {}
    for name in ("zero3", "zero3_offload_cpu"):
        out = tmp_path / name
        cmd = [*torchrun(), "--deepspeed", f"ds_configs/{name}.json", *overrides(base_model, out), *LANDS_IN_FORWARD]
        runs[name] = launched(cmd, out)
    assert_close_run(runs["zero3"], single, base_weights)
    assert_same_run(runs["zero3_offload_cpu"], runs["zero3"])
    assert per_step(runs["zero3"], "gathered_bytes_per_step") == [model_bytes(base_model)] * STEPS


def test_lozo_in_forward_under_zero3_follows_one_process(base_model, base_weights, tmp_path):
    """LOZO's points inside the matmul and the lookup (zo_scale.core.lowrank_forward) under ZeRO-3: each rank
    multiplies by the gathered weight once for all row groups, after landing the last update on it and storing
    its slice. The run follows the 1-process in-place LOZO run, the reference."""
    lozo = ["optim.rule=sgd", "optim.sampler=lowrank", "optim.nu=2"]
    single = tmp_path / "single"
    train(load_config(None, [*overrides(base_model, single), *lozo]))
    out = tmp_path / "run"
    launched([*torchrun(), "--deepspeed", "ds_configs/zero3.json", *overrides(base_model, out), *lozo, *IN_FORWARD],
             out)
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["perturb"] == "in_forward"  # no fallback
    assert_close_run(out, single, base_weights)


def test_in_forward_replicated_matches_in_forward_one_process(base_model, base_weights, reference, tmp_path):
    single = tmp_path / "single"
    train(load_config(None, [*overrides(base_model, single), *IN_FORWARD]))
    assert_close_run(single, reference, base_weights)  # one process: in_forward follows in place
    out = launched([*torchrun(), *overrides(base_model, tmp_path / "run"), *IN_FORWARD], tmp_path / "run")
    assert json.loads((out / "summary.json").read_text())["runtime"] == "replicated"
    assert_close_run(out, single, base_weights)


def test_in_forward_zero3_bf16_weights_return_exactly_with_lr_0_without_master_weights(base_model, tmp_path):
    out = tmp_path / "run"
    launched([*torchrun(), "--deepspeed", "ds_configs/zero3.json", *overrides(base_model, out), *IN_FORWARD,
              "model.dtype=bfloat16", "optim.lr=0", "optim.rule=sgd"], out)
    start = {k: v.to(torch.bfloat16) for k, v in load_file(base_model / "model.safetensors").items()}
    final = weights(out)
    assert all(final[k].dtype == torch.bfloat16 and torch.equal(final[k], start[k]) for k in start)


def worker_pids(marker: str) -> dict[int, int]:
    """rank -> pid of the launched processes whose command line contains ``marker``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
        except OSError:
            continue
        if marker in cmdline and "launch/train.py" in cmdline and "RANK" in env and "LOCAL_RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def test_killed_rank_ends_the_job_and_the_run_resumes(base_model, tmp_path):
    out = tmp_path / "run"
    cmd = [*torchrun(), "--deepspeed", "ds_configs/zero3.json",
           *overrides(base_model, out, steps=100_000, save_every=5)]
    log = open(tmp_path / "run.log", "w")
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (out / "checkpoint" / "trainer_state.json").exists():
            assert job.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        pids = worker_pids(str(out))
        assert sorted(pids) == [0, 1]
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        rc = job.wait(timeout=BOUNDED_EXIT_S)
        took = time.monotonic() - killed
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    assert rc != 0, "the job reported success although a rank died"
    assert took < BOUNDED_EXIT_S
    saved = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert saved >= 5 and saved % 5 == 0
    summary = train(load_config(None, overrides(base_model, out, steps=saved + 2)))
    assert summary["steps"] == saved + 2
    records = [json.loads(line) for line in (out / "seedlog.jsonl").read_text().splitlines()[1:]]
    assert [r["step"] for r in records] == list(range(saved + 2))  # no step lost or repeated


@pytest.mark.parametrize("job", ["one process", "2-rank ZeRO-3"])
def test_job_killed_at_a_random_moment_resumes_bit_for_bit(base_model, tmp_path, job):
    """kill -9 of every process of a job at a random moment after its first checkpoint (a step, an
    evaluation, a checkpoint or a rank's share of it being written or committed), then the same command:
    the run ends where an uninterrupted one does, losses and weights bit for bit. The moment is drawn anew
    each run (fuzzing); the assertion messages give it."""
    steps, every = 8, 2

    def command(out: Path) -> list[str]:
        launcher = ([sys.executable, "launch/train.py"] if job == "one process"
                    else [*torchrun(), "--deepspeed", "ds_configs/zero3.json"])
        return [*launcher, *overrides(base_model, out, steps=steps, save_every=every)]

    straight = launched(command(tmp_path / "straight"), tmp_path / "straight")
    out = tmp_path / "killed"
    cmd = command(out)
    delay = int.from_bytes(os.urandom(2), "little") / 65536 * 4.0  # seconds after the first checkpoint
    with open(tmp_path / "killed.log", "w") as log:
        job = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while not (out / "checkpoint" / "trainer_state.json").exists() and job.poll() is None:
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.05)
            time.sleep(delay)
            os.killpg(job.pid, signal.SIGKILL)  # the launcher and both ranks at once
        finally:
            job.wait(timeout=BOUNDED_EXIT_S)
    state = out / "checkpoint" / "trainer_state.json"
    saved = json.loads(state.read_text())["step"] if state.exists() else None
    where = f"killed {delay:.2f} s after the first checkpoint; last whole checkpoint at step {saved}"
    launched(cmd, out)  # the same command again
    assert json.loads((out / "summary.json").read_text())["steps"] == steps, where
    got, want = weights(out), weights(straight)
    assert all(torch.equal(got[n], want[n]) for n in want), where
    records = [json.loads(line) for line in (out / "seedlog.jsonl").read_text().splitlines()[1:]]
    straight_records = [json.loads(line) for line in (straight / "seedlog.jsonl").read_text().splitlines()[1:]]
    assert records == straight_records, where  # every step once, with the same projected gradients


@pytest.mark.parametrize(("ds_config", "message"), [
    ({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 4},
     "gradient_accumulation_steps=4 contradicts"),
    ({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 3},
     "train_micro_batch_size_per_gpu=3 contradicts the run: run.batch_size=8"),
    ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}, "fp16": {"enabled": True}},
     "bf16.enabled and fp16.enabled are both true"),
    ({"zero_optimization": {"stage": 2}}, None),  # stage 2 with dist.mode=zero3, below
])
def test_contradicting_deepspeed_config_is_a_clear_error(ds_config, message, base_model, tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config))
    args = ["train", "--deepspeed", str(path), *overrides(base_model, tmp_path / "run")]
    if message is None:
        args.append("dist.mode=zero3")
        message = "dist.mode=zero3 needs a DeepSpeed config with zero_optimization.stage 3"
    assert cli_main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_malformed_deepspeed_config_names_the_file(base_model, tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text("{'stage': 3")
    assert cli_main(["train", "--deepspeed", str(path), *overrides(base_model, tmp_path / "run")]) == 2
    assert f"{path} is not valid JSON" in capsys.readouterr().err


def on_two_nodes(per_node: Callable[[int], list[str]], out: Path, timeout: float = TIMEOUT_S) -> Path:
    """Start one launcher per 'node' (``per_node(node_rank)``: its command), both on this machine, meeting
    over loopback as two machines would over the network; wait for both."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = [open(out.with_name(f"{out.name}.node{r}.log"), "w") for r in (0, 1)]  # noqa: SIM115
    procs = [subprocess.Popen(per_node(r), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
             for r, log in zip((0, 1), logs, strict=True)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
        for log in logs:
            log.close()
    for r, code in enumerate(codes):
        assert code == 0, f"node {r} failed ({code}):\n{out.with_name(f'{out.name}.node{r}.log').read_text()[-4000:]}"
    return out


def test_torchrun_on_two_nodes_replicated_matches_one_process(base_model, base_weights, reference, tmp_path):
    """torchrun --nnodes 2 with a c10d rendezvous: the two launchers find each other at the endpoint."""
    out, endpoint = tmp_path / "run", f"127.0.0.1:{free_port()}"
    on_two_nodes(lambda r: [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                            "--rdzv_endpoint", endpoint, "--rdzv_id", "zo-two-nodes", "launch/train.py",
                            *overrides(base_model, out)], out)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["runtime"], summary["world_size"]) == ("replicated", 2)
    assert_close_run(out, reference, base_weights)


def test_deepspeed_on_two_nodes_without_ssh_equals_one_node_zero3(base_model, zero3_run, tmp_path):
    """deepspeed --no_ssh: each node's launcher starts its own ranks (node_rank from the command line,
    the hostfile names the nodes); ZeRO-3 over the 2 nodes' ranks partitions as 2 ranks on one node."""
    out, port = tmp_path / "run", free_port()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    on_two_nodes(lambda r: [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r),
                            "--master_addr", "127.0.0.1", "--master_port", str(port), "launch/train.py",
                            "--deepspeed", "ds_configs/zero3.json", *overrides(base_model, out)], out)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["runtime"], summary["world_size"]) == ("zero3", 2)
    assert_same_run(out, zero3_run)
