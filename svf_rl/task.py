"""The task interface, and finding a task by name, module:Name or path/to/file.py:Name."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import random
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from svf_rl.rewards import as_completion, reward_name

log = logging.getLogger("svf_rl")
ENTRY_POINT_GROUP = "svf_rl.tasks"
RewardFunc = Callable[..., list]  # TRL's signature: f(prompts, completions, **columns) -> list[float | None]


class TaskError(ValueError):
    """A task that cannot be built or fed; the message names the task and what is wrong."""


class Task:
    """A verifiable task: data rows, a chat prompt per row, reward functions, and a held-out score.

    Rows are dicts; every key but "prompt" is passed to reward functions as a column, as in TRL.
    """

    name: str = "task"
    system_prompt: str | None = None
    reward_funcs: Sequence[RewardFunc] = ()
    reward_weights: Sequence[float] | None = None

    def rows(self, split: str, size: int, seed: int) -> list[dict]:
        """`size` rows of split "train", "validation" or "test"; splits never share a problem."""
        raise NotImplementedError

    def user_message(self, row: dict) -> str:
        raise NotImplementedError

    def prompt(self, row: dict) -> list[dict]:
        messages = [{"role": "user", "content": self.user_message(row)}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def problem(self, row: dict) -> str:
        """The problem a row poses, whatever instruction or prompt is put around it: its data, as canonical
        JSON (override when rows carry more than the problem)."""
        return json.dumps({k: v for k, v in row.items() if k != "prompt"}, sort_keys=True, default=str)

    def source(self, row: dict) -> str | None:
        """Which part of the task a row comes from (a mixture of tasks: its source task), for statistics per
        part; None for a task of one part."""
        return None

    def score(self, completion: str, row: dict) -> float:
        """Held-out metric of one greedy completion, in [0, 1]. Defaults to the first reward function."""
        columns = {k: [v] for k, v in row.items() if k != "prompt"}
        prompt = self.prompt(row)
        value = self.reward_funcs[0](prompts=[prompt], completions=[as_completion(prompt, completion)], **columns)[0]
        return float(value or 0.0)


def hash_split(key: str, validation: float = 0.2, test: float = 0.2) -> str:
    """A stable split for a problem, from a hash of its text: the same problem is always in the same split."""
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64
    return "test" if bucket < test else "validation" if bucket < test + validation else "train"


def sample_rows(rows: list[dict], size: int, seed: int) -> list[dict]:
    """`size` rows drawn without replacement (all of them, shuffled, when there are fewer)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:size]


def check_reward_columns(task: Task, row: dict, reward_funcs: Sequence | None = None) -> None:
    """Fail before training when a reward function (the task's, or those given) needs a column the rows lack."""
    for func in task.reward_funcs if reward_funcs is None else reward_funcs:
        try:
            parameters = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in parameters:
            needed = p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            if needed and p.name not in ("prompts", "completions", "completion_ids") and p.name not in row:
                have = ", ".join(sorted(k for k in row if k != "prompt"))
                raise TaskError(f"task {task.name!r}: reward function {reward_name(func)} needs "
                                f"column {p.name!r}, which its rows lack (they have: {have})")


def available_tasks() -> dict[str, str]:
    """Registered task names → their entry point targets."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def describe_task(name: str) -> str:
    """The first line of the docstring of a registered task's module: one task, one file, one summary."""
    try:
        factory = next(ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name).load()
    except Exception as err:  # a broken plugin must not hide the others
        return f"(cannot import: {type(err).__name__}: {err})"
    doc = inspect.getdoc(sys.modules[factory.__module__])
    return doc.strip().splitlines()[0] if doc else ""


def _import_reference(reference: str, kind: str = "task"):
    where, _, attr = reference.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"{kind} file not found: {where}")
        module_name = f"svf_rl_user_{kind}_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # the user's file: a syntax error or anything it raises at import
            del sys.modules[module_name]
            raise TaskError(f"{kind} file {where} failed to import: {type(err).__name__}: {err}") from None
    else:
        try:
            module = importlib.import_module(where)
        except (ImportError, ValueError) as err:
            raise TaskError(f"cannot import {kind} module {where!r}: {err}") from None
    if not hasattr(module, attr):
        raise TaskError(f"{where} has no attribute {attr!r}")
    return getattr(module, attr)


def load_reward(reference: str):
    """A reward function from `module:function` or `path/to/file.py:function` (config key `rewards`)."""
    if ":" not in reference:
        raise TaskError(f"reward {reference!r} must be module:function or path/to/file.py:function "
                        f"(e.g. reward_fns.control:coin_flip)")
    try:
        func = _import_reference(reference, "reward")
    except FileNotFoundError as err:
        raise TaskError(str(err)) from None
    if not callable(func):
        raise TaskError(f"reward {reference!r} is not a function")
    return func


def load_task(spec: str, args: dict | None = None) -> Task:
    """Build a task from a registered name, `module:Name` or `path/to/file.py:Name`, called with `args`."""
    if ":" in spec:
        factory = _import_reference(spec)
    else:
        registered = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        if spec not in registered:
            raise TaskError(f"unknown task {spec!r}; available: {', '.join(sorted(registered)) or 'none'} "
                             "(or give path/to/file.py:Name)")
        factory = registered[spec].load()
    try:
        task = factory(**(args or {}))
    except TypeError as err:
        raise TaskError(f"task {spec!r} rejected task_args {args}: {err}") from None
    if not task.reward_funcs:
        raise TaskError(f"task {spec!r} defines no reward functions")
    return task


def parse_task_args(text: str | None) -> dict | None:
    """--task-args: the task's arguments as a JSON object; None when not given."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as err:
        raise TaskError(f"--task-args is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise TaskError(f"--task-args must be a JSON object of the task's arguments, got {type(value).__name__}")
    return value


def unique_rows(task, rows: list[dict], split: str) -> list[dict]:
    """Held-out rows with each prompt once: a repeated problem would count twice and narrow the interval."""
    seen, unique = set(), []
    for row in rows:
        key = repr(task.prompt(row))
        if key not in seen:
            seen.add(key)
            unique.append(row)
    if len(unique) < len(rows):
        log.warning("task %s: the %s split repeats problems; scoring its %d unique ones of %d drawn",
                    task.name, split, len(unique), len(rows))
    return unique


def safe_score(task, completion: str, row: dict) -> float:
    try:
        return task.score(completion, row)
    except Exception as err:  # counted as wrong; a reward that keeps raising stops the run in the training loop
        log.warning("task %s: score raised %s: %s; counted as wrong", task.name, type(err).__name__, err)
        return 0.0
