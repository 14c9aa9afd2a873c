"""SVF (Transformer²): each target W = U diag(s) Vᵀ, decomposed once in fp32; only z trains, W' = U diag(s ⊙ z) Vᵀ."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from svf_rl.base_model import cache_root
from svf_rl.policies.base import check_args
from svf_rl.policies.svf_layer import (
    apply_expert,
    apply_svf,
    load_z,
    policy_step,
    reference_mode,
    set_weight_cache,
    svf_layers,
    z_vectors,
)


@dataclass
class SVFArgs:
    """forward_strategy and weight_cache stay top-level keys (they predate policies)."""


class SVFPolicy:
    name = "svf"
    artefact = "expert.safetensors"
    starts_at_base = True
    checkpoint_key = "z"
    DEFAULT_LR = {"svf": 2e-3}  # chosen on validation for the embedded default (benchmarks/RESULTS.md, Table 1)

    def __init__(self, config):
        check_args("svf", SVFArgs, config.policy_args)
        self.targets, self.strategy, self.cache = config.targets, config.forward_strategy, config.weight_cache
        self.model, self.layers = None, {}

    def attach(self, model, prompts=(), progress: bool = False) -> None:
        self.model = model
        apply_svf(model, self.targets, self.strategy, cache_root() / "svd", progress=progress)
        set_weight_cache(model, self.cache)
        self.layers = svf_layers(model)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [layer.z for layer in self.layers.values()]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        return [{"params": self.parameters(), "lr": lr, "weight_decay": weight_decay, "centre": 1.0}]

    def optimizer(self, optimizer_class, lr: float, weight_decay: float, **kwargs):
        return optimizer_class(self.param_groups(lr, weight_decay), **kwargs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return z_vectors(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_z(self.model, state)

    def reference(self):
        return reference_mode(self.model)

    def step(self, tokens: int, gather_per_step: bool, loss_scale: float = 1.0, sequences: int = 0,
             unpadded: int = 0):
        """Layers that compose W' do it once per step (W' the rollouts composed already) unless the backend
        needs each backward to reach z itself."""
        return policy_step(self.model, tokens, gather_per_step)

    def sequences(self, completions: list):
        return contextlib.nullcontext()  # nothing kept per sequence

    def regulariser(self) -> None:
        return None

    def after_step(self, step: int) -> None:
        pass

    def engine_weights(self):
        for name, layer in self.layers.items():
            yield f"{name}.weight", layer.weight_for_inference()

    def server_setup(self) -> dict:
        return {"policy": "svf", "names": list(self.layers)}

    def server_update(self) -> dict[str, torch.Tensor]:
        return z_vectors(self.model)

    def metrics(self) -> dict[str, float]:
        deviation = torch.cat([(z.detach() - 1).abs() for z in self.parameters()])
        return {"z_dev_mean": deviation.mean().item(), "z_dev_max": deviation.max().item()}

    def progress(self, metrics: dict) -> str:
        return f"|z-1| {metrics['z_dev_mean']:.1e}"

    def save(self, path: Path, record: dict, scores: dict) -> Path:
        from svf_rl.inference.expert import Expert, save_expert

        return save_expert(Expert(z_vectors(self.model), record["model"], record["fingerprint"], self.targets,
                                  record["task"], record["config"], scores), path)

    def load(self, path: Path, fingerprint: str) -> None:
        from svf_rl.inference.expert import load_expert

        apply_expert(self.model, load_expert(path), fingerprint)

    def shard(self) -> None:
        for layer in self.layers.values():
            layer.sharded = True

    @property
    def sharded(self) -> bool:
        return any(layer.sharded for layer in self.layers.values())
