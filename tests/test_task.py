import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from svf_rl.task import available_tasks, check_reward_columns, load_task


def test_builtin_tasks_are_registered_by_entry_point():
    assert {"arithmetic", "gsm8k", "math", "mbpp", "humaneval", "arc_easy", "arc_challenge", "reasoning_gym",
            "task_classification"} <= set(available_tasks())


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


def test_held_out_splits_draw_each_problem_once():
    task = load_task("arithmetic")
    for split, size in (("validation", 100), ("test", 200), ("train", 1000), ("validation", 1), ("test", 2)):
        rows = task.rows(split, size, 0)
        assert len(rows) == size and len({task.split_key(r["entry"]) for r in rows}) == size, split
        assert len({r["question"] for r in rows}) == size


def test_a_split_smaller_than_asked_gives_all_its_distinct_problems(monkeypatch, caplog):
    import tasks.procedural

    def small_space(name, size, seed, **config):  # a generator with 40 problems in all, repeating them
        return [{"question": f"What is {(seed + i) % 40} + 1?", "answer": str((seed + i) % 40 + 1)}
                for i in range(size)]

    task = load_task("reasoning_gym", {"dataset": "basic_arithmetic"})
    monkeypatch.setattr(tasks.procedural.reasoning_gym, "create_dataset", small_space)
    rows = task.rows("test", 500, 0)
    problems = (f"What is {i} + 1?" for i in range(40))
    every_test_problem = {q for q in problems if tasks.procedural.hash_split(q) == "test"}
    assert sorted(r["question"] for r in rows) == sorted(every_test_problem)
    assert "fewer than the 500 asked" in caplog.text


def test_training_scores_each_repeated_held_out_problem_once(caplog):
    from svf_rl.task import unique_rows

    task = load_task("arithmetic")
    rows = task.rows("test", 5, 0)
    assert unique_rows(task, rows + rows[:3], "test") == rows
    assert "scoring its 5 unique ones of 8 drawn" in caplog.text


FIXTURES = Path(__file__).parent / "fixtures"


def conversation(text):
    return [{"role": "assistant", "content": text}]


def score_all(task, rows, completions):
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    return task.reward_funcs[0](prompts=[task.prompt(r) for r in rows],
                                completions=[conversation(c) for c in completions], **columns)


def test_gsm8k_reference_answers_score_one():
    task = load_task("gsm8k", {"data_dir": str(FIXTURES / "gsm8k")})
    rows = task.rows("test", 10, 0)
    assert len(rows) == 3 and "\\boxed" in task.user_message(rows[0])
    finals = [r["answer"].split("####")[1].strip() for r in rows]
    assert score_all(task, rows, [f"Reasoning...\n\\boxed{{{f}}}" for f in finals]) == [1.0] * 3
    assert score_all(task, rows, ["\\boxed{0}"] * 3) == [0.0] * 3
    train, validation = task.rows("train", 10, 0), task.rows("validation", 10, 0)
    assert not {r["question"] for r in train} & {r["question"] for r in validation}


def test_math_gold_comes_from_answer_or_boxed_solution():
    task = load_task("math", {"data_dir": str(FIXTURES / "math")})
    train = task.rows("train", 10, 0) + task.rows("validation", 10, 0)
    assert {r["answer"] for r in train} == {"\\frac{3}{4}", "4", "25\\%", "10", "3"}
    assert score_all(task, train, [f"\\boxed{{{r['answer']}}}" for r in train]) == [1.0] * len(train)
    test = task.rows("test", 10, 0)
    assert score_all(task, test, ["so it is \\boxed{0.75}" if r["answer"] == "\\frac{3}{4}" else "\\boxed{9}"
                                  for r in test]) == [1.0, 1.0]


def test_mbpp_reference_code_passes_its_tests_in_the_sandbox():
    task = load_task("mbpp", {"data_dir": str(FIXTURES / "mbpp")})
    rows = task.rows("test", 3, 0)
    raw = {r["task_id"]: r["code"] for r in map(json.loads, (FIXTURES / "mbpp" / "test.jsonl").open())}
    assert score_all(task, rows, [f"```python\n{raw[r['task_id']]}\n```" for r in rows]) == [1.0] * 3
    assert score_all(task, rows, ["def nothing():\n    pass"] * 3) == [0.0] * 3


def test_arc_maps_numeric_labels_to_letters():
    task = load_task("arc_challenge", {"data_dir": str(FIXTURES / "arc")})
    assert task.name == "arc_challenge"
    rows = task.rows("test", 3, 0)
    assert {r["answer"] for r in rows} == {"A", "B", "C"}
    assert "(C) water" in task.user_message(next(r for r in rows if r["answer"] == "C"))
    assert score_all(task, rows, [f"The answer is ({r['answer']})." for r in rows]) == [1.0] * 3


def test_humaneval_ships_offline():
    task = load_task("humaneval")
    sizes = {s: len(task.rows(s, 200, 0)) for s in ("train", "validation", "test")}
    assert sum(sizes.values()) == 164 and min(sizes.values()) > 20


def test_any_reasoning_gym_dataset_by_name_and_config():
    task = load_task("reasoning_gym", {"dataset": "chain_sum", "config": {"min_terms": 2, "max_terms": 2}})
    rows = task.rows("train", 5, 0)
    assert task.score(f"<answer>{rows[0]['answer']}</answer>", rows[0]) == 1.0
    with pytest.raises(ValueError, match="reasoning-gym has no dataset 'chain_summ'"):
        load_task("reasoning_gym", {"dataset": "chain_summ"})


def test_task_classification_labels_prompts_of_other_tasks():
    task = load_task("task_classification")
    rows = task.rows("train", 9, 0)
    assert {r["label"] for r in rows} == {"math", "code", "reasoning"}
    assert score_all(task, rows, [r["label"].upper() for r in rows]) == [1.0] * 9
    described = load_task("task_classification", {"descriptions": {"math": "numbers and equations"}})
    assert "math (numbers and equations), code, reasoning?" in described.user_message(rows[0])
    with pytest.raises(ValueError, match="labels it does not have"):
        load_task("task_classification", {"descriptions": {"poetry": "verse"}})


def test_hub_dataset_offline_fails_in_one_line_saying_what_to_download(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "svf_rl", "train", "--task", "gsm8k",
                             f"output_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "load_dataset('openai/gsm8k', 'main')" in result.stderr


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from svf_rl.task import Task\n"
                    "def needs_answer(prompts, completions, answer, **_):\n    return [0.0] * len(completions)\n"
                    "class Bad(Task):\n    name = 'bad'\n    reward_funcs = [needs_answer]\n"
                    "    def rows(self, split, size, seed):\n        return [{'question': 'q'}] * size\n")
    task = load_task(f"{path}:Bad")
    with pytest.raises(ValueError, match="task 'bad': reward function needs_answer needs column 'answer', "
                                         r"which its rows lack \(they have: question\)"):
        check_reward_columns(task, task.rows("train", 1, 0)[0])
