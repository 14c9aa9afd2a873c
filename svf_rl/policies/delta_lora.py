"""Delta-LoRA (Zi et al., 2023): LoRA whose base weight also moves, by λ times each step's change of the scaled
BA, with no gradient and no optimiser state for W.

Starting from B = 0, the sum of those moves is W_t = W_0 + λ·s·B_tA_t, so the layer computes W_0 + (1 + λ)·s·B_tA_t
while its gradient reaches A and B through s·BA alone. That is applied in the forward as a stop-gradient term,
s·BAx + λ·(s·BAx).detach(): the same numbers as writing W in place, without W's rounding in 16 bits and without
a second W per layer. The paper's warm-up before W moves (K steps) and its dropout on the LoRA path are left out.

Cost: LoRA's. Sync and the saved adapter are a LoRA whose alpha is (1 + λ)·alpha; π_ref (the adapter off) is W_0.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from svf_rl.policies.base import check_args
from svf_rl.policies.peft import DEFAULT_LR, LoraArgs, PeftPolicy


@dataclass
class DeltaLoraArgs(LoraArgs):
    lam: float = 2.0  # λ, the update ratio of W (the paper's 2)

    def check(self):
        return super().check() or (f"lam must be >= 0, got {self.lam}" if self.lam < 0 else None)


class DeltaLoraPolicy(PeftPolicy):
    DEFAULT_LR = {**DEFAULT_LR, "delta_lora": DEFAULT_LR["lora"] / 3}  # LoRA's effective step, for λ = 2

    def __init__(self, config):
        import dataclasses

        self.delta = check_args("delta_lora", DeltaLoraArgs, config.policy_args)
        lora = {k: v for k, v in config.policy_args.items() if k != "lam"}
        super().__init__(dataclasses.replace(config, policy="lora", policy_args=lora), kind="lora", name="delta_lora")

    def attach_to(self, model, names: list[str]) -> None:
        super().attach_to(model, names)
        lam = self.delta.lam
        for layer in self.layers.values():
            layer.lora_B["default"].register_forward_hook(lambda module, args, out: out + lam * out.detach())

    @contextlib.contextmanager
    def saved_config(self, base_model: str):
        with super().saved_config(base_model) as config:
            alpha = config.lora_alpha
            config.lora_alpha = alpha * (1 + self.delta.lam)
            try:
                yield config
            finally:
                config.lora_alpha = alpha

