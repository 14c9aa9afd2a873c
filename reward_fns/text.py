"""Getting the text out of a completion and the answer out of the text."""

from __future__ import annotations

import re

NUMBER = r"-?\d[\d,]*(?:\.\d+)?"  # with thousands separators
_NUMBER = re.compile(NUMBER)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def completion_text(completion) -> str:
    """Plain text of a completion, whether a string or TRL's conversational [{"role", "content"}] form."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def last_number(text: str) -> str | None:
    """The last number in the text, thousands separators removed ("1,000" is 1000, not 0)."""
    tagged = _ANSWER_TAG.findall(text)
    matches = _NUMBER.findall(tagged[-1] if tagged else text)
    if not matches:
        return None
    number = matches[-1].replace(",", "").rstrip(".")
    return number[:-2] if number.endswith(".0") else number


def answer_or_last_line(text: str) -> str | None:
    """The last <answer>...</answer>, else the last non-empty line: reasoning-gym's answer convention."""
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None
