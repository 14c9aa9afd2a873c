"""Multiple-choice answers: the chosen letter, however the model phrases it."""

from __future__ import annotations

import re

from svf_rl.rewards import first_label

from .text import completion_text

_PATTERNS = [  # most explicit first
    r"\\boxed\{\s*\(?([{L}])\)?\s*\}",
    r"answer\s*(?:is|:)?\s*(?:option\s*)?[:\s]*\(?([{L}])\)?(?![\w])",
    r"^\s*\(?([{L}])\)?\s*[.:)]?\s*$",
    r"\(([{L}])\)",
    r"(?<![\w'])([{L}])(?![\w'])",
]


def choice_letter(text: str, letters: str = "ABCDE") -> str | None:
    """The answer letter: from a box, "the answer is (X)", a line of its own, "(X)", or the last bare letter."""
    for pattern in _PATTERNS:
        regex = re.compile(pattern.replace("{L}", letters), re.IGNORECASE * ("answer" in pattern) | re.MULTILINE)
        found = regex.findall(text)
        if found:
            return found[-1].upper()
    return None


def choice_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the chosen letter is the row's `answer` letter."""
    letters = "".join(sorted({*"ABCDE", *(str(a).upper() for a in answer)}))
    return [float(choice_letter(completion_text(c), letters) == str(a).upper())
            for c, a in zip(completions, answer, strict=True)]


def label_reward(prompts, completions, label, labels, **_) -> list[float]:
    """1.0 when the first of the row's `labels` named in the completion is its `label` (case-insensitive)."""
    return [float(first_label(completion_text(c), options) == gold)
            for c, gold, options in zip(completions, label, labels, strict=True)]

