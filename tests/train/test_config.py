import pytest

from zo_scale.train.config import ConfigError, load_config


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
