"""The memory planner against the trainer: predicted vs measured peak memory of real runs on this CPU.

Each case runs ``zo-scale train`` (one process) or ``torchrun ... launch/train.py --deepspeed`` (ZeRO-3)
on a model built from a shipped architecture cut to a few blocks (``model.name=random:<config>``), two
steps and the final checkpoint save, and reads every rank's peak resident set from its
``summary.json`` (``peak_memory_bytes``, the ranks' ``ru_maxrss``). The planner predicts the same
quantity for ``--device cpu`` (ranks compute on the CPU, so what would sit on a GPU sits in the rank's
RAM): :attr:`zo_scale.plan.memory.MemoryPlan.rank_bytes`. The cases span the modes: single process,
ZeRO-3 over 2 ranks, CPU and NVMe offload, fp32 and bf16, in place and in_forward, Adam's state,
LoRA, hybrid ZO-FO, long sequences.

First the coefficients: forwards (no autograd, ``logits_to_keep=1``) of OPT and LLaMA shapes in fp32
and bf16 over six batches of different padded lengths (as a run's batches are), each shape in a
fresh process, their peak RSS above the loaded model (VmHWM after a reset)
fitted by least squares to tokens x (a_h H e + a_i I e + a_s heads T 4) + a fixed buffer: the
planner's ``ACTIVATION_*``, ``CPU_ATTENTION_SCORES`` and ``CPU_FORWARD_FIXED``. The ``runtime`` cases
(a model of a few MB) measure the process itself (``PROCESS_HOST_BYTES``). The
other cases are predicted with the constants as they are in the code, so the table shows how far
the planner is off. Writes ``benchmarks/results/plan_calibration.{json,png}``. About 20 minutes on
2 cores::

    .venv/bin/python benchmarks/plan_calibration.py
    .venv/bin/python benchmarks/plan_calibration.py --only "zero3"     # the cases whose name contains it
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import common
import numpy as np

from zo_scale.models.architectures import architecture_config
from zo_scale.plan import memory
from zo_scale.plan.memory import RunSettings, plan_memory
from zo_scale.plan.shapes import ModelShape

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
# a model of a few MB whose sweep shards are large enough for the compiled kernel (as in every real run)
RUNTIME_MODEL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
                 "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "vocab_size": 512, "tie_word_embeddings": False}


@dataclass
class Case:
    """``settings.batch`` is the trainer's ``run.batch_size`` (examples); the prediction counts the
    sequences they score and their answer tokens, read from the task (:func:`sequences_of`)."""

    name: str
    arch: str | dict  # a shipped architecture (cut to ``layers`` blocks) or a config dict
    layers: int
    settings: RunSettings
    task: str = "sst2"
    overrides: list[str] = field(default_factory=list)
    nvme: bool = False

    def config_file(self, folder: Path) -> Path:
        config = (architecture_config(self.arch) if isinstance(self.arch, str)
                  else architecture_config(str(_write(folder / "base.json", self.arch))))
        config.num_hidden_layers = self.layers
        path = folder / "config.json"
        config.to_json_file(path)
        return path


def _write(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj))
    return path


S = RunSettings
CASES = [
    # batch: examples per step (run.batch_size); SST-2 and RTE score 2 sequences an example here
    Case("runtime: single", RUNTIME_MODEL, 1, S(device="cpu", dtype="float32", batch=4, seq=64)),
    Case("runtime: replicated x2", RUNTIME_MODEL, 1, S(mode="replicated", gpus=2, device="cpu", dtype="float32",
                                                          batch=4, seq=64)),
    Case("runtime: zero3 x2", RUNTIME_MODEL, 1, S(mode="zero3", gpus=2, device="cpu", dtype="float32", batch=4,
                                                     seq=64)),
    Case("single fp32, in place", "opt-1.3b", 4, S(device="cpu", dtype="float32", batch=8, seq=64)),
    Case("single bf16, in_forward", "opt-1.3b", 4, S(device="cpu", dtype="bfloat16", batch=8, seq=64,
                                                     perturb="in_forward")),
    Case("single fp32, adam", "llama-2-7b", 2, S(device="cpu", dtype="float32", batch=4, seq=64, rule="adam")),
    Case("single fp32, LoRA", "llama-2-7b", 2, S(device="cpu", dtype="float32", batch=8, seq=64, tuning="lora")),
    Case("single fp32, hybrid k=1", "llama-2-7b", 2, S(device="cpu", dtype="float32", batch=4, seq=64,
                                                       fo_layers=1)),
    Case("single fp32, seq 256", "opt-1.3b", 4, S(device="cpu", dtype="float32", batch=16, seq=256), task="rte"),
    Case("single bf16, seq 256, in_forward", "llama-2-7b", 2,
         S(device="cpu", dtype="bfloat16", batch=8, seq=256, perturb="in_forward"), task="rte"),
    Case("zero3 x2 fp32", "opt-1.3b", 4, S(mode="zero3", gpus=2, device="cpu", dtype="float32", batch=8, seq=64)),
    Case("zero3 x2 offload cpu, in_forward", "opt-1.3b", 4,
         S(mode="zero3", offload="cpu", gpus=2, device="cpu", dtype="float32", batch=8, seq=64, perturb="in_forward")),
    Case("zero3 x1 NVMe bf16, in_forward", "llama-2-7b", 2,
         S(mode="zero3", offload="nvme", gpus=1, device="cpu", dtype="bfloat16", batch=4, seq=64,
           perturb="in_forward"), nvme=True),
]


def sequences_of(task: str, max_length: int) -> tuple[int, int]:
    """(sequences scored per example, answer tokens) of ``task`` under the byte tokenizer: one sequence
    per example when the options are single tokens after one shared prompt, else one per option."""
    from zo_scale.models import build_byte_tokenizer
    from zo_scale.models.scoring import encode
    from zo_scale.tasks import get_task, sample_splits

    train, _, _ = sample_splits(get_task(task), num_train=32, num_dev=0, num_eval=8, seed=0)
    encoded = encode(build_byte_tokenizer(), train, max_length)
    if all(ex.shared_single_token for ex in encoded):
        return 1, 1
    return max(len(ex.options) for ex in encoded), max(len(c) for ex in encoded for _, c in ex.options)


def trainer_args(case: Case, config: Path, out: Path) -> list[str]:
    s = case.settings
    rows = s.batch // s.gpus
    args = [f"model.name=random:{config}", f"model.dtype={s.dtype}", f"task.name={case.task}", "task.num_train=32",
            "task.num_eval=8", f"task.max_length={s.seq}", f"run.batch_size={s.batch}", f"run.eval_batch_size={rows}",
            "run.steps=2", "run.log_every=1", "run.progress=false", f"run.output_dir={out}", f"optim.rule={s.rule}",
            f"optim.perturb={s.perturb}", "optim.lr=1e-6", f"hybrid.fo_layers={s.fo_layers}",
            f"peft.method={'none' if s.tuning == 'full' else s.tuning}", f"peft.lora_r={s.lora_r}"]
    return args + case.overrides


def ds_config(case: Case, folder: Path) -> Path:
    """The planner's DeepSpeed config for the case (NVMe swap files under ``folder``), as a file."""
    shape = ModelShape.of(architecture_config(str(folder / "config.json")))
    return _write(folder / "ds_config.json", memory.ds_config(case.settings, shape, nvme_path=str(folder / "nvme")))


