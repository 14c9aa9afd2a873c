"""Arithmetic from reasoning-gym's basic_arithmetic, fully offline: the embedded default task."""

from __future__ import annotations

import hashlib

import reasoning_gym

from reward_fns.reasoning_gym import score_answer_reward
from svf_rl.task import Task


def _split_of(expression: str) -> str:
    """A stable hash puts each expression in one split (60/20/20), so splits never share a problem."""
    bucket = hashlib.sha1(expression.encode()).digest()[0] % 5
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


class Arithmetic(Task):
    name = "arithmetic"
    system_prompt = "Answer briefly."  # shorter than the model's default one: fewer tokens per step

    def __init__(self, operators: str = "+-*", digits: int = 1, terms: int = 2,
                 instruction: str = "Answer with just the number, nothing else."):
        self.options = dict(min_terms=terms, max_terms=terms, min_digits=digits, max_digits=digits,
                            operators=tuple(operators))
        self.instruction = instruction
        self.verifier = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=0, **self.options)
        self.reward_funcs = [score_answer_reward(self.verifier)]

    def rows(self, split: str, size: int, seed: int) -> list[dict]:
        if split not in ("train", "validation", "test"):
            raise ValueError(f"arithmetic has splits train, validation and test, not {split!r}")
        rows, pool_seed = [], seed * 1000 + len(split)
        while len(rows) < size:
            pool = reasoning_gym.create_dataset("basic_arithmetic", size=4 * size, seed=pool_seed, **self.options)
            for entry in pool:
                if _split_of(entry["metadata"]["expression"]) == split:
                    rows.append({"question": entry["question"], "answer": entry["answer"], "entry": entry})
            pool_seed += 1
        return rows[:size]

    def user_message(self, row: dict) -> str:
        return f"{row['question']} {self.instruction}".strip()

    def score(self, completion: str, row: dict) -> float:
        """Exact accuracy: reasoning-gym gives partial credit to wrong numbers, which helps as a reward only."""
        return float(super().score(completion, row) >= 1.0)
