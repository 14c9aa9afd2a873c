"""End-to-end training on a tiny random Llama (fast) and on the real SmolLM2 (slow)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from svf_rl.config import load_config
from svf_rl.inference.expert import load_expert
from svf_rl.loop.train import train

TASK_FILE = '''
from reward_fns.text import completion_text
from svf_rl.task import Task


def says_yes(prompts, completions, **_):
    texts = [completion_text(c) for c in completions]
    return [1.0 if "yes" in t.lower() else 1.0 / (1 + len(t)) for t in texts]  # short is better


class YesTask(Task):
    name = "yes"
    reward_funcs = [says_yes]

    def rows(self, split, size, seed):
        return [{"question": f"Is {i} a number?", "split": split} for i in range(size)]

    def user_message(self, row):
        return row["question"]
'''


def tiny_config(model_dir: str, tmp_path: Path, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    task_file = tmp_path / "yes_task.py"
    task_file.write_text(TASK_FILE)
    values = dict(model=model_dir, task=f"{task_file}:YesTask", steps=3, prompts_per_step=2,
                  generations_per_prompt=2, max_new_tokens=4, eval_every=3, eval_size=4, test_size=4,
                  train_size=8, save_every=1, output_dir=str(tmp_path / "run"), log_with=[], progress=False,
                  lr=0.05, kl_coef=0.1, kl_estimator="full")
    values.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def test_training_moves_z_and_writes_a_loadable_expert(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path)
    expert = load_expert(train(config))
    deviation = max((z - 1).abs().max().item() for z in expert.vectors.values())
    assert deviation > 1e-3
    assert expert.task == "yes" and "test_accuracy" in expert.scores
    assert {"base_test_accuracy", "base_test_accuracy_64_tokens"} <= set(expert.scores)
    run = Path(config.output_dir)
    assert (run / "curve.png").stat().st_size > 0
    metrics = [line for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum('"reward"' in line for line in metrics) == 3
    # The HF engine reports its sampled tokens' log-probs: the trainer's, at the z it sampled with.
    assert all(r["sampler_logp_gap"] < 1e-4 for r in read_metrics(run / "metrics.jsonl") if "reward" in r)


def run_training_process(config_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "svf_rl", "train", "--config", str(config_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_run_trains_z_in_fp32(dtype, tiny_model_dir, tmp_path, capsys):
    config = tiny_config(tiny_model_dir, tmp_path, dtype=dtype, steps=2, eval_every=2, weight_cache="policy",
                         gradient_checkpointing=True, logit_chunk_tokens=3)
    expert = load_expert(train(config))
    assert all(z.dtype == torch.float32 for z in expert.vectors.values())
    assert max((z - 1).abs().max().item() for z in expert.vectors.values()) > 1e-3
    assert "predicted peak memory:" in capsys.readouterr().out
    steps = [r for r in read_metrics(Path(config.output_dir) / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["sampler_logp_gap"] < 0.5 for r in steps)


def test_killed_run_resumes_from_its_last_checkpoint_and_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    import yaml

    from svf_rl.config import config_dict
    from tests.same_z import EQUALITY, assert_same_z

    compared = dict(EQUALITY, lr=10.0, steps=6, eval_every=100)  # SGD: see tests/same_z.py
    reference = tiny_config(tiny_model_dir, tmp_path / "a", **compared)
    train(reference)

    def z_at_step(config, step: int) -> dict:
        checkpoint = Path(config.output_dir) / "checkpoints" / f"step_{step:06d}"
        return torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)["z"]

    config = tiny_config(tiny_model_dir, tmp_path / "b", **compared)
    config_path = tmp_path / "b.yaml"
    config_path.write_text(yaml.safe_dump(config_dict(config)))
    process = run_training_process(config_path)
    checkpoints = Path(config.output_dir) / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("step_000003")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # no chance to clean up
    process.wait()
    assert (checkpoints / "step_000003").exists(), process.stderr.read().decode()[-2000:]

    resumed = subprocess.run([sys.executable, "-m", "svf_rl", "train", "--config", str(config_path)],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    steps = [r for r in read_metrics(Path(reference.output_dir) / "metrics.jsonl") if "reward" in r]
    assert_same_z(z_at_step(config, 6), z_at_step(reference, 6), steps, reference)


def test_export_turns_a_checkpoint_into_the_same_expert(tiny_model_dir, tmp_path):
    from svf_rl.inference.export import export_checkpoint

    config = tiny_config(tiny_model_dir, tmp_path, steps=2, eval_every=2)
    trained = load_expert(train(config))
    exported = load_expert(export_checkpoint(config.output_dir, tmp_path / "exported.safetensors"))
    assert exported.base_fingerprint == trained.base_fingerprint and exported.scores == {"step": 2}
    assert exported.vectors.keys() == trained.vectors.keys()


def test_embedded_smollm2_trains_a_few_steps_and_the_expert_fits_the_model(smollm2_path, tmp_path):
    from svf_rl.base_model import EMBEDDED_MODEL, load_base_model
    from svf_rl.inference.expert import ExpertError
    from svf_rl.policies.svf_layer import apply_expert, apply_svf, svf_layers
    from svf_rl.svd import model_fingerprint

    config = load_config(None, [f"output_dir={tmp_path / 'run'}", "steps=2", "prompts_per_step=4",
                                "generations_per_prompt=2", "max_new_tokens=12", "baseline=none", "eval_every=2",
                                "eval_size=8", "test_size=8", "train_size=16", "log_with=[]", "progress=false",
                                "lr=0.01"])
    expert = load_expert(train(config))
    assert expert.base_model == EMBEDDED_MODEL and len(expert.vectors) == 90  # 30 layers × 3 MLP matrices
    assert max((z - 1).abs().max().item() for z in expert.vectors.values()) > 1e-3

    model, _ = load_base_model(EMBEDDED_MODEL)
    fingerprint = model_fingerprint(model)
    apply_svf(model, expert.targets, progress=False)
    apply_expert(model, expert, fingerprint)
    for name, layer in svf_layers(model).items():
        assert torch.equal(layer.z.detach(), expert.vectors[name])
    with pytest.raises(ExpertError, match="fingerprint"):
        apply_expert(model, expert, "0" * 32)


def checkpoint_steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


def test_resume_false_starts_clean_and_later_resumes_continue_the_new_run(tiny_model_dir, tmp_path):
    old = tiny_config(tiny_model_dir, tmp_path, steps=3, eval_every=1)
    train(old)
    run = Path(old.output_dir)
    assert checkpoint_steps(run) == ["step_000002", "step_000003"]
    (run / "notes.txt").write_text("mine")  # not the run's: left alone

    train(tiny_config(tiny_model_dir, tmp_path, steps=1, eval_every=100, resume=False))
    assert checkpoint_steps(run) == ["step_000001"]
    assert (run / "notes.txt").read_text() == "mine"
    assert expert_step(run / "expert.safetensors") == 1

    train(tiny_config(tiny_model_dir, tmp_path, steps=2, eval_every=100))  # resumes the new run, at step 1
    assert checkpoint_steps(run) == ["step_000001", "step_000002"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "reward" in r] == [1, 2]


def test_resume_false_with_a_bad_configuration_loses_nothing(tiny_model_dir, tmp_path):
    from svf_rl.loop.train import TrainingError

    train(tiny_config(tiny_model_dir, tmp_path, steps=2, eval_every=100))
    run = Path(tiny_config(tiny_model_dir, tmp_path).output_dir)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(TrainingError, match="reward_weights has 2 entries"):
        train(tiny_config(tiny_model_dir, tmp_path, resume=False, reward_weights=[1.0, 0.5]))
    assert sorted(p.name for p in run.iterdir()) == before and checkpoint_steps(run) == ["step_000001", "step_000002"]


def expert_step(path: Path) -> int:
    return load_expert(path).config["steps"]


def read_metrics(path: Path) -> list[dict]:
    from svf_rl.run_files import read_metrics as read

    return read(path)


def test_a_resumed_run_reports_the_base_model_once_and_the_test_once(tiny_model_dir, tmp_path):
    train(tiny_config(tiny_model_dir, tmp_path, steps=1, eval_every=100))
    expert = load_expert(train(tiny_config(tiny_model_dir, tmp_path, steps=2, eval_every=100)))
    assert "base_test_accuracy" in expert.scores and "test_accuracy" in expert.scores
    records = read_metrics(Path(tiny_config(tiny_model_dir, tmp_path).output_dir) / "metrics.jsonl")
    assert sum("test/accuracy" in r for r in records) == 1
    assert sum("base_test/accuracy" in r for r in records) == 1


def test_max_train_minutes_ends_the_run_at_a_validated_checkpoint_and_counts_across_resumes(tiny_model_dir,
                                                                                            tmp_path):
    steps = lambda: [r["step"] for r in read_metrics(run / "metrics.jsonl") if "reward" in r]  # noqa: E731
    config = tiny_config(tiny_model_dir, tmp_path, steps=3, eval_every=100, max_train_minutes=1e-9)
    run = Path(config.output_dir)
    expert = load_expert(train(config))
    records = read_metrics(run / "metrics.jsonl")
    assert steps() == [1] and "test_accuracy" in expert.scores
    assert [r["step"] for r in records if "eval/accuracy" in r] == [1]  # the last step is validated
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000001"]
    train(config)  # resumed: the time its steps used is in the checkpoint, so no step is added
    assert steps() == [1]
    train(tiny_config(tiny_model_dir, tmp_path, steps=3, eval_every=100))  # no limit: on to `steps`
    assert steps() == [1, 2, 3]


@pytest.mark.parametrize("change, message", [
    ({"targets": "attn"}, "targets='mlp', not 'attn'"),
    ({"task": "arithmetic"}, "task='yes', not 'arithmetic'"),
])
def test_a_checkpoint_of_another_run_is_refused_in_one_line(change, message, tiny_model_dir, tmp_path, monkeypatch):
    train(tiny_config(tiny_model_dir, tmp_path, steps=1, eval_every=100))
    from svf_rl.loop import train as train_module
    from svf_rl.loop.train import TrainingError

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_module, "load_base_model", no_model)
    config = tiny_config(tiny_model_dir, tmp_path, steps=2)
    config.__dict__.update(change)
    with pytest.raises(TrainingError, match="holds checkpoints of a run with") as err:
        train(config)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_on_other_base_weights_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from svf_rl.loop.train import TrainingError

    train(tiny_config(tiny_model_dir, tmp_path, steps=1, eval_every=100))
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["environment"]
    assert recorded["torch"] == torch.__version__ and recorded["cpu"]  # what drew its random numbers, and where
    other = tmp_path / "other_model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] += 0.01
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    config = tiny_config(tiny_model_dir, tmp_path, steps=2)
    config.model = str(other)
    with pytest.raises(TrainingError, match="holds checkpoints of a run with base_model="):
        train(config)
    run_json = Path(config.output_dir) / "run.json"
    run_json.write_text(run_json.read_text().replace(tiny_model_dir, str(other)))  # same name, other weights
    with pytest.raises(TrainingError, match="on other base weights"):
        train(config)


def test_a_torn_last_metrics_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.25}\n{"step": 3, "rew')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_evaluation_generates_in_batches_of_eval_batch_size(tiny_model_dir, tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from svf_rl.engines.hf import HFEngine
    from svf_rl.loop.train import evaluate
    from svf_rl.task import load_task

    class CountingEngine(HFEngine):
        def generate(self, prompts, sampling):
            calls.append(len(prompts))
            return super().generate(prompts, sampling)

    calls = []
    config = tiny_config(tiny_model_dir, tmp_path, eval_batch_size=3)
    task = load_task(config.task)
    engine = CountingEngine(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                            AutoTokenizer.from_pretrained(tiny_model_dir))
    result = evaluate(task, task.rows("test", 7, 0), engine.tokenizer, engine, config, Accelerator(cpu=True))
    assert calls == [3, 3, 1] and result["n"] == 7


SPLIT_TASK = '''
from reward_fns.text import completion_text
from svf_rl.task import Task


def odd_ones_vary(prompts, completions, number, **_):
    # Even problems pay the same whatever is written: their groups carry no signal.
    texts = [completion_text(c) for c in completions]
    return [0.5 if n % 2 == 0 else sum(map(ord, t)) % 7 / 7 for n, t in zip(number, texts)]


class SplitTask(Task):
    name = "split"
    reward_funcs = [odd_ones_vary]

    def rows(self, split, size, seed):
        return [{"question": f"Say something about {i}.", "number": i} for i in range(size)]

    def user_message(self, row):
        return row["question"]
'''


def spy_on_updates(monkeypatch) -> list:
    """The completions and advantages each update is given (the update itself runs unchanged)."""
    import svf_rl.loop.train as trainer

    seen, real = [], trainer.update_policy

    def spy(run, completions, advantage):
        seen.append((completions, advantage.clone()))
        return real(run, completions, advantage)

    monkeypatch.setattr(trainer, "update_policy", spy)
    return seen


@pytest.mark.parametrize("rounds", [1, 4])
def test_dynamic_sampling_updates_on_groups_whose_rewards_differ_and_draws_more(rounds, tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    (tmp_path / "split_task.py").write_text(SPLIT_TASK)
    seen = spy_on_updates(monkeypatch)
    config = tiny_config(tiny_model_dir, tmp_path, task=f"{tmp_path / 'split_task.py'}:SplitTask", steps=3,
                         prompts_per_step=4, generations_per_prompt=4, train_size=16, baseline="rloo", kl_coef=0,
                         max_sampling_rounds=rounds)
    train(config)
    steps = [r for r in read_metrics(Path(config.output_dir) / "metrics.jsonl") if "reward" in r]
    for completions, advantage in seen:
        groups = advantage.view(-1, 4)
        informative = int((groups.abs().sum(1) > 0).sum())
        if rounds == 1:  # every group as sampled, the even problems' with zero advantage among them
            assert len(completions) == 16 and informative < 4
        else:  # only groups that carry signal, topped up from further rollouts: the even problems are gone
            assert len(completions) == 16 and informative == 4
    if rounds > 1:
        assert all(r["sampling_rounds"] >= 2 and 0 < r["informative_groups"] < 1 for r in steps)
        assert all(r["rollout_tok_s"] > 0 for r in steps)
    else:
        assert "sampling_rounds" not in steps[0]


def test_a_group_baseline_is_needed_for_dynamic_sampling():
    from svf_rl.config import ConfigError

    with pytest.raises(ConfigError, match="^config key 'max_sampling_rounds' > 1 drops groups"):
        load_config(None, ["max_sampling_rounds=3", "baseline=mean"])


def test_a_run_on_coin_flip_rewards_trains_on_the_coin_and_scores_on_the_task(tiny_model_dir, tmp_path):
    import numpy as np

    from reward_fns.control import coin_flip

    np.random.seed(0)
    flips = coin_flip(None, ["the same answer"] * 4000)
    assert set(flips) == {0.0, 1.0} and abs(np.mean(flips) - 0.5) < 0.03  # whatever the completion says
    np.random.seed(0)
    assert coin_flip(None, ["another answer"] * 4000) == flips  # seeded (and restored on resume) by numpy's state

    plain = tiny_config(tiny_model_dir, tmp_path / "plain", steps=1, eval_every=1, kl_coef=0)
    coin = tiny_config(tiny_model_dir, tmp_path / "coin", steps=1, eval_every=1, kl_coef=0,
                       rewards="[reward_fns.control:coin_flip]")
    train(plain), train(coin)
    plain_metrics, coin_metrics = (read_metrics(Path(c.output_dir) / "metrics.jsonl") for c in (plain, coin))
    # Held-out scores are the task's own: the base model scores the same under either reward.
    assert plain_metrics[0]["base_test/accuracy"] == coin_metrics[0]["base_test/accuracy"]
    step = next(r for r in coin_metrics if "reward" in r)
    assert "reward/coin_flip" in step and "reward/says_yes" not in step


@pytest.mark.parametrize("reference, message", [
    ("no_colon", "must be module:function"),
    ("no_such_module_xyz:f", "cannot import reward module"),
    ("reward_fns.control:no_such_function", "has no attribute"),
    ("missing_file.py:f", "reward file not found"),
])
def test_a_bad_reward_reference_fails_in_one_line_before_the_model_loads(reference, message, capsys, monkeypatch,
                                                                         tmp_path):
    import svf_rl.base_model
    import svf_rl.loop.train
    from svf_rl.cli import main

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model loaded for a run that cannot train")

    monkeypatch.setattr(svf_rl.loop.train, "load_base_model", must_not_run)
    monkeypatch.setattr(svf_rl.base_model, "load_base_model", must_not_run)
    assert main(["train", f"rewards=[{reference}]", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
