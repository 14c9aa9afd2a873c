"""Experts on a live model, as PEFT handles adapters: load one or several, switch, mix, use one for a block,
and unload back to the plain model.

    import svf_rl
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    svf = svf_rl.from_pretrained(model, "runs/arith/expert.safetensors")  # loaded and active
    svf.load_expert("runs/gcd/expert.safetensors")                         # named "gcd" after its run
    svf.set_expert("gcd")                                                  # model.generate(...) uses it
    with svf.expert("arith"):                                              # for this block only
        ...
    svf.mix({"arith": 0.5, "gcd": 0.5})                                    # z' = 1 + Σ αₖ (zₖ − 1)
    svf.set_expert(None)                                                   # the base model's own weights
    model = svf.unload()                                                   # plain nn.Linear layers again

The model keeps W beside each layer's factors (one more matrix per adapted layer), so z = 1 is the base model
exactly, in any dtype, and unload gives back the very weights it was loaded with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from svf_rl.inference.compose import check_mixing, mix_vectors
from svf_rl.inference.expert import Expert, ExpertError, load_expert
from svf_rl.policies.svf_layer import load_z, svf_layers, z_vectors


class SVFModel:
    """A Hugging Face model with SVF layers and named experts; the model itself is changed in place."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.experts: dict[str, Expert] = {}  # in z form, checked against the model
        self.active: str | dict[str, float] | None = None  # an expert's name, a mix's weights, or the base

    def load_expert(self, expert: str | Path | Expert, name: str | None = None, activate: bool = False) -> str:
        """Load an expert file (or Expert) under `name` (default: its run directory or file stem); returns the
        name. It is checked against the model (base fingerprint, targets, sizes) in one line."""
        from svf_rl.inference.adapt import expert_name
        from svf_rl.inference.evaluate import experts_on_model

        if name is None:
            name = expert_name(str(expert)) if not isinstance(expert, Expert) else (expert.task or "expert")
        if name in self.experts:
            raise ExpertError(f"an expert named {name!r} is loaded already; delete_expert it or give another name")
        loaded = expert if isinstance(expert, Expert) else load_expert(expert)
        [self.experts[name]] = experts_on_model(self.model, [loaded], [name])
        if activate:
            self.set_expert(name)
        return name

    def delete_expert(self, name: str) -> None:
        self._known(name)
        del self.experts[name]
        if self.active == name or (isinstance(self.active, dict) and name in self.active):
            self.set_expert(None)

    def set_expert(self, name: str | None) -> None:
        """Make `name` the active expert; None: the base model (z = 1)."""
        if name is None:
            load_z(self.model, {n: torch.ones_like(z) for n, z in z_vectors(self.model).items()})
        else:
            load_z(self.model, self._known(name).vectors)
        self.active = name

    def mix(self, weights: dict[str, float], mixing: str = "anchored") -> None:
        """Activate a mix of loaded experts: anchored z' = 1 + Σₖ αₖ (zₖ − 1) (α = 0: the base model), or
        Transformer²'s sum z' = Σₖ αₖ zₖ."""
        check_mixing(mixing)
        if not weights:
            raise ExpertError("mix needs at least one expert's weight")
        experts = [self._known(name) for name in weights]
        alpha = [float(a) for a in weights.values()]
        load_z(self.model, {m: mix_vectors([e.vectors[m].float() for e in experts], alpha, mixing)
                            for m in experts[0].vectors})
        self.active = dict(weights)

    @contextlib.contextmanager
    def expert(self, name: str | None) -> Iterator[SVFModel]:
        """Use `name` (None: the base model) inside the block; whatever was active comes back after it."""
        saved, active = z_vectors(self.model), self.active
        self.set_expert(name)
        try:
            yield self
        finally:
            load_z(self.model, saved)
            self.active = active

    def unload(self) -> nn.Module:
        """Put plain nn.Linear layers with the base weights back, drop the experts, and return the model."""
        for name, layer in svf_layers(self.model).items():
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device=layer.base.device, dtype=layer.base.dtype)
            with torch.no_grad():
                linear.weight.copy_(layer.base)
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, linear)
        self.experts.clear()
        self.active = None
        return self.model

    def _known(self, name: str) -> Expert:
        if name not in self.experts:
            raise ExpertError(f"no expert named {name!r} is loaded (loaded: {', '.join(self.experts) or 'none'})")
        return self.experts[name]


def from_pretrained(model: nn.Module, expert: str | Path | Expert | None = None, name: str | None = None) -> SVFModel:
    """`model` (a loaded Hugging Face causal LM) with the expert loaded and active, ready to generate."""
    svf = SVFModel(model)
    if expert is not None:
        svf.load_expert(expert, name, activate=True)
    return svf
