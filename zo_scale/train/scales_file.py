"""The perturbation-scales file: what ``zo-scale learn-scales`` writes and ``optim.scales=<file>`` loads.

A JSON object, safe to load (no pickled code), written atomically::

    {"format": "zo-scale perturbation scales", "version": 1, "model": "<model.name it was learned on>",
     "scales": {"<parameter name>": c s_p, ...}, "learned_with": {<the settings>}, "meta_loss": [[step, m], ...]}

The scales are normalized (sum_p d_p (c s_p)^2 = sum_p d_p over the tensors learned).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

FORMAT, VERSION = "zo-scale perturbation scales", 1


class ScalesFileError(ValueError):
    """A scales file that cannot be used: missing, not JSON, not this format, or with a bad value."""


def write_scales(path: Path, scales: dict[str, float], model: str, learned_with: dict[str, Any],
                 meta_loss: list[tuple[int, float]]) -> None:
    """Write the file at ``path`` atomically (a temporary file, then a rename): never half-written."""
    record = {"format": FORMAT, "version": VERSION, "model": model, "scales": scales, "learned_with": learned_with,
              "meta_loss": meta_loss}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def read_scales(path: str | Path) -> tuple[dict[str, float], dict[str, Any]]:
    """(scales by parameter name, the rest of the record); ScalesFileError naming the file and the problem."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ScalesFileError(f"optim.scales: no file {path} (write one with zo-scale learn-scales)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScalesFileError(f"optim.scales: {path} is not JSON ({err})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ScalesFileError(f"optim.scales: {path} is not a {FORMAT} file")
    if record.get("version") != VERSION:
        raise ScalesFileError(f"optim.scales: {path} has version {record.get('version')!r}; this zo-scale reads "
                              f"version {VERSION}")
    scales = record.get("scales")
    if not isinstance(scales, dict) or not scales:
        raise ScalesFileError(f"optim.scales: {path} has no scales")
    bad = [k for k, v in scales.items()
           if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0)]
    if bad:
        raise ScalesFileError(f"optim.scales: {path}: scales must be positive finite numbers; {bad[0]!r} is "
                              f"{scales[bad[0]]!r}")
    return {k: float(v) for k, v in scales.items()}, {k: v for k, v in record.items() if k != "scales"}
