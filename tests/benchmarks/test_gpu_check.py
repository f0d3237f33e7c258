"""benchmarks/gpu_check.py's orchestration: each stage in its own process, its result in the JSON as soon as
it ends (ok, failed with its error's last line, timed_out at its limit, skipped past the budget), copied
to $OUT. The stages' own checks need a GPU to mean much; here two cheap ones run with --quick."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def gpu_check(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "check.json"
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path)}
    (tmp_path / "out").mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--output", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, json.loads(out.read_text())


def test_cheap_stages_land_in_the_json_and_in_out_with_their_numbers(tmp_path):
    proc, result = gpu_check(tmp_path, "--only", "planner,environment")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(result["stages"]) == ["environment", "planner"]  # the stages' order, not the flag's
    env, plan = result["stages"]["environment"], result["stages"]["planner"]
    assert env["status"] == "ok" and plan["status"] == "ok", result
    assert env["device"].startswith(("cpu", "cuda")) and env["wall_s"] > 0
    assert env["numbers"]["versions"]["torch"] and env["numbers"]["imports"]["torch"] == "ok"
    assert env["numbers"]["memory_total_bytes"] > 0 and env["numbers"]["problems"] == []
    (row,) = [v for k, v in plan["numbers"].items() if k.startswith("opt-1.3b")]
    assert row["predicted_bytes_without_context"] > 0 and row["params"] > 0
    assert result["finished"] is True
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == result
    assert sorted(p.name for p in (tmp_path / "out" / "gpu_check_logs").glob("*.log")) == ["environment.log",
                                                                                           "planner.log"]


def test_a_stage_killed_at_its_limit_is_timed_out_and_the_others_keep_their_results(tmp_path):
    proc, result = gpu_check(tmp_path, "--only", "_fail,_hang,_ok", "--stage-limit", "_hang=3")
    assert proc.returncode == 1  # a stage failed or timed out
    stages = result["stages"]
    assert list(stages) == ["_ok", "_hang", "_fail"]
    assert stages["_ok"]["status"] == "ok" and stages["_ok"]["numbers"]["python"]
    hang = stages["_hang"]
    assert hang["status"] == "timed_out" and hang["limit_s"] == 3 and 3 <= hang["wall_s"] < 20
    assert hang["numbers"] == {"started": True}  # recorded before the hang, kept through the kill
    fail = stages["_fail"]  # a stage after the killed one still runs
    assert fail["status"] == "failed" and fail["error"] == "RuntimeError: deliberate failure of the test stage"
    assert "Traceback" in fail["log_tail"] and fail["numbers"] == {"started": True}


def test_stages_past_the_budget_are_skipped(tmp_path):
    # _hang's own limit is 5 s: it runs out the 8 s budget, so _fail is not started
    proc, result = gpu_check(tmp_path, "--only", "_ok,_hang,_fail", "--budget", "8")
    stages = result["stages"]
    assert [s["status"] for s in stages.values()] == ["ok", "timed_out", "skipped"], stages
    assert "budget of 8 s" in stages["_fail"]["reason"]
    assert proc.returncode == 1


def test_the_json_holds_each_finished_stage_when_the_whole_check_is_killed(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--quick", "--only", "_ok,_hang", "--stage-limit",
                             "_hang=120", "--output", str(out)], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and "_ok" in json.loads(out.read_text())["stages"]):
            assert time.monotonic() < deadline and proc.poll() is None, "the first stage's result never appeared"
            time.sleep(0.2)
    finally:
        try:
            stage_processes = psutil.Process(proc.pid).children(recursive=True)  # each in a process group of its own
        except psutil.NoSuchProcess:
            stage_processes = []
        os.killpg(proc.pid, signal.SIGKILL)
        for child in stage_processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        proc.wait()
    result = json.loads(out.read_text())
    assert result["stages"]["_ok"]["status"] == "ok" and result["finished"] is False
    assert "_hang" not in result["stages"]


def test_an_unknown_stage_is_refused_naming_the_stages(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--only", "nope"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown stage(s) nope" in proc.stderr and "bit_equality" in proc.stderr and "_hang" not in proc.stderr
