"""Code rewards: run the completion against the row's tests inside the sandbox."""

from __future__ import annotations

import json
import re
import secrets

from .sandbox import Limits, run_many
from .text import completion_text

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)

# Runs the solution, then each test in its namespace, and reports with a nonce the solution never sees
# (it comes on stdin, read before the solution runs), so printing a fake report or exiting early scores 0.
_HARNESS = r"""
import json, sys
def _report():
    nonce = sys.stdin.readline().strip()
    with open("tests.json") as f:
        tests = json.load(f)
    with open("solution.py") as f:
        solution = f.read()
    namespace, passed = {"__name__": "solution"}, 0
    try:
        exec(compile(solution, "solution.py", "exec"), namespace)
        for test in tests:
            try:
                exec(compile(test, "test.py", "exec"), namespace)
                passed += 1
            except BaseException:
                pass
    except BaseException:
        pass
    sys.__stdout__.write(f"\n{nonce} {passed} {len(tests)}\n")
    sys.__stdout__.flush()
_report()
"""


def extract_code(text: str) -> str:
    """The code in a completion: the first fenced block that defines something, else the first block, else all."""
    blocks = _FENCE.findall(text)
    if not blocks:
        return text
    return next((block for block in blocks if "def " in block or "class " in block), blocks[0])


def tests_passed(solutions: list[str], tests: list[list[str]], limits: Limits | None = None,
                 workers: int | None = None) -> list[tuple[int, int]]:
    """(passed, total) per solution, each run in its own sandbox, several at a time."""
    nonces = [secrets.token_hex(16) for _ in solutions]
    jobs = [{"program": _HARNESS, "stdin": nonce + "\n",
             "files": {"solution.py": solution, "tests.json": json.dumps(list(row_tests))}}
            for solution, row_tests, nonce in zip(solutions, tests, nonces, strict=True)]
    results = []
    for result, nonce, row_tests in zip(run_many(jobs, limits or Limits(), workers), nonces, tests, strict=True):
        reports = [line.split() for line in result.stdout.splitlines() if line.startswith(nonce)]
        passed = int(reports[-1][1]) if reports and not result.timed_out else 0
        results.append((passed, len(row_tests)))
    return results


def code_reward(mode: str = "all", limits: Limits | None = None, workers: int | None = None):
    """A reward over the `tests` column (a list of test snippets per row) and an optional `code_prefix`.

    mode "all" gives 1.0 when every test passes, "fraction" the share that pass. The solution is
    `code_prefix` (e.g. HumanEval's signature and docstring) followed by the completion's code.
    """
    if mode not in ("all", "fraction"):
        raise ValueError(f"code_reward mode must be 'all' or 'fraction', not {mode!r}")

    def code_tests(prompts, completions, tests, code_prefix=None, **_) -> list[float]:
        prefixes = code_prefix or [""] * len(completions)
        solutions = [prefix + extract_code(completion_text(c)) for prefix, c in zip(prefixes, completions, strict=True)]
        scores = []
        for passed, total in tests_passed(solutions, tests, limits, workers):
            scores.append(passed / max(total, 1) if mode == "fraction" else float(total > 0 and passed == total))
        return scores

    return code_tests
