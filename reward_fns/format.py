"""Format rewards: 1.0 when the completion has the required form, to be used alongside a correctness reward."""

from __future__ import annotations

import re

from .text import NUMBER, completion_text


def format_reward(pattern: str, name: str, full: bool = False):
    """A reward that is 1.0 when `pattern` matches the completion (the whole of it if `full`)."""
    regex = re.compile(pattern, re.DOTALL)
    match = regex.fullmatch if full else regex.search

    def reward(prompts, completions, **_) -> list[float]:
        return [float(match(completion_text(c).strip()) is not None) for c in completions]

    reward.__name__ = name
    return reward


boxed_format = format_reward(r"\\boxed\{.+\}", "boxed_format")
answer_tag_format = format_reward(r"<answer>.+?</answer>", "answer_tag_format")
number_only_format = format_reward(NUMBER + r"\.?", "number_only_format", full=True)
code_block_format = format_reward(r"```(?:python|py)?\n.+?```", "code_block_format")
