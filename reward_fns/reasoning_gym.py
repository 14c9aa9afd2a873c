"""Rewards from reasoning-gym's own verifiers (`score_answer`)."""

from __future__ import annotations

from collections.abc import Callable

from .text import completion_text, last_number


def score_answer_reward(dataset, extract: Callable[[str], str | None] = last_number):
    """A reward that scores `extract(completion)` with `dataset.score_answer` against the row's `entry` column."""

    def reasoning_gym_score(prompts, completions, entry, **_) -> list[float | None]:
        scores = []
        for completion, item in zip(completions, entry, strict=True):
            answer = extract(completion_text(completion))
            scores.append(0.0 if answer is None else float(dataset.score_answer(answer, item)))
        return scores

    return reasoning_gym_score