COEFFICIENTS = ("PROCESS_HOST_BYTES", "ACTIVATION_HIDDEN", "ACTIVATION_INTERMEDIATE", "CPU_ATTENTION_SCORES",
                "CPU_FORWARD_FIXED", "GLOO_GATHER_COPIES", "ZERO3_BUILD_COPIES")


def run_case(case: Case, port: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="zo-plan-", dir=ROOT.parent) as tmp:
        folder = Path(tmp)
        config = case.config_file(folder)
        out = folder / "run"
        args = trainer_args(case, config, out)
        if case.settings.mode != "single":
            deepspeed = ["--deepspeed", str(ds_config(case, folder))] if case.settings.mode == "zero3" else []
            cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(case.settings.gpus), "--master_port", str(port),
                   str(ROOT / "launch" / "train.py"), *deepspeed, *args]
        else:
            cmd = [str(BIN / "zo-scale"), "train", *args]
        env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
        if case.settings.gpus > 1:
            env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{case.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        summary = json.loads((out / "summary.json").read_text())
        shape = ModelShape.of(architecture_config(str(config)), case.settings.fo_layers)
    measured = max(p["host_rss"] for p in summary["peak_memory_bytes"])
    per_example, answer = sequences_of(case.task, case.settings.seq)
    plan = plan_memory(shape, dataclasses.replace(case.settings, batch=case.settings.batch * per_example,
                                                  answer_tokens=answer))
    return {"case": case.name, "parameters": shape.parameters, "measured_peak_rss_bytes": measured,
            "per_rank_measured": [p["host_rss"] for p in summary["peak_memory_bytes"]],
            "predicted_bytes": plan.rank_bytes, "predicted_over_measured": plan.rank_bytes / measured,
            "breakdown": plan.as_json()["breakdown"], "settings": plan.as_json()["settings"], "command": cmd}


PROBES = [("opt-1.3b", 4, "float32", 16, 256), ("opt-1.3b", 4, "float32", 8, 128), ("opt-1.3b", 4, "bfloat16", 16, 256),
          ("llama-2-7b", 2, "float32", 16, 256), ("llama-2-7b", 2, "float32", 4, 512),
          ("llama-2-7b", 2, "bfloat16", 16, 256)]
# padded length / seq and left padding of a probe's forwards: batches differ in length, as a run's do
# (the allocator's and oneDNN's caches then hold more than one forward's worth)
LENGTHS = [(1.0, 0.125), (0.9, 0.4), (1.0, 0.01), (0.78, 0.2), (1.0, 0.5), (0.94, 0.04)]


def probe(arch: str, layers: int, dtype: str, rows: int, seq: int) -> None:
    """The peak RSS above the loaded model of forwards over batches of ``rows`` x up to ``seq`` tokens
    (this process; prints one JSON line)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = architecture_config(arch)
    config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()

    def forward(length: float, padding: float) -> None:
        ids = torch.randint(3, 250, (rows, int(seq * length)))
        mask = torch.ones_like(ids)
        mask[:, : int(ids.shape[1] * padding)] = 0  # left padding, as the trainer's batches have
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)

    with torch.no_grad():
        forward(0.5, 0.1)  # warm: oneDNN's first-call setup
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = common.rss_mib()
        common.reset_peak_rss()
        for length, padding in LENGTHS:
            forward(length, padding)
    print(json.dumps({"arch": arch, "layers": layers, "dtype": dtype, "rows": rows, "seq": seq,
                      "hidden": config.hidden_size, "heads": config.num_attention_heads,
                      "intermediate": getattr(config, "intermediate_size", None) or config.ffn_dim,
                      "forward_bytes": int((common.hwm_mib() - before) * 2**20)}))


def fit_activations() -> dict:
    """Least squares of the probes' forward bytes on the planner's activation terms."""
    runs = [common.run_child(Path(__file__), ["--probe", *map(str, p)]) for p in PROBES]
    features, target = [], []
    for r in runs:
        e, tokens = (4 if r["dtype"] == "float32" else 2), r["rows"] * r["seq"]
        features.append([tokens * r["hidden"] * e, tokens * r["intermediate"] * e,
                         tokens * r["heads"] * r["seq"] * 4, 1.0])
        target.append(r["forward_bytes"])
    a_h, a_i, a_s, fixed = np.linalg.lstsq(np.array(features), np.array(target, dtype=float), rcond=None)[0]
    fitted = np.array(features) @ np.array([a_h, a_i, a_s, fixed])
    for r, f in zip(runs, fitted, strict=True):
        r["fitted_over_measured"] = float(f / r["forward_bytes"])
    in_code = [memory.ACTIVATION_HIDDEN, memory.ACTIVATION_INTERMEDIATE, memory.CPU_ATTENTION_SCORES,
               memory.CPU_FORWARD_FIXED]
    return {"probes": runs, "fitted": {"a_h": a_h, "a_i": a_i, "a_s": a_s, "fixed_bytes": fixed},
            "in_planner": dict(zip(("a_h", "a_i", "a_s", "fixed_bytes"), in_code, strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--probe", nargs=5, help=argparse.SUPPRESS)  # worker: arch layers dtype rows seq
    args = parser.parse_args()
    if args.probe:
        arch, layers, dtype, rows, seq = args.probe
        probe(arch, int(layers), dtype, int(rows), int(seq))
        return
    activations = fit_activations() if not args.only else None
    if activations:  # the trainer cases below are predicted with the coefficients measured here
        fit = activations["fitted"]
        print("activation fit:", {k: round(float(v), 3) for k, v in fit.items()}, flush=True)
        memory.ACTIVATION_HIDDEN, memory.ACTIVATION_INTERMEDIATE = round(fit["a_h"], 2), round(fit["a_i"], 2)
        memory.CPU_ATTENTION_SCORES, memory.CPU_FORWARD_FIXED = round(fit["a_s"], 2), round(fit["fixed_bytes"] / 2**20)
        memory.CPU_FORWARD_FIXED *= 2**20
    rows = []
    for i, case in enumerate(c for c in CASES if args.only in c.name):
        rows.append(run_case(case, 29830 + i))
        r = rows[-1]
        if r["case"].startswith("runtime"):  # a rank's runtime: its peak minus the plan of everything else
            measured = r["measured_peak_rss_bytes"] - r["predicted_bytes"] + memory.PROCESS_HOST_BYTES[
                r["settings"]["mode"]]
            memory.PROCESS_HOST_BYTES[r["settings"]["mode"]] = round(measured / 2**20) * 2**20
            r["runtime_bytes"] = measured
        print(f"{r['case']:<36} measured {r['measured_peak_rss_bytes'] / 2**30:6.2f} GiB  predicted "
              f"{r['predicted_bytes'] / 2**30:6.2f} GiB  ratio {r['predicted_over_measured']:.3f}", flush=True)
    runtime = {r["case"]: r["runtime_bytes"] for r in rows if "runtime_bytes" in r}
    checked = [r for r in rows if not r["case"].startswith("runtime")]
    within = [r for r in checked if abs(r["predicted_over_measured"] - 1) <= 0.15]
    results = {"activations": activations, "cases": rows, "runtime_bytes_measured": runtime,
               "coefficients_used": {name: getattr(memory, name) for name in COEFFICIENTS},
               "within_15_percent": f"{len(within)} of {len(checked)}",
               "worst_ratio": max((r["predicted_over_measured"] for r in checked), key=lambda x: abs(x - 1),
                                  default=None)}
    notes = ["measured: the largest ru_maxrss over the job's ranks (summary.json peak_memory_bytes); predicted: "
             "MemoryPlan.rank_bytes for device=cpu (the rank's GPU terms plus its share of the host terms, resident "
             "plus the largest phase).",
             "the cases are predicted with the activation coefficients fitted and the runtime bytes measured in this "
             "run (coefficients_used); zo_scale/plan/memory.py holds the same values. GLOO_GATHER_COPIES was fitted "
             "to the two 2-rank ZeRO-3 cases (a previous run), so those two do not test it.",
             "two ZO steps, 8 eval examples, the final checkpoint save; the planner's batch = sequences per step: "
             "SST-2's and RTE's label words are several bytes, so each example is 2 sequences (one per option) "
             "with up to 9 (SST-2) or 3 (RTE) answer tokens; seq = task.max_length (most examples reach it)."]
    print("wrote", common.write_json("plan_calibration", {"only": args.only}, results, notes))
    print(json.dumps({k: v for k, v in results.items() if k != "cases"}, indent=2))
    fig, ax = common.new_figure(8, 4.5)
    gib = 2**30
    labels = [r["case"] for r in rows]
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["measured_peak_rss_bytes"] / gib for r in rows], 0.4, label="measured")
    ax.barh([i - 0.2 for i in y], [r["predicted_bytes"] / gib for r in rows], 0.4, label="planner")
    for i, r in enumerate(rows):
        ax.text(max(r["measured_peak_rss_bytes"], r["predicted_bytes"]) / gib, i,
                f"  x{r['predicted_over_measured']:.2f}", va="center")
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel("peak resident memory of a rank (GiB)")
    ax.set_title("zo-scale plan vs the trainer's measured peak (CPU ranks)")
    ax.legend(loc="lower right")
    common.save_figure(fig, "plan_calibration")


if __name__ == "__main__":
    main()
