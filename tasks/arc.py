"""ARC science questions (allenai/ai2_arc), multiple choice, rewarded by the chosen letter."""

from __future__ import annotations

from reward_fns.reasoning import choice_reward
from svf_rl.task import Task, sample_rows

from .hub import load_split

INSTRUCTION = "Answer with the letter of the correct choice, as: The answer is (X)."


class ARC(Task):
    reward_funcs = [choice_reward]

    def __init__(self, config: str = "ARC-Easy", data_dir: str | None = None, instruction: str = INSTRUCTION,
                 system_prompt: str | None = None):
        self.config, self.data_dir, self.instruction, self.system_prompt = config, data_dir, instruction, system_prompt
        self.name = config.lower().replace("-", "_")

    def rows(self, split: str, size: int, seed: int) -> list[dict]:
        rows = []
        for r in load_split("allenai/ai2_arc", self.config, split, self.data_dir):
            labels = r["choices"]["label"]
            letters = "ABCDEFGH"[:len(labels)]  # a few questions use 1-4 instead of A-D
            rows.append({"question": r["question"], "choices": list(zip(letters, r["choices"]["text"], strict=True)),
                         "answer": letters[labels.index(r["answerKey"])]})
        return sample_rows(rows, size, seed)

    def user_message(self, row: dict) -> str:
        options = "\n".join(f"({letter}) {text}" for letter, text in row["choices"])
        return f"{row['question']}\n{options}\n\n{self.instruction}"


def arc_easy(**kwargs) -> ARC:
    return ARC("ARC-Easy", **kwargs)


def arc_challenge(**kwargs) -> ARC:
    return ARC("ARC-Challenge", **kwargs)
