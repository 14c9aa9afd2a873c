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


@pytest.mark.parametrize("overrides, key", [
    (["temperature=0"], "temperature"),  # 0 is greedy decoding: evaluation's, not training's
    (["temperature=-1"], "temperature"),
    (["top_p=0"], "top_p"),
    (["top_p=1.5"], "top_p"),
    (["eval_every=0"], "eval_every"),
    (["max_bad_steps=0"], "max_bad_steps"),
    (["warmup_steps=-1"], "warmup_steps"),
    (["steps=10", "warmup_steps=11"], "warmup_steps"),
    (["threads=-1"], "threads"),
    (["seed=-1"], "seed"),
    (["engine_ratio_cap=-1"], "engine_ratio_cap"),
    (["vllm_gpu_memory_utilization=0"], "vllm_gpu_memory_utilization"),
    (["vllm_gpu_memory_utilization=1.5"], "vllm_gpu_memory_utilization"),
    (["vllm_server_timeout=0"], "vllm_server_timeout"),
    (["engine=vllm_server", "vllm_server_urls=[]"], "vllm_server_urls"),
    (["lr=0"], "lr"),
    (["lr=-1e-3"], "lr"),
    (["lr=nan"], "lr"),
    (["lr=inf"], "lr"),
    (["weight_decay=-0.1"], "weight_decay"),
    (["max_grad_norm=0"], "max_grad_norm"),
    (["max_grad_norm=.inf"], "max_grad_norm"),
    (["kl_coef=-0.1"], "kl_coef"),
    (["kl_coef=.nan"], "kl_coef"),
    (["reward_weights=[1, .nan]"], "reward_weights"),
    (["reward_weights=[1, heavy]"], "reward_weights"),
    (["reward_weights=[true]"], "reward_weights"),
    (["baseline=grpo", "generations_per_prompt=1"], "generations_per_prompt"),  # the advantage is always 0
    (["baseline=rloo", "generations_per_prompt=1"], "generations_per_prompt"),
    (["rewards=[1]"], "rewards"),
    (["rewards=[[a, b]]"], "rewards"),
])
def test_value_that_cannot_run_names_its_key_in_one_line(overrides, key):
    with pytest.raises(ConfigError, match=f"^config key '{key}' must ") as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_settings_left_unset_follow_the_ones_given():
    assert load_config(None, ["steps=2"]).warmup_steps == 2  # the default's warmup, never longer than the run


def test_edge_values_that_can_run_are_accepted():
    config = load_config(None, ["temperature=0.01", "top_p=1", "kl_coef=0", "steps=10", "warmup_steps=10",
                                "engine_ratio_cap=0", "threads=0", "seed=0", "weight_decay=0",
                                "reward_weights=[1, 0.5, 0]", "baseline=mean", "generations_per_prompt=1"])
    assert config.warmup_steps == config.steps == 10


@pytest.mark.parametrize("override", ["temperature=0", "eval_every=0", "top_p=2"])
def test_cli_rejects_a_bad_value_before_loading_the_model(override, capsys, monkeypatch):
    import svf_rl.base_model
    import svf_rl.loop.train
    from svf_rl.cli import main

    def must_not_run(*args, **kwargs):
        raise AssertionError("training started with a configuration that cannot run")

    monkeypatch.setattr(svf_rl.loop.train, "train", must_not_run)
    monkeypatch.setattr(svf_rl.loop.train, "load_base_model", must_not_run)
    monkeypatch.setattr(svf_rl.base_model, "load_base_model", must_not_run)
    assert main(["train", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"svf-rl train: error: config key '{override.split('=')[0]}' must ") and "\n" not in err
