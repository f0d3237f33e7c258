"""The quality table's reading of its runs (benchmarks/quality_table.py): the best lr per method, a longer
run as its own row, and the plot drawn from the JSON."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import common  # noqa: E402
import quality_table  # noqa: E402

ZO_SGD = "ZO-SGD (MeZO: Gaussian, central)"
LOZO = "LOZO (r=2, nu=50)"  # a name with ", " in it: not to be read as a budget suffix


def run(task: str, method: str, lr: float, accuracy: float, budget: int = 300) -> dict:
    return {"task": task, "method": method, "lr": lr, "budget": budget, "steps": budget // 2, "forwards": budget,
            "eval_examples": 100, "zero_shot_accuracy": 0.5, "final_accuracy": accuracy, "wall_s": 1.0}


RUNS = [run("sst2", ZO_SGD, 3e-5, 0.68), run("sst2", ZO_SGD, 1e-5, 0.62), run("sst2", ZO_SGD, 1e-4, 0.63),
        run("sst2", LOZO, 3e-5, 0.64), run("sst2", ZO_SGD, 3e-5, 0.75, budget=2000),
        run("copa", ZO_SGD, 1e-4, 0.65), run("copa", LOZO, 1e-5, 0.61)]


def test_best_keeps_each_methods_best_lr_and_a_longer_run_as_its_own_row():
    top = quality_table.best(RUNS)
    assert set(top) == {("sst2", ZO_SGD), ("sst2", LOZO), ("sst2", f"{ZO_SGD}, 2000 forwards"),
                        ("copa", ZO_SGD), ("copa", LOZO)}
    assert top[("sst2", ZO_SGD)]["lr"] == 3e-5  # 0.68 over 0.62 and 0.63
    assert top[("sst2", f"{ZO_SGD}, 2000 forwards")]["final_accuracy"] == 0.75  # not the 300-forward row's


def test_binomial_se_in_points():
    assert abs(quality_table.binomial_se(run("copa", ZO_SGD, 1e-4, 0.5)) - 5.0) < 1e-12  # sqrt(.25 / 100)


def test_plot_writes_a_png_per_table(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    quality_table.plot("quality_table_test", RUNS)
    png = tmp_path / "quality_table_test.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_follow_the_methods_order_with_a_longer_run_after_its_method():
    top = quality_table.best([*RUNS, run("sst2", "FO AdamW (the ceiling)", 1e-5, 0.87)])
    assert quality_table.in_methods_order(top) == [ZO_SGD, f"{ZO_SGD}, 2000 forwards", LOZO,
                                                   "FO AdamW (the ceiling)"]
