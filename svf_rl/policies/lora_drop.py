"""LoRA-drop (Zhou et al., 2024): LoRA on the layers whose adapter output moved most in a short LoRA run.

A layer's importance is the mean of ‖s·B A x‖² over the tokens of training prompts, with A and B from the probe
run (`probe`: the adapter directory a short `policy=lora` run wrote) and x the layer's input in the base model.
The layers are taken in order of importance until they hold `keep` of the total; a fresh LoRA trains on those
alone. (The paper also gives the dropped layers one shared LoRA; here they keep the base weight.)

Cost: the probe run, and one forward over the prompts when it attaches; then LoRA's on fewer layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from svf_rl.policies.base import PolicyError, check_args
from svf_rl.policies.peft import DEFAULT_LR, LoraArgs, PeftPolicy, is_adapter_dir
from svf_rl.targets import find_targets


@dataclass
class LoraDropArgs(LoraArgs):
    probe: str = ""  # the adapter directory of a short policy=lora run on the same model and targets
    keep: float = 0.9  # share of the total importance the kept layers hold (the paper's threshold)

    def check(self):
        if not 0 < self.keep <= 1:
            return f"keep must be in (0, 1], got {self.keep}"
        if not self.probe:
            return "needs policy_args.probe: the adapter directory of a short policy=lora run (its adapter/)"
        if not is_adapter_dir(self.probe):
            return f"policy_args.probe={self.probe!r} is not a PEFT adapter directory (no adapter_config.json)"
        return super().check()


class LoraDropPolicy(PeftPolicy):
    DEFAULT_LR = {**DEFAULT_LR, "lora_drop": DEFAULT_LR["lora"]}

    def __init__(self, config):
        import dataclasses

        self.drop = check_args("lora_drop", LoraDropArgs, config.policy_args)
        lora = {k: v for k, v in config.policy_args.items() if k not in ("probe", "keep")}
        super().__init__(dataclasses.replace(config, policy="lora", policy_args=lora), kind="lora", name="lora_drop")

    def attach(self, model, prompts=(), progress: bool = False) -> None:
        importance = layer_importance(model, find_targets(model, self.targets), Path(self.drop.probe), prompts)
        self.importance = importance
        ranked = sorted(importance, key=importance.get, reverse=True)
        total, kept, held = sum(importance.values()) or 1.0, [], 0.0
        for name in ranked:
            kept.append(name)
            held += importance[name] / total
            if held >= self.drop.keep:
                break
        self.attach_to(model, kept)

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "kept_layers": len(self.layers)}


@torch.no_grad()
def layer_importance(model, names: list[str], probe: Path, prompts) -> dict[str, float]:
    """Mean ‖s·B A x‖² per token for each target, with the probe adapter's A and B and the base model's inputs."""
    from safetensors.torch import load_file

    config = json.loads((probe / "adapter_config.json").read_text())
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    state = load_file(probe / "adapter_model.safetensors")
    factors = {}
    for name in names:
        keys = [k for k in state if k.endswith(f"{name}.lora_A.weight")]
        if not keys:
            raise PolicyError(f"probe adapter {probe} has no LoRA for {name}; probe with the same model and targets")
        factors[name] = state[keys[0]].float(), state[keys[0].replace("lora_A", "lora_B")].float()
    if not prompts:
        raise PolicyError("lora_drop needs prompts to measure its layers on")
    sums = dict.fromkeys(names, 0.0)
    tokens = 0

    def hook(name):
        def measure(module, args, out):
            A, B = factors[name]
            moved = (args[0].float() @ A.to(args[0].device).T) @ B.to(args[0].device).T * scale
            sums[name] += moved.pow(2).sum().item()
        return measure

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        device = next(model.parameters()).device
        for ids in prompts:
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            tokens += len(ids)
    finally:
        for handle in handles:
            handle.remove()
    return {n: v / tokens for n, v in sums.items()}
