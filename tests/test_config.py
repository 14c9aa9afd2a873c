import pytest

from svf_rl.config import ConfigError, TrainConfig, load_config


def test_launch_default_yaml_is_what_train_runs_without_arguments():
    from pathlib import Path

    assert load_config(str(Path(__file__).parent.parent / "launch" / "default.yaml")) == TrainConfig()


def test_unknown_config_key_names_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'lrr'; valid keys: .*\blr\b"):
        load_config(None, ["lrr=1e-3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="'steps' must be int"):
        load_config(None, ["steps=many"])


def test_unknown_choice_lists_the_choices():
    with pytest.raises(ConfigError, match="'baseline' must be one of"):
        load_config(None, ["baseline=ppo"])


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nsteps: 7\ntask_args:\n  digits: 2\n")
    config = load_config(str(path), ["steps=9", "task_args.terms=3"])
    assert config.lr == 1e-3 and config.steps == 9
    assert config.task_args == {"digits": 2, "terms": 3}


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent.yaml")


def test_yaml_configs_in_launch_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "launch").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(str(path))


def test_cli_reports_a_bad_key_in_one_line(capsys):
    from svf_rl.cli import main

    assert main(["train", "lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("svf-rl train: error: unknown config key 'lrr'") and "\n" not in err


def test_every_launch_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "launch").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        load_config(str(path), [])
