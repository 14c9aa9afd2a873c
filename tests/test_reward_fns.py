"""The built-in reward functions, on the answer forms models actually write."""

import pytest
import reasoning_gym

from reward_fns.format import answer_tag_format, boxed_format, code_block_format, number_only_format
from reward_fns.math import gold_answer, is_equivalent, last_boxed, math_reward
from reward_fns.reasoning import choice_letter, choice_reward, label_reward
from reward_fns.reasoning_gym import score_answer_reward
from reward_fns.text import answer_or_last_line, last_number


@pytest.mark.parametrize("completion, gold", [
    ("So she pays 1,000 dollars. #### 1,000", "She pays 4 * 250 = 1000.\n#### 1,000"),
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5"),
    ("Therefore $x = \\dfrac{3}{4}$.", "\\frac{3}{4}"),
    ("It rises by 25%.", "25\\%"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("The total is $1,234.", "#### 1234"),
    ("72", "#### 72"),
])
def test_math_answers_that_are_equivalent(completion, gold):
    assert is_equivalent(completion, gold)


@pytest.mark.parametrize("completion, gold", [
    ("The answer is 1.", "#### 1,000"),
    ("The answer is 0.", "#### 1,000"),  # what reading "1,000" as its first digits would accept
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("I cannot solve this.", "#### 7"),
])
def test_math_answers_that_differ(completion, gold):
    assert not is_equivalent(completion, gold)


def test_math_reward_takes_trl_conversational_completions():
    completions = [[{"role": "assistant", "content": "\\boxed{12}"}], [{"role": "assistant", "content": "13"}]]
    assert math_reward(None, completions, answer=["#### 12", "#### 12"]) == [1.0, 0.0]
    assert gold_answer("work\n#### 1,000") == "1000"
    assert last_boxed("a \\boxed{\\frac{1}{2}} then \\boxed{x^{2}}") == "x^{2}"


@pytest.mark.parametrize("text, letter", [
    ("The answer is (B).", "B"), ("\\boxed{C}", "C"), ("D", "D"), ("I pick (A) because it is right.", "A"),
    ("Answer: e", "E"), ("Option C is wrong, so the answer is B", "B"), ("No idea.", None),
])
def test_choice_letter(text, letter):
    assert choice_letter(text) == letter


def test_choice_and_label_rewards():
    assert choice_reward(None, ["The answer is (C)", "(A)"], answer=["C", "C"]) == [1.0, 0.0]
    labels = [["math", "code", "reasoning"]] * 3
    assert label_reward(None, ["This is Code.", "math, not code", "poetry"], label=["code", "code", "code"],
                        labels=labels) == [1.0, 0.0, 0.0]


def test_format_rewards():
    assert boxed_format(None, ["so \\boxed{3}", "3"]) == [1.0, 0.0]
    assert answer_tag_format(None, ["<answer>3</answer>", "<answer></answer>"]) == [1.0, 0.0]
    assert number_only_format(None, ["1,000", "It is 3"]) == [1.0, 0.0]
    assert code_block_format(None, ["```python\nx = 1\n```", "x = 1"]) == [1.0, 0.0]


def test_answer_extraction():
    assert last_number("I think 3, no, 1,000.") == "1000"
    assert last_number("<answer>-4</answer> and 5") == "-4"
    assert answer_or_last_line("thinking\n<answer> Yes </answer>") == "Yes"
    assert answer_or_last_line("thinking\nNo\n") == "No"


def test_any_reasoning_gym_verifier_becomes_a_reward():
    data = reasoning_gym.create_dataset("syllogism", size=4, seed=1)
    reward = score_answer_reward(data, answer_or_last_line)
    entries = list(data)
    right = [f"<answer>{e['answer']}</answer>" for e in entries]
    wrong = ["<answer>maybe</answer>"] * len(entries)
    assert reward(None, right, entry=entries) == [1.0] * 4
    assert max(reward(None, wrong, entry=entries)) < 1.0
