"""What the RL loop trains. A policy attaches to the base model and owns the rest: the trainable parameters
and their optimiser groups, the checkpoint state, the reference π_ref, the scope of one optimiser step, the
weights a rollout engine needs after a step, the saved artefact, its metrics and its memory count.

    svf      Transformer²'s singular-value fine-tuning: W' = U diag(s ⊙ z) Vᵀ, z trains (the default)
    lora     W' = W + (α/r)·BA (PEFT; `init=pissa` starts from the principal components)
    dora     LoRA with a trained magnitude per output row (PEFT)
    loraplus LoRA with B's learning rate `ratio`× A's (PEFT's LoRA+ optimiser)
    lorafa   LoRA with A frozen and B's gradient projected (PEFT's LoRA-FA optimiser)
    vera     one pair of frozen random matrices shared by all layers, two trained scale vectors per layer (PEFT)
    adalora  LoRA in SVD form whose ranks are re-allocated across layers during the run (PEFT)
    tinylora a few trained numbers per layer, projected through the frozen top singular vectors (PEFT)
    ia3      a trained scale per output (or input) feature (PEFT)
    delta_lora LoRA whose base weight also moves by each step's change of BA (svf-rl)
    lora_drop LoRA on the layers whose adapter output moved most in a short LoRA run (svf-rl)
    mixture  SVF experts mixed per token by a learned router: z(x) = 1 + Σₖ gₖ(x)(zₖ − 1) (svf-rl)
    hydralora one shared A, K B's, a router per layer (HydraLoRA; svf-rl)
    molora   K LoRA experts, a router per layer (MoLoRA; svf-rl)
"""

from __future__ import annotations

from svf_rl.policies.base import Policy, PolicyError, check_args

POLICIES = {
    "svf": "svf_rl.policies.svf:SVFPolicy",
    **{name: "svf_rl.policies.peft:PeftPolicy" for name in
       ("lora", "dora", "loraplus", "lorafa", "vera", "adalora", "tinylora", "ia3")},
    "delta_lora": "svf_rl.policies.delta_lora:DeltaLoraPolicy",
    "lora_drop": "svf_rl.policies.lora_drop:LoraDropPolicy",
    "mixture": "svf_rl.policies.mixture:MixturePolicy",
    "hydralora": "svf_rl.policies.routed_lora:RoutedLoraPolicy",
    "molora": "svf_rl.policies.routed_lora:RoutedLoraPolicy",
}


def policy_class(name: str) -> type:
    import importlib

    if name not in POLICIES:
        raise PolicyError(f"policy {name!r} is not one of {', '.join(POLICIES)}")
    module, _, attribute = POLICIES[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def default_lr(name: str) -> float:
    """The policy's own learning rate: one that learns on the embedded default."""
    return policy_class(name).DEFAULT_LR[name]


def make_policy(config) -> Policy:
    """The configured policy, its arguments checked (one line for a wrong one); nothing is attached yet."""
    return policy_class(config.policy)(config)


__all__ = ["POLICIES", "Policy", "PolicyError", "check_args", "default_lr", "make_policy", "policy_class"]
