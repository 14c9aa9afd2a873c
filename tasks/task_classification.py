"""Which kind of task is a prompt (math, code, reasoning)? Data for the classifier expert."""

from __future__ import annotations

from reward_fns.reasoning import label_reward
from svf_rl.task import Task, TaskError, load_task, sample_rows

OFFLINE_SOURCES = {  # label -> (task, task_args); all generated or shipped offline
    "math": ("reasoning_gym", {"dataset": "gsm_symbolic"}),
    "code": ("humaneval", {}),
    "reasoning": ("reasoning_gym", {"dataset": "knights_knaves"}),
}


class TaskClassification(Task):
    """Prompts of each source task, labelled with its category; sources may be any tasks, e.g.
    {"math": ["gsm8k", {}], "code": ["mbpp", {}], "reasoning": ["arc_easy", {}]}."""

    name = "task_classification"
    reward_funcs = [label_reward]

    def __init__(self, sources: dict | None = None, system_prompt: str | None = None,
                 descriptions: dict | None = None):
        """`descriptions`: {label: what it means}, shown beside each label (a small model may need them)."""
        sources = sources or OFFLINE_SOURCES
        if len(sources) < 2:
            raise TaskError("task_classification needs at least two labelled sources")
        self.labels = list(sources)
        self.descriptions = dict(descriptions or {})
        unknown = sorted(set(self.descriptions) - set(self.labels))
        if unknown:
            raise TaskError(f"task_classification: descriptions for labels it does not have: {unknown}")
        self.sources = {label: load_task(spec, args) for label, (spec, args) in sources.items()}
        self.system_prompt = system_prompt

    def rows(self, split: str, size: int, seed: int) -> list[dict]:
        per_label = -(-size // len(self.labels))
        rows = [{"text": task.user_message(row), "label": label, "labels": self.labels, "problem": task.problem(row)}
                for label, task in self.sources.items() for row in task.rows(split, per_label, seed)]
        return sample_rows(rows, size, seed)

    def user_message(self, row: dict) -> str:
        kinds = ", ".join(f"{label} ({self.descriptions[label]})" if label in self.descriptions else label
                          for label in self.labels)
        return (f"Which kind of task is this: {kinds}?\n\n<task>\n{row['text']}\n</task>\n\n"
                f"Answer with one word: {' or '.join(self.labels)}.")
