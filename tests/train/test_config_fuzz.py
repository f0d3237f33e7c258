"""Fuzzed configs: every generated set of overrides is either accepted (and builds an optimizer) or
refused with a ConfigError that names the key, never another exception (the CLI turns ConfigError
into exit 2 before any run directory exists)."""

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zo_scale.models import build_tiny_model
from zo_scale.train.build import build_optimizer
from zo_scale.train.config import Config, ConfigError, load_config
from zo_scale.train.loop import _check

KNOWN = [f"{section.name}.{key.name}" for section in dataclasses.fields(Config)
         for key in dataclasses.fields(getattr(Config(), section.name))]
KEYS = st.one_of(st.sampled_from(KNOWN), st.sampled_from(["model.nmae", "optim.learning_rate", "trainer.steps",
                                                          "run", "run.", ".steps"]))
SCALARS = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.sampled_from(["null", "[", "{a: 1", "[0.9, 0.99]", "[1, 2, 3]", "auto", "''", "- x", "5GB",
                                     "1e-5", "-3", "adam", "cosine", "in_forward", "\t", "'unterminated"]),
                    st.text(max_size=12))
MODEL = build_tiny_model("llama")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KEYS, SCALARS), max_size=4))
def test_any_overrides_are_accepted_or_refused_naming_the_key(pairs):
    overrides = [f"{key}={value}" for key, value in pairs]
    try:
        cfg = load_config(None, overrides)
        _check(cfg)
        build_optimizer(MODEL.named_parameters(), cfg.optim, cfg.run.seed, cfg.run.steps)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message.strip() or message.startswith("optim:"), message
        named = [key for key, _ in pairs] + [key.partition(".")[0] for key, _ in pairs]
        assert any(name and name in message for name in named) or "override" in message, (overrides, message)


@pytest.mark.parametrize("text", ["[", "{a: 1", "'unterminated", "- x: [1"])
def test_an_override_that_is_not_yaml_is_a_config_error(text):
    with pytest.raises(ConfigError, match="run.steps"):
        load_config(None, [f"run.steps={text}"])
