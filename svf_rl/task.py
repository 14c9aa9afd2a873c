"""The task interface, and finding a task by name, module:Name or path/to/file.py:Name."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

ENTRY_POINT_GROUP = "svf_rl.tasks"
RewardFunc = Callable[..., list]  # TRL's signature: f(prompts, completions, **columns) -> list[float | None]


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

    def score(self, completion: str, row: dict) -> float:
        """Held-out metric of one greedy completion, in [0, 1]. Defaults to the first reward function."""
        columns = {k: [v] for k, v in row.items() if k != "prompt"}
        value = self.reward_funcs[0](prompts=[self.prompt(row)], completions=[completion], **columns)[0]
        return float(value or 0.0)


def available_tasks() -> dict[str, str]:
    """Registered task names → their entry point targets."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _import_reference(reference: str):
    where, _, attr = reference.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"task file not found: {where}")
        module_name = f"svf_rl_user_task_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    if not hasattr(module, attr):
        raise ValueError(f"{where} has no attribute {attr!r}")
    return getattr(module, attr)


def load_task(spec: str, args: dict | None = None) -> Task:
    """Build a task from a registered name, `module:Name` or `path/to/file.py:Name`, called with `args`."""
    if ":" in spec:
        factory = _import_reference(spec)
    else:
        registered = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        if spec not in registered:
            raise ValueError(f"unknown task {spec!r}; available: {', '.join(sorted(registered)) or 'none'} "
                             "(or give path/to/file.py:Name)")
        factory = registered[spec].load()
    try:
        task = factory(**(args or {}))
    except TypeError as err:
        raise ValueError(f"task {spec!r} rejected task_args {args}: {err}") from None
    if not task.reward_funcs:
        raise ValueError(f"task {spec!r} defines no reward functions")
    return task
