"""Experiment trackers (Weights & Biases, MLflow, Comet, Aim, ...) through accelerate's tracker API.

``run.trackers: [wandb, mlflow]`` mirrors every record of ``metrics.jsonl`` to each tracker, as
``<kind>/<name>`` scalars at the run's step, after storing the run's config as its hyperparameters (the
sections flattened to ``section.key``). A name is any of accelerate's (``accelerate.tracking``'s
``LOGGER_TYPE_TO_CLASS``: built-in or added with ``register_tracker_class``); each tracker's own
settings come from its environment (``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``, ...). A tracker whose
package is missing is refused before anything runs, with the pip command. Rank 0 logs, as for the JSONL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zo_scale.train.config import ConfigError


def check_trackers(names: list[str]) -> None:
    """ConfigError for an unknown tracker or a repeat, ImportError naming the pip command for a missing one."""
    if not names:
        return
    from accelerate import tracking
    from accelerate.utils import imports

    known = tracking.LOGGER_TYPE_TO_CLASS
    for name in names:
        if name not in known:
            raise ConfigError(f"run.trackers: unknown {name!r}; accelerate's trackers are {', '.join(sorted(known))}")
        available = getattr(imports, f"is_{name}_available", None)  # accelerate's check; none for a registered one
        if available is not None and not available():
            raise ImportError(f"run.trackers=[{name}] needs the {name} package: pip install {name}")
    if len(set(names)) != len(names):
        raise ConfigError(f"run.trackers: {names} names a tracker twice")


class Trackers:
    """The run's trackers, started with its config; ``log`` mirrors one metrics record to each."""

    def __init__(self, names: list[str], run_name: str, logging_dir: Path, config: dict[str, Any]) -> None:
        from accelerate import tracking

        self.trackers = []
        for name in names:
            cls = tracking.LOGGER_TYPE_TO_CLASS[name]
            kwargs = {"logging_dir": str(logging_dir)} if cls.requires_logging_directory else {}
            tracker = cls(run_name, **kwargs)
            tracker.start()
            tracker.store_init_configuration({f"{s}.{k}": _plain(v) for s, keys in config.items()
                                              for k, v in keys.items()})
            self.trackers.append(tracker)

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        scalars = {f"{kind}/{k}": v for k, v in values.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def _plain(value: Any) -> bool | str | float | int | None:
    """A hyperparameter value trackers take (bool, str, float, int or None): lists and tuples as text."""
    return value if value is None or isinstance(value, bool | str | float | int) else str(value)
