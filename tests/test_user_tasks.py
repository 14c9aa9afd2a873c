"""Users' own tasks: the documented example as written, TRL's reward functions, and broken rewards."""

import json
import re
import shlex
from pathlib import Path

import pytest

from svf_rl.cli import main
from svf_rl.inference.expert import load_expert
from svf_rl.loop.train import TrainingError, train
from tests.test_train import tiny_config

README = Path(__file__).parents[1] / "docs" / "tasks.md"  # where the example task is written out
FAST = ["steps=2", "prompts_per_step=2", "generations_per_prompt=2", "max_new_tokens=4", "eval_size=4",
        "test_size=4", "train_size=8", "log_with=[]", "progress=false"]


def readme_block(marker: str) -> str:
    text = README.read_text()
    return re.search(rf"<!-- {re.escape(marker)}.*?-->\n```\w*\n(.*?)```", text, re.DOTALL).group(1)


def test_readme_task_example_trains_as_written(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "my_task.py").write_text(readme_block("example-task"))
    command = shlex.split(readme_block("example-command"))
    assert command[:2] == ["svf-rl", "train"]
    monkeypatch.chdir(tmp_path)
    assert main(command[1:] + [f"model={tiny_model_dir}"] + FAST) == 0
    expert = load_expert(tmp_path / "runs" / "reverse" / "expert.safetensors")
    assert expert.task == "reverse_digits"


def test_trl_reward_functions_work_unchanged(tiny_model_dir, tmp_path):
    task_file = tmp_path / "trl_task.py"
    task_file.write_text(
        "from trl.rewards import accuracy_reward, think_format_reward\n"
        "from svf_rl.task import Task\n\n"
        "class Half(Task):\n    name = 'half'\n    reward_funcs = [accuracy_reward, think_format_reward]\n"
        "    def rows(self, split, size, seed):\n"
        "        return [{'question': f'Half of {2 * i}?', 'solution': f'${i}$'} for i in range(size)]\n"
        "    def user_message(self, row):\n        return row['question']\n")
    config = tiny_config(tiny_model_dir, tmp_path, task=f"{task_file}:Half")
    train(config)
    steps = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    trained = [s for s in steps if "reward" in s]
    assert len(trained) == 3 and all("reward/accuracy_reward" in s and "reward/think_format_reward" in s
                                     for s in trained)


BROKEN = '''
from svf_rl.task import Task

def {name}(prompts, completions, **_):
    {body}

class Broken(Task):
    name = "broken"
    reward_funcs = [{name}]

    def rows(self, split, size, seed):
        return [{{"question": str(i)}} for i in range(size)]

    def user_message(self, row):
        return row["question"]
'''


@pytest.mark.parametrize("name, body, message", [
    ("always_raises", "raise KeyError('no such field')",
     "task 'broken': reward function always_raises raised on 2 consecutive steps \\(KeyError: 'no such field'\\)"),
    ("one_short", "return [0.0] * (len(completions) - 1)",
     "task 'broken': reward function one_short returned 3 values for 4 completions"),
])
def test_broken_rewards_stop_in_one_line_naming_task_and_function(tiny_model_dir, tmp_path, name, body, message):
    task_file = tmp_path / "broken.py"
    task_file.write_text(BROKEN.format(name=name, body=body))
    config = tiny_config(tiny_model_dir, tmp_path, task=f"{task_file}:Broken", max_bad_steps=2)
    with pytest.raises((TrainingError, ValueError), match=message) as err:
        train(config)
    assert "\n" not in str(err.value)
