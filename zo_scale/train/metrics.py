"""Metrics: one JSON object per line in ``metrics.jsonl``, optionally TensorBoard and experiment trackers, and a
PNG at the end."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from zo_scale.train.trackers import Trackers


class MetricsLog:
    """Appends ``{"step": t, "kind": "train"|"eval", ...}`` records; mirrors scalars to TensorBoard if asked."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, keep_steps_upto: int = 0,
                 trackers: Trackers | None = None) -> None:
        """Starts ``path`` afresh, keeping (on resume) the records of steps <= ``keep_steps_upto``;
        ``trackers`` (:mod:`zo_scale.train.trackers`) get every record too."""
        self.trackers = trackers
        self.path = path
        resuming = keep_steps_upto > 0 and path.exists()
        kept = [r for r in read_metrics(path) if r["step"] <= keep_steps_upto] if resuming else []
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("run.tensorboard=true needs tensorboard: pip install tensorboard") from None
            self.writer = SummaryWriter(str(tensorboard_dir))

    def log(self, step: int, kind: str, **values: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)
        if self.trackers is not None:
            self.trackers.log(step, kind, values)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.trackers is not None:
            self.trackers.finish()


def peak_memory() -> dict[str, int | None]:
    """This process's peak memory so far, in bytes: ``host_rss`` (the resident set's high-water mark,
    everything the process ever held in RAM at once: libraries, model, buffers) and ``device``
    (``torch.cuda.max_memory_allocated``, what PyTorch's allocator handed out on this process's GPU;
    None without CUDA). The host figure counts pinned and shared pages it touched, not the page cache."""
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    device = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"host_rss": host, "device": device}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: Path, png_path: Path, title: str, metric: str = "accuracy") -> Path:
    """Training loss (per logged window) and the eval `metric` (accuracy, f1, reward) against the step, in one
    figure; for a reward task the population's mean reward, with the band from its worst to its best member,
    instead of the loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, ax_loss = plt.subplots(figsize=(8, 4.5))
    rewards = [r for r in train if "reward_mean" in r]
    if rewards:
        steps = [r["step"] for r in rewards]
        ax_loss.fill_between(steps, [r["reward_min"] for r in rewards], [r["reward_max"] for r in rewards],
                             color="tab:blue", alpha=0.2, label="population: worst to best member")
        ax_loss.plot(steps, [r["reward_mean"] for r in rewards], color="tab:blue", label="population mean")
        ax_loss.set_ylabel("train reward (the population's members)", color="tab:blue")
        ax_loss.legend(loc="upper left", fontsize=8)
    else:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
        ax_loss.set_ylabel("train loss (nats, mean over the logging window)", color="tab:blue")
    ax_loss.set_xlabel("step")
    if evals:
        ax_acc = ax_loss.twinx()
        ax_acc.plot([r["step"] for r in evals], [100 * r[metric] for r in evals], "o-", color="tab:orange",
                    label=f"eval {metric}")
        ax_acc.set_ylabel(f"eval {metric} (%)", color="tab:orange")
    ax_loss.set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
