import pytest

import zo_scale
from zo_scale.models.tiny import build_tiny_model
from zo_scale.train.build import build_optimizer
from zo_scale.train.config import ConfigError, load_config
from zo_scale.train.select_runtime import read_deepspeed_config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-5\n  betas: [0.8, 0.9]\nrun:\n  steps: 7\n")
    cfg = load_config(path, ["run.steps=9", "task.data_dir=null"])
    assert cfg.optim.lr == 1e-5 and cfg.optim.betas == (0.8, 0.9) and cfg.run.steps == 9 and cfg.task.data_dir is None


@pytest.mark.parametrize(
    "text,override,message",
    [
        ("optim:\n  lrr: 1\n", None, "unknown key optim.lrr"),
        ("optimizer:\n  lr: 1\n", None, "unknown config section 'optimizer'"),
        ("run:\n  steps: 1.5\n", None, "run.steps: expected <class 'int'>, got 1.5"),
        ("run: [1, 2]\n", None, "section 'run' must be a mapping"),
        ("run:\n  steps: [\n", None, "not valid YAML"),
        ("", "optim.lr=fast", "optim.lr: expected <class 'float'>, got 'fast'"),
        ("", "run.steps", "not of the form section.key=value"),
        ("", "optim.betas=[0.9]", "optim.betas: expected 2 values"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, override, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(path, [override] if override else [])


def build(*overrides):
    cfg = load_config(None, list(overrides))
    return build_optimizer(build_tiny_model("llama").named_parameters(), cfg.optim, 0, 10)[0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.sampler=lowrank", "optim.resample_every=50"], "V's period (LOZO's nu) is optim.nu"),
        (["optim.sampler=lowrank", "optim.nu=0"], "optim.nu"),
        (["optim.rule=lozo-m"], "optim.rule=lozo-m keeps its momentum in LOZO's low-rank factor"),
        (["optim.estimator=fzoo"], "queries must be >= 2 for the 'fzoo' estimator"),
        (["optim.sampler=lezo", "optim.layer_fraction=1.5"], "optim.layer_fraction"),
        (["optim.rule=lion"], "optim.rule: unknown 'lion'"),
    ],
)
def test_method_settings_that_do_not_fit_are_refused_by_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(*overrides)


def test_the_methods_build_from_their_keys():
    lozo_m = build("optim.rule=lozo-m", "optim.sampler=lowrank", "optim.nu=7", "optim.rank=3", "optim.momentum=0.7")
    assert isinstance(lozo_m.rule, zo_scale.LozoMomentum) and lozo_m.rule.beta == 0.7
    assert (lozo_m.sampler.resample_every, lozo_m.sampler.rank) == (7, 3)  # nu has its own key
    assert build("optim.sampler=lowrank").sampler.resample_every == 50  # LOZO's default: lazy from the CLI too
    fzoo = build("optim.estimator=fzoo", "optim.queries=8", "optim.sampler=rademacher")
    assert isinstance(fzoo.estimator, zo_scale.NormalizedForward) and fzoo.queries == 8
    lezo = build("optim.sampler=lezo", "optim.layer_fraction=0.5")
    assert isinstance(lezo.sampler, zo_scale.LayerSubsetSampler) and len(lezo.sampler.chosen(0, 0)) == 1  # of 2
    assert isinstance(build("optim.rule=sign-momentum").rule, zo_scale.SignMomentum)
    ardd = build("optim.rule=ardd", "optim.ardd_dimension=1000")
    assert isinstance(ardd.rule, zo_scale.AcceleratedDirectional) and ardd.rule.n == 1000
    assert build("optim.rule=ardd").rule.n > 1000  # 0: the trained elements


def test_a_section_or_key_written_twice_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("optim:\n  lr: 1.0e-5\nrun:\n  steps: 3\noptim:\n  eps: 1.0e-3\n")  # PyYAML keeps the last
    with pytest.raises(ConfigError, match=r"run.yaml, line 5: key 'optim' is given twice \(first on line 1\)"):
        load_config(config)
    config.write_text("optim:\n  lr: 1.0e-5\n  lr: 1.0e-6\n")
    with pytest.raises(ConfigError, match="key 'lr' is given twice"):
        load_config(config)


def test_a_deepspeed_json_with_a_key_written_twice_is_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3, "stage": 2}}')  # json keeps the last
    with pytest.raises(ConfigError, match=r"dist.deepspeed_config: .*ds.json: key\(s\) \['stage'\] given twice"):
        read_deepspeed_config(ds)


def test_a_byte_order_mark_is_not_part_of_the_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("run:\n  steps: 3\n", encoding="utf-8-sig")
    assert load_config(config).run.steps == 3
