"""GSM8K word problems (openai/gsm8k), answers checked by math-verify."""

from __future__ import annotations

from reward_fns.math import math_reward
from svf_rl.task import Task, hash_split, sample_rows

from .hub import load_split

INSTRUCTION = "Solve the problem step by step, then give the final answer as \\boxed{N}."


class GSM8K(Task):
    name = "gsm8k"
    reward_funcs = [math_reward]

    def __init__(self, data_dir: str | None = None, instruction: str = INSTRUCTION, system_prompt: str | None = None):
        self.data_dir, self.instruction, self.system_prompt = data_dir, instruction, system_prompt

    def rows(self, split: str, size: int, seed: int) -> list[dict]:
        # GSM8K has train and test; validation is a stable fifth of train
        source = "test" if split == "test" else "train"
        rows = load_split("openai/gsm8k", "main", source, self.data_dir)
        if split != "test":
            rows = [r for r in rows if hash_split(r["question"], validation=0.2, test=0.0) == split]
        return sample_rows(rows, size, seed)

    def user_message(self, row: dict) -> str:
        return f"{row['question']}\n\n{self.instruction}"
