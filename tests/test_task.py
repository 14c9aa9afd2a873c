import pytest

from svf_rl.task import available_tasks, load_task


def test_builtin_tasks_are_registered_by_entry_point():
    assert "arithmetic" in available_tasks()


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown task 'nope'; available: .*arithmetic"):
        load_task("nope")


def test_task_from_a_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("from svf_rl.task import Task\n"
                    "def one(prompts, completions, **_):\n    return [1.0] * len(completions)\n"
                    "class Mine(Task):\n    name = 'mine'\n    reward_funcs = [one]\n"
                    "    def __init__(self, size=3):\n        self.size = size\n")
    task = load_task(f"{path}:Mine", {"size": 5})
    assert task.name == "mine" and task.size == 5
    with pytest.raises(ValueError, match="rejected task_args"):
        load_task(f"{path}:Mine", {"colour": "red"})
    with pytest.raises(FileNotFoundError, match="task file not found"):
        load_task(f"{tmp_path / 'missing.py'}:Mine")


def test_arithmetic_splits_are_disjoint_and_scored_exactly():
    task = load_task("arithmetic")
    splits = {s: task.rows(s, 150, 0) for s in ("train", "validation", "test")}
    expressions = {s: {r["entry"]["metadata"]["expression"] for r in rows} for s, rows in splits.items()}
    assert not expressions["train"] & expressions["test"]
    assert not expressions["validation"] & (expressions["train"] | expressions["test"])
    row = splits["test"][0]
    assert task.score(f"The answer is {row['answer']}.", row) == 1.0
    assert task.score("The answer is 1000.", row) == 0.0
    assert task.score("I do not know", row) == 0.0
