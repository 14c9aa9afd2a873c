"""Competition math (MATH train, MATH-500 test), \\boxed answers checked by math-verify."""

from __future__ import annotations

from reward_fns.format import boxed_format
from reward_fns.math import last_boxed, math_reward
from svf_rl.task import Task, TaskError, hash_split, sample_rows

from .hub import load_split

INSTRUCTION = "Solve the problem, then give the final answer as \\boxed{ANSWER}."


class CompetitionMath(Task):
    """Train/validation from `dataset`'s train split (a stable fifth held out); test from `test_dataset`."""

    name = "math"
    reward_funcs = [math_reward, boxed_format]
    reward_weights = [1.0, 0.1]

    def __init__(self, dataset: str = "DigitalLearningGmbH/MATH-lighteval", config: str | None = None,
                 test_dataset: str = "HuggingFaceH4/MATH-500", data_dir: str | None = None,
                 instruction: str = INSTRUCTION, system_prompt: str | None = None):
        self.dataset, self.config, self.test_dataset, self.data_dir = dataset, config, test_dataset, data_dir
        self.instruction, self.system_prompt = instruction, system_prompt

    def rows(self, split: str, size: int, seed: int) -> list[dict]:
        if split == "test":
            raw = load_split(self.test_dataset, None, "test", self.data_dir)
        else:
            raw = load_split(self.dataset, self.config, "train", self.data_dir)
            raw = [r for r in raw if hash_split(r["problem"], validation=0.2, test=0.0) == split]
        rows = []
        for row in raw:
            answer = row.get("answer") or last_boxed(row.get("solution", ""))
            if answer is None:
                raise TaskError(f"task math: a row has neither an 'answer' column nor a \\boxed{{}} 'solution': "
                                f"{row.get('problem', '')[:60]!r}")
            rows.append({"problem": row["problem"], "answer": answer})
        return sample_rows(rows, size, seed)

    def user_message(self, row: dict) -> str:
        return f"{row['problem']}\n\n{self.instruction}"
