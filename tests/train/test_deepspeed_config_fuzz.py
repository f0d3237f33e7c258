"""Fuzzing the DeepSpeed configs a run is given: the shipped ones with keys deleted, retyped or set to odd
values, through every check the trainer runs before a ZeRO-3 engine exists (mode, batch sizes and
precision against the run, then the ZeRO-3 backend's own checks). Each is accepted, or refused with a
ConfigError naming a key; never a TypeError, AttributeError or KeyError from inside the checks."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zo_scale.backends import zero3
from zo_scale.train.config import ConfigError, load_config
from zo_scale.train.select_runtime import check_deepspeed_config

SHIPPED = sorted((Path(__file__).parents[2] / "zo_scale" / "configs" / "deepspeed").glob("*.json"))
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 1 << 40), st.floats(allow_nan=True),
                   st.sampled_from(["auto", "cpu", "nvme", "none", "", "3", "true"]),
                   st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.sampled_from(["enabled", "stage"]),
                                                                            st.integers(0, 3), max_size=2))
SECTIONS = ["zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "aio"]


def all_paths(config: dict, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for key, value in config.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += all_paths(value, (*prefix, key))
    return paths


@st.composite
def mutated(draw):
    config = json.loads(draw(st.sampled_from(SHIPPED)).read_text())
    for _ in range(draw(st.integers(1, 4))):
        paths = all_paths(config) + [(s,) for s in SECTIONS] + [("zero_optimization", "offload_param", "device")]
        path = draw(st.sampled_from(paths))
        parent = config
        for key in path[:-1]:
            if not isinstance(parent.get(key), dict):
                parent[key] = {}
            parent = parent[key]
        if draw(st.booleans()) and path[-1] in parent:
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(VALUES)
    return config


RUN = load_config(None, ["run.batch_size=8", "model.dtype=bfloat16"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.sampled_from([1, 2]))
def test_any_deepspeed_config_is_accepted_or_refused_naming_a_key(ds, world):
    keys = {p[-1] for p in all_paths(ds)} | {"DeepSpeed", "dist.mode", "zero_optimization", "stage"}
    try:
        mode, checked = check_deepspeed_config(ds, RUN, world)
        if mode == "zero3":
            zero3.load_config(checked.config)
    except ConfigError as err:
        assert any(k in str(err) for k in keys), (ds, str(err))
    except ValueError as err:  # zero3.load_config's own (the runtime turns these into ConfigError)
        assert any(k in str(err) for k in keys), (ds, str(err))


@pytest.mark.parametrize("ds,message", [
    ({"zero_optimization": [3]}, "zero_optimization must be a JSON object"),
    ({"zero_optimization": {"stage": 3}, "bf16": True}, "bf16 must be a JSON object"),
    ({"zero_optimization": {"stage": "3"}}, "zero_optimization.stage must be an integer"),
])
def test_misshapen_sections_are_refused_by_name(ds, message):
    with pytest.raises(ConfigError, match=message):
        check_deepspeed_config(ds, RUN, 1)
