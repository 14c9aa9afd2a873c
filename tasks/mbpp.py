"""MBPP (google-research-datasets/mbpp), code run against its asserts in the sandbox."""

from __future__ import annotations

from reward_fns.code import code_reward
from reward_fns.sandbox import Limits
from svf_rl.task import Task, sample_rows

from .hub import load_split


class MBPP(Task):
    name = "mbpp"

    def __init__(self, config: str = "full", reward: str = "fraction", timeout_s: float = 10.0,
                 data_dir: str | None = None, system_prompt: str | None = None):
        self.config, self.data_dir, self.system_prompt = config, data_dir, system_prompt
        self.reward_funcs = [code_reward(reward, Limits(timeout_s=timeout_s))]

    def rows(self, split: str, size: int, seed: int) -> list[dict]:
        rows = []
        for r in load_split("google-research-datasets/mbpp", self.config, split, self.data_dir):
            setup = r.get("test_setup_code") or ""
            rows.append({"task_id": r["task_id"], "text": r.get("text") or r["prompt"],
                         "example": r["test_list"][0], "code_prefix": setup + "\n" if setup else "",
                         "tests": list(r["test_list"])})
        return sample_rows(rows, size, seed)

    def user_message(self, row: dict) -> str:
        return (f"{row['text']}\nYour code should pass this test:\n{row['example']}\n"
                "Reply with the Python code in one ```python code block.")
