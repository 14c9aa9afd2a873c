"""z of two runs that do the same arithmetic in another order (ranks, threads, a resume) agree element by element
to a bound derived from the arithmetic.

Such runs train with `optimizer=sgd`, whose step is linear in the gradient. Adam's is not: it divides each
element by its own running magnitude, so an element whose gradient is mostly rounding can move by a whole lr
either way, and no tolerance derived from the gradient norm holds for it.

With momentum μ and clipped gradients ĝ_s, z after n steps is z_0 − lr·Σ_s ĝ_s·(1 + μ + … + μ^{n−s}). Clipping to
c is a projection onto a ball (non-expansive) and, outside the ball, a radial one: ‖Δĝ_s‖ ≤ 2ρ·min(‖g_s‖, c) for
a relative change ρ of the gradient vector. So the whole of z (every module's vector, concatenated) differs by
at most ρ·lr·Σ_s 2·min(‖g_s‖, c)·(1 − μ^{n−s+1})/(1 − μ) in 2-norm, with ‖g_s‖ the logged norm (0 for a skipped
step); and each element by no more than the whole. The check is on the 2-norm: sound for every element, and
√size tighter than a per-element tolerance.

fp32 sums of the same per-token terms in another order differ by about 1e-6..1e-4 of the norm. ρ = 1e-3 leaves
10× for that, and stays far below a real defect: a missing reduce or a lost micro-batch changes the gradient by
tens of percent, and a lost optimiser state by the momentum itself.
"""

import math

import torch

GRADIENT_RTOL = 1e-3
EQUALITY = dict(optimizer="sgd", momentum=0.5, lr_schedule="constant", warmup_steps=0)  # lr: the test's


def z_bound(grad_norms: list[float], lr: float, max_grad_norm: float, momentum: float) -> float:
    """The largest 2-norm difference that rounding can make to z after these steps."""
    n = len(grad_norms)
    total = 0.0
    for s, norm in enumerate(grad_norms):
        if math.isfinite(norm):
            total += 2 * min(norm, max_grad_norm) * (1 - momentum ** (n - s)) / (1 - momentum)
    return GRADIENT_RTOL * lr * total


def assert_same_z(got: dict, want: dict, steps: list[dict], config, start: dict | None = None) -> None:
    """`steps`: the reference run's metric records up to the compared step. The same bound holds for any policy's
    parameters (`start`: where they began, for the check that they moved; z = 1 by default)."""
    assert config.optimizer == "sgd" and config.lr_schedule == "constant", "the bound holds for constant-lr SGD"
    assert got.keys() == want.keys()
    bound = z_bound([s["grad_norm"] for s in steps], config.lr, config.max_grad_norm, config.momentum)
    start = start or {name: torch.ones_like(z) for name, z in want.items()}
    moved = torch.cat([(want[name] - start[name]).flatten() for name in start]).norm().item()
    assert moved > 30 * bound, f"z moved {moved:.2e}, too little to tell a defect from the bound {bound:.2e}"
    difference = torch.cat([(got[name] - want[name]).flatten() for name in want]).norm().item()
    assert difference <= bound, f"z differs by {difference:.2e} in 2-norm; rounding allows {bound:.2e}"
