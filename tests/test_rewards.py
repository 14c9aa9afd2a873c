import math

import pytest
import torch

from svf_rl.rewards import score_completions


def exact(prompts, completions, answer, **_):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def short(prompts, completions, **_):
    return [1.0 if len(c) < 3 else 0.0 for c in completions]


def test_weighted_sum_of_reward_functions():
    total, per, errors = score_completions([exact, short], [1.0, 0.5], ["p", "p"], ["4", "five"],
                                           {"answer": ["4", "5"]})
    assert torch.allclose(total, torch.tensor([1.5, 0.0]))
    assert per == {"exact": [1.0, 0.0], "short": [1.0, 0.0]} and errors == {}


def test_reward_that_raises_is_logged_and_scores_nothing(caplog):
    def broken(prompts, completions, **_):
        raise KeyError("oops")

    total, per, errors = score_completions([broken, short], [1.0, 1.0], ["p"], ["ok"], {}, task="demo")
    assert per["broken"] == [None] and total.tolist() == [1.0]
    assert errors == {"broken": "KeyError: 'oops'"}
    assert "task demo: reward function broken raised KeyError" in caplog.text


def test_nan_and_none_rewards_count_as_no_score():
    def odd(prompts, completions, **_):
        return [math.nan, None, 1.0]

    total, per, _ = score_completions([odd], [1.0], ["p"] * 3, ["a", "b", "c"], {})
    assert per["odd"] == [None, None, 1.0] and total.tolist() == [0.0, 0.0, 1.0]


def test_wrong_number_of_rewards_names_the_function():
    def too_few(prompts, completions, **_):
        return [1.0]

    with pytest.raises(ValueError, match="too_few returned 1 values for 2"):
        score_completions([too_few], [1.0], ["p", "p"], ["a", "b"], {})
