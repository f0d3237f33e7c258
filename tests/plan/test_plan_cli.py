"""``zo-scale plan``: the command a user runs, its JSON for scripts, its exit code on bad input."""

import json
import subprocess
import sys

from zo_scale.train.cli import main

ZO_SCALE = [sys.executable, "-m", "zo_scale.train.cli"]


def test_plan_json_has_the_fields_scripts_read(capsys):
    assert main(["plan", "--model", "llama-2-70b", "--mode", "zero3", "--offload", "cpu", "--gpus", "8",
                 "--gpu-memory", "80", "--batch", "16", "--seq", "512", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert all(isinstance(plan[k], int) for k in ("per_gpu_bytes", "host_bytes", "nvme_bytes"))
    assert plan["fits"] is True and plan["nvme_bytes"] == 0
    assert plan["breakdown"]["host/weights"] == 68_976_648_192 * 2
    assert {"gpu/gathered parameters", "gpu/activations", "gpu/logits", "host/checkpoint save"} <= set(
        plan["breakdown"])
    assert plan["ds_config"]["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_plan_table_suggests_layouts_that_fit(capsys, tmp_path):
    out = tmp_path / "ds.json"
    assert main(["plan", "--model", "opt-66b", "--gpu-memory", "24", "--mode", "zero3", "--offload", "nvme",
                 "--write-ds-config", str(out)]) == 0
    text = capsys.readouterr().out
    assert "opt-66b: 65.72B parameters" in text and "fits the given hardware" in text
    assert json.loads(out.read_text())["zero_optimization"]["offload_param"]["device"] == "nvme"
    assert main(["plan", "--model", "opt-66b", "--gpu-memory", "24"]) == 0
    text = capsys.readouterr().out
    assert "does not fit: each GPU needs" in text and "fits: --mode zero3 --offload nvme --gpus 1" in text


def test_bad_plan_input_exits_2_naming_the_problem(tmp_path, capsys):
    """The command's exit code, once through a process of its own; the other cases in this process."""
    proc = subprocess.run([*ZO_SCALE, "plan", "--model", str(tmp_path / "missing.json")], capture_output=True,
                          text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert proc.returncode == 2 and "no model architecture" in proc.stderr, proc.stderr
    for args, message in [
        (["--model", "llama-2-7b", "--mode", "zero3", "--quantization", "nf4"], "quantization with zero3"),
        (["--model", "llama-2-7b", "--fo-layers", "99"], "k must be in [0, 32]"),
        (["--model", "llama-2-7b", "--write-ds-config", str(tmp_path / "x.json")], "needs --mode zero3"),
    ]:
        assert main(["plan", *args]) == 2, args
        assert message in capsys.readouterr().err, args
