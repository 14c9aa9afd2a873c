"""One-digit arithmetic from reasoning-gym, offline: the embedded default task."""

from __future__ import annotations

from .procedural import ReasoningGym


class Arithmetic(ReasoningGym):
    def __init__(self, operators: str = "+-*", digits: int = 1, terms: int = 2,
                 instruction: str = "Answer with just the number, nothing else.",
                 system_prompt: str = "Answer briefly."):  # shorter than the model's default: fewer tokens
        config = dict(min_terms=terms, max_terms=terms, min_digits=digits, max_digits=digits,
                      operators=tuple(operators))
        super().__init__("basic_arithmetic", config, instruction, "last_number", system_prompt)
        self.name = "arithmetic"

    def split_key(self, entry: dict) -> str:
        return entry["metadata"]["expression"]
