"""Scoring completions with several weighted reward functions, robust to functions that fail."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def reward_name(func) -> str:
    return getattr(func, "__name__", type(func).__name__)


class RewardError(ValueError):
    """A reward function that is broken, not merely unsure: the message names the task and the function."""


def first_label(text: str, labels: list[str]) -> str | None:
    """The label named earliest in the text, as a whole word (case-insensitive)."""
    found = [(m.start(), label) for label in labels
             if (m := re.search(rf"\b{re.escape(label)}\b", text, re.IGNORECASE))]
    return min(found)[1] if found else None


def as_completion(prompt, text: str):
    """A completion in TRL's form: a message list when the prompt is a conversation, else the text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def score_completions(funcs: Sequence, weights: Sequence[float], prompts: list, completions: list,
                      columns: dict[str, list], task: str = "task"
                      ) -> tuple[torch.Tensor, dict[str, list[float | None]], dict[str, str]]:
    """Weighted sum of rewards per completion, each function's raw scores, and the errors of those that raised.

    A function that raises, or a value that is None or NaN, counts as no score (0 in the sum) and is
    logged; a function that returns the wrong number of values is a bug in it, so that raises.
    """
    total = torch.zeros(len(completions))
    per_func: dict[str, list[float | None]] = {}
    errors: dict[str, str] = {}
    for func, weight in zip(funcs, weights, strict=True):
        name = reward_name(func)
        try:
            values = list(func(prompts=prompts, completions=completions, **columns))
        except Exception as err:  # one bad batch must not stop training; the loop stops a function that keeps failing
            errors[name] = f"{type(err).__name__}: {err}".splitlines()[0]
            log.warning("task %s: reward function %s raised %s; scored as no reward", task, name, errors[name])
            values = [None] * len(completions)
        if len(values) != len(completions):
            raise RewardError(f"task {task!r}: reward function {name} returned {len(values)} values "
                              f"for {len(completions)} completions")
        clean = [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]
        if any(v is None for v in clean):
            log.debug("reward function %s gave no score for %d completions", name, clean.count(None))
        per_func[name] = clean
        total += weight * torch.tensor([0.0 if v is None else v for v in clean])
    return total, per_func, errors
