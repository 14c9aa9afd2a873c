"""Several tasks at once, in equal shares, each row prompted, rewarded and scored as its own task (for mixtures)."""

from __future__ import annotations

from svf_rl.task import Task, TaskError, load_task, sample_rows

PLAIN = {"instruction": "Answer with just the number, nothing else.", "extract": "last_number",
         "system_prompt": "Answer briefly."}
OFFLINE_SOURCES = {  # the three tasks of the adaptation benchmark (launch/experts), all offline
    "arithmetic": ("arithmetic", {}),
    "gcd": ("reasoning_gym", {"dataset": "gcd", "config": {"min_value": 1, "max_value": 100}, **PLAIN}),
    "counting": ("reasoning_gym", {"dataset": "letter_counting", "config": {"min_words": 3, "max_words": 8},
                                   **PLAIN}),
}


class MixedTasks(Task):
    """`sources`: {name: [task, task_args]}. A row is {"source": name, "row": that task's row}, so sources with
    other columns mix."""

    name = "mixed"

    def __init__(self, sources: dict | None = None):
        sources = sources or OFFLINE_SOURCES
        if not isinstance(sources, dict) or len(sources) < 2:
            raise TaskError("mixed needs at least two sources, e.g. {\"a\": [\"arithmetic\", {}], \"b\": [...]}")
        self.sources = {}
        for label, spec in sources.items():
            if (not isinstance(spec, (list, tuple)) or len(spec) != 2 or not isinstance(spec[0], str)
                    or not isinstance(spec[1], dict)):
                raise TaskError(f"mixed: source {label!r} must be [task, task_args], got {spec!r}")
            self.sources[label] = load_task(spec[0], spec[1])
        self.reward_funcs = [source_reward(self.sources)]

    def rows(self, split: str, size: int, seed: int) -> list[dict]:
        per_source = -(-size // len(self.sources))
        rows = [{"source": label, "row": row} for label, task in self.sources.items()
                for row in task.rows(split, per_source, seed)]
        return sample_rows(rows, size, seed)

    def prompt(self, row: dict) -> list[dict]:
        return self.sources[row["source"]].prompt(row["row"])

    def user_message(self, row: dict) -> str:
        return self.sources[row["source"]].user_message(row["row"])

    def problem(self, row: dict) -> str:
        return f"{row['source']}:{self.sources[row['source']].problem(row['row'])}"

    def source(self, row: dict) -> str:
        return row["source"]

    def score(self, completion: str, row: dict) -> float:
        return self.sources[row["source"]].score(completion, row["row"])


def source_reward(sources: dict):
    def mixed_reward(prompts, completions, source, row, completion_ids=None, **_) -> list[float | None]:
        """Each completion's reward is its own task's weighted reward (None where none of its functions scored
        it); a source whose reward function raised makes this one raise, so the loop counts it."""
        from svf_rl.rewards import score_completions

        values: list[float | None] = [None] * len(completions)
        failed = {}
        for label, task in sources.items():
            picked = [i for i, s in enumerate(source) if s == label]
            if not picked:
                continue
            rows = [row[i] for i in picked]
            columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
            if completion_ids is not None:
                columns["completion_ids"] = [completion_ids[i] for i in picked]
            weights = task.reward_weights or [1.0] * len(task.reward_funcs)
            total, per_func, errors = score_completions(task.reward_funcs, weights, [prompts[i] for i in picked],
                                                        [completions[i] for i in picked], columns, label)
            failed.update({f"{label}/{name}": error for name, error in errors.items()})
            for j, (i, value) in enumerate(zip(picked, total.tolist(), strict=True)):
                values[i] = None if all(scores[j] is None for scores in per_func.values()) else value
        if failed:
            name, error = next(iter(failed.items()))
            raise RuntimeError(f"{name} raised {error}")
        return values

    return mixed_reward
