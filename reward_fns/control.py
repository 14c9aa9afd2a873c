"""Control rewards: what a run gains from them is not learning the task."""

from __future__ import annotations

import numpy as np


def coin_flip(prompts, completions, **columns) -> list[float]:
    """1 or 0 by a fair coin per completion, whatever it says ("Spurious Rewards", 2025: random rewards raise some
    models' scores). Train with `rewards=[reward_fns.control:coin_flip]`: held-out scores stay the task's, so the
    gain over the base model is what the recipe gives without any signal. The coins come from numpy's global
    generator, which `seed` seeds and checkpoints restore, so a run and its resumption flip the same ones."""
    return (np.random.random(len(completions)) < 0.5).astype(float).tolist()
