"""Math answers checked for equivalence with math-verify (boxed, LaTeX, fractions, percentages)."""

from __future__ import annotations

import threading

from math_verify import parse, verify

from .text import completion_text, last_number


def gold_answer(text: str) -> str:
    """The gold answer inside a reference solution: GSM8K's "#### 1,000" gives "1000"; else the text itself."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    return text.strip()


def _as_latex(answer: str) -> str:
    # math-verify reads bare LaTeX gold ("\frac{1}{2}") only inside math delimiters or a box
    return answer if "$" in answer or "\\boxed" in answer else f"${answer}$"


def _same_number(a: str | None, b: str | None) -> bool:
    try:
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    except ValueError:
        return False


def is_equivalent(completion: str, gold: str) -> bool:
    """True when the completion's final answer equals the gold answer, symbolically or as a plain number."""
    gold = gold_answer(gold)
    # math-verify's timeouts use SIGALRM, which exists only in the main thread
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(_as_latex(gold), parsing_timeout=timeout)
    answer_parsed = parse(completion, parsing_timeout=timeout)
    if gold_parsed and answer_parsed and verify(gold_parsed, answer_parsed, timeout_seconds=timeout):
        return True
    return _same_number(last_number(completion), last_number(gold))  # "1,000." or "$1000" with no LaTeX


def math_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 when a completion's answer is equivalent to the row's `answer`, else 0.0."""
    return [float(is_equivalent(completion_text(c), str(a))) for c, a in zip(completions, answer, strict=True)]


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces allowed), e.g. a MATH reference solution's answer."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i]
    return None
