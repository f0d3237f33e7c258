"""The DeepSpeed and accelerate configs users already have (tests/corpus, each file's source in its README),
run as they are through the launcher they belong to, on tiny-llama.

Each case ends in a finished run, or in a refusal naming the key of a real contradiction (or of what this
CPU machine cannot do: DeepSpeed's CPU accelerator has no fp16) as one ``zo-scale: error`` line and a
non-zero exit. A finished run's ``deepspeed_config.json`` (what DeepSpeed was given) holds no "auto" and
none of the sections set aside, the one warning names them, and ``config.yaml`` records the precision
the launcher asked for.

The launches run two at a time (module fixture, one per core), each rank one thread; what a config
refuses before any process group comes up is checked in this process, without a launcher.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from zo_scale.train.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).parent))
from test_launchers import BIN, ROOT, free_port, launch  # noqa: E402

CORPUS = ROOT / "tests" / "corpus"
DEEPSPEED, ACCELERATE = CORPUS / "deepspeed", CORPUS / "accelerate"
RUN = ["model.name=tiny-llama", "task.name=sst2-demo", "task.num_train=16", "task.num_eval=4", "task.max_length=32",
       "run.steps=2", "run.eval_batch_size=4", "run.progress=false"]
SET_ASIDE_WARNING = "DeepSpeed config: set aside"


@dataclass(frozen=True)
class Case:
    """One corpus file through its launcher: ``ranks`` processes, ``batch`` = run.batch_size; ``refused``: a
    text the one error line must hold, else the run must finish as ``runtime`` in ``dtype``."""

    name: str
    launcher: str  # deepspeed | accelerate
    file: str
    ranks: int = 1
    batch: int = 4
    runtime: str = "zero3"
    dtype: str = "float32"
    set_aside: tuple[str, ...] = ()
    refused: str | None = None
    extra: tuple[str, ...] = field(default=())


CASES = [
    Case("hf-docs-zero3-offload", "deepspeed", "hf_docs_zero3_offload.json", ranks=2,
         set_aside=("optimizer", "scheduler", "gradient_clipping", "fp16.loss_scale")),
    Case("hf-tests-zero2", "deepspeed", "hf_tests_zero2.json", runtime="replicated",
         set_aside=("optimizer", "scheduler", "gradient_clipping")),
    Case("hf-tests-zero3-bfloat16-alias", "deepspeed", "hf_tests_zero3_bf16.json",
         set_aside=("optimizer", "scheduler", "gradient_clipping")),
    Case("dse-sglang-offload-batch-1", "deepspeed", "dse_sglang_offload_cpu.json", batch=1),
    Case("dse-bf16-zero3-autocast", "deepspeed", "dse_bf16_full_zero3.json", dtype="bfloat16",
         set_aside=("optimizer", "torch_autocast")),
    Case("dse-zenflow-zero2", "deepspeed", "dse_zenflow_zero2.json", batch=8, runtime="replicated", dtype="bfloat16",
         set_aside=("optimizer", "gradient_clipping")),
    Case("dse-autotuning", "deepspeed", "dse_autotuning_tune.json", runtime="replicated"),
    Case("deepspeed-docs-autotuning-paths", "deepspeed", "deepspeed_docs_autotuning.json", runtime="replicated"),
    Case("trl-zero1-bf16", "accelerate", "trl_deepspeed_zero1.yaml", ranks=2, runtime="replicated", dtype="bfloat16"),
    Case("trl-zero2", "accelerate", "trl_deepspeed_zero2.yaml", runtime="replicated"),
    Case("trl-zero3-fp16", "accelerate", "trl_deepspeed_zero3.yaml", ranks=2, refused="has no fp16"),
    Case("accelerate-docs-zero3-offload-file", "accelerate", "accelerate_docs_zero3_offload.yaml",
         refused="has no fp16"),
    Case("trl-multi-gpu", "accelerate", "trl_multi_gpu.yaml", ranks=2, runtime="replicated"),
    Case("trl-single-gpu-bf16", "accelerate", "trl_single_gpu.yaml", runtime="single", dtype="bfloat16"),
    Case("accelerate-template-multi-gpu-bf16", "accelerate", "accelerate_template_multi_gpu.yaml", ranks=2,
         runtime="replicated", dtype="bfloat16"),
    # accelerate starts one process for MULTI_CPU unless mpirun is set up: a single-process run
    Case("accelerate-config-multi-cpu", "accelerate", "accelerate_config_multi_cpu.yaml", runtime="single"),
    Case("shipped-zero3-bf16", "accelerate", str(ROOT / "accelerate_configs" / "deepspeed_zero3.yaml"), ranks=2,
         dtype="bfloat16", extra=("--mixed_precision", "bf16")),
    *(Case(f"accelerate-config-default-{mp}", "accelerate", f"default:{mp}", runtime="single",
           dtype={"no": "float32", "fp16": "float16", "bf16": "bfloat16"}[mp]) for mp in ("no", "fp16", "bf16")),
]
# refused before any process group: run in this process (no launcher), as `zo-scale train --deepspeed FILE`
IN_PROCESS = [
    # DeepSpeed 0.19 refuses the bucket size 0 this older test file sets (the HF Trainer would fail on it too)
    ("hf_tests_zero3.json", [], "zero_optimization.reduce_bucket_size=0: DeepSpeed refuses it (Input should be"),
    ("hf_tests_zero3.json", ["model.dtype=float32"], "fp16.enabled=True contradicts model.dtype=float32"),
    ("dse_autotuning_fp16_z3.json", [], "has no fp16"),
    ("dse_imagenet_fp16.json", [],
     "train_batch_size=256 contradicts the run: run.batch_size=4 over 1 rank(s) means train_batch_size=4"),
    ("accelerate_docs_zero3_offload.json", ["model.dtype=bfloat16"],
     "fp16.enabled=True contradicts model.dtype=bfloat16"),
]


def command(case: Case, folder: Path) -> list[str]:
    if case.launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(case.ranks), "--master_port", str(free_port()),
                "launch/train.py", "--deepspeed", str(DEEPSPEED / case.file)]
    if case.file.startswith("default:"):  # what `accelerate config default` writes on this machine
        config = folder / "default_config.yaml"
        subprocess.run([str(BIN / "accelerate"), "config", "default", "--config_file", str(config),
                        "--mixed_precision", case.file.split(":")[1]], check=True, capture_output=True)
    else:
        config = ACCELERATE / case.file
        text = config.read_text()
        if "/path/to/" in text:  # the docs' placeholder path of the DeepSpeed config file they show beside it
            config = folder / config.name
            config.write_text(text.replace("/path/to/zero3_offload_config_accelerate.json",
                                           str(DEEPSPEED / "accelerate_docs_zero3_offload.json")))
    return [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--num_processes", str(case.ranks),
            "--main_process_port", str(free_port()), *case.extra, "launch/train.py"]


def run_case(case: Case, root: Path) -> tuple[int, str, Path]:
    folder = root / case.name
    folder.mkdir()
    out = folder / "run"
    cmd = [*command(case, folder), *RUN, f"run.batch_size={case.batch}", f"run.output_dir={out}"]
    result = launch(cmd, folder / "log.txt")
    return result.returncode, (folder / "log.txt").read_text(), out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    root = tmp_path_factory.mktemp("ecosystem")
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([c.name for c in CASES], pool.map(lambda c: run_case(c, root), CASES), strict=True))


def auto_values(tree: object) -> list[object]:
    if isinstance(tree, dict):
        return [v for value in tree.values() for v in auto_values(value)]
    return [tree] if tree == "auto" else []


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_config_runs_through_its_launcher_or_is_refused_by_key(outcomes, case):
    code, log, out = outcomes[case.name]
    errors = [line for line in log.splitlines() if line.startswith("zo-scale: error")]
    if case.refused is not None:
        assert code != 0, log[-3000:]
        assert len(errors) == 1 and case.refused in errors[0], log[-3000:]  # one line, from rank 0
        return
    assert code == 0, log[-4000:]
    assert not errors and "Traceback" not in log, log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["runtime"], summary["world_size"]) == (case.runtime, case.ranks)
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["dtype"] == case.dtype
    warnings = [line for line in log.splitlines() if SET_ASIDE_WARNING in line]
    if case.set_aside:
        assert len(warnings) == 1 and all(key in warnings[0] for key in case.set_aside), warnings
    else:
        assert not warnings, warnings
    ran_with = out / "deepspeed_config.json"
    if case.launcher == "deepspeed" or "deepspeed" in case.file:
        given = json.loads(ran_with.read_text())
        assert auto_values(given) == [] and not {"optimizer", "scheduler"} & given.keys()
        assert given.get("gradient_clipping", 0) == 0  # DeepSpeed's default (1.0) would clip a hybrid's backprop
    else:
        assert not ran_with.exists()


def test_a_launcher_failure_names_the_problem_in_its_summary(outcomes):
    """accelerate (torchrun underneath) prints its own failure summary: its root cause is zo-scale's line,
    read from the worker's error file, not 'To enable traceback see ...'."""
    _, log, _ = outcomes["trl-zero3-fp16"]
    assert "traceback : zo-scale: error" in log, log[-3000:]


@pytest.mark.parametrize(("file", "overrides", "message"), IN_PROCESS)
def test_configs_that_contradict_the_run_are_refused_by_key(tmp_path, capsys, file, overrides, message):
    code = cli_main(["train", "--deepspeed", str(DEEPSPEED / file), *RUN, "run.batch_size=4",
                     f"run.output_dir={tmp_path / 'run'}", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "run").exists()  # nothing written


def test_every_corpus_file_names_its_source():
    sources = (CORPUS / "README.md").read_text()
    for path in sorted(DEEPSPEED.iterdir()) + sorted(ACCELERATE.iterdir()):
        assert f"`{path.name}`" in sources, f"{path.name} is not listed with its source in tests/corpus/README.md"
