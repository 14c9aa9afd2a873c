"""LoRA experts routed per token, trained from scratch: HydraLoRA and MoLoRA.

    hydralora  one A shared by K B's (Tian et al., NeurIPS 2024): W x + (α/r) Σₖ gₖ(x) Bₖ A x
    molora     K LoRA experts (Zadouri et al., 2023, MoLoRA): W x + (α/r) Σₖ gₖ(x) Bₖ Aₖ x

A router per adapted layer gives each token its gates (routing.py), starting random so that the experts can
differ. A starts as LoRA's (Kaiming-uniform), every B at 0, so the run starts at the base model, which is also
π_ref (the experts switched off). Both run as two
thin matmuls over the stacked experts: A x for all of them at once, then [B₁ … B_K] applied to the gated
(g ⊗ Ax).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from svf_rl.policies.base import check_args
from svf_rl.policies.routing import RoutedPolicy, Router, keep_fp32, keep_routes, watch_positions
from svf_rl.targets import find_targets


@dataclass
class RoutedLoraArgs:
    experts: int = 4
    rank: int = 8  # of each expert (HydraLoRA's A is shared, so it is the rank of all of them)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    top_k: int = 0  # 0: every expert; k: the k largest gates, the others 0
    balance: float = 0.0  # coefficient of the load-balancing term (routing.py)

    def check(self):
        if self.experts < 2 or self.rank < 1 or self.alpha <= 0:
            return (f"need experts >= 2, rank >= 1 and alpha > 0, got experts={self.experts}, rank={self.rank}, "
                    f"alpha={self.alpha}")
        if not 0 <= self.top_k <= self.experts:
            return f"top_k must be 0 (all) or at most experts={self.experts}"
        if not 0 <= self.balance < float("inf"):
            return f"balance must be >= 0 and finite, got {self.balance}"


class RoutedLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, args: RoutedLoraArgs, shared_a: bool):
        super().__init__()
        self.base, self.scale, self.enabled = base, args.alpha / args.rank, True
        k, r = args.experts, args.rank
        device = base.weight.device
        A = torch.empty((1 if shared_a else k) * r, base.in_features, device=device)
        for block in A.split(r):
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))  # as LoRA's A (PEFT's default)
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(torch.zeros(base.out_features, k * r, device=device))  # [B₁ … B_K]
        self.router = Router(base.in_features, k, args.top_k, args.balance, random_init=True).to(device)
        self.experts, self.rank = k, r

    @property
    def weight(self):  # what code that reads a linear layer's weight (dtype, device) sees
        return self.base.weight

    def _apply(self, fn, recurse=True):
        """Adapter tensors stay fp32 whatever the model's dtype."""
        super()._apply(fn, recurse)
        keep_fp32([self.A, self.B, *self.router.parameters()])
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        gates = self.router(x)  # [..., K]
        h = F.linear(x.float(), self.A)  # [..., r] shared, or [..., K·r]
        h = h.unflatten(-1, (-1, self.rank)) * gates[..., None]  # broadcasts a shared A over the K experts
        return out + (self.scale * F.linear(h.flatten(-2), self.B)).to(out.dtype)


class RoutedLoraPolicy(RoutedPolicy):
    DEFAULT_LR = {"hydralora": 5e-4, "molora": 5e-4}  # LoRA's rate on the embedded default

    def __init__(self, config):
        super().__init__(config)
        self.name = config.policy
        self.args = check_args(self.name, RoutedLoraArgs, config.policy_args)
        self.labels = [f"expert{k}" for k in range(self.args.experts)]

    def attach(self, model, prompts=(), progress: bool = False) -> None:
        for param in model.parameters():
            param.requires_grad_(False)
        for name in find_targets(model, self.targets):
            layer = RoutedLoraLinear(model.get_submodule(name), self.args, shared_a=self.name == "hydralora")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        self.model = model
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, RoutedLoraLinear)}
        watch_positions(model)
        model.keep_routes = functools.partial(keep_routes, model)  # the HF engine keeps each sampled token's routes

    @contextlib.contextmanager
    def reference(self):
        for layer in self.layers.values():
            layer.enabled = False
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.enabled = True

    def memory(self, targets: list[tuple[str, int, int]], b: int) -> dict:
        a = self.args
        k_a = 1 if self.name == "hydralora" else a.experts
        trainable = sum(k_a * a.rank * i + a.experts * a.rank * o + a.experts * (i + 1) for _, o, i in targets)
        return {"trainable": trainable, "frozen_bytes": 0, "rank": k_a * a.rank}
