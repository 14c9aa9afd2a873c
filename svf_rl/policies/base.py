"""The policy interface the RL loop calls (the anchors: cleanrl's Agent, torchtune's adapter_params, nanoGPT's
configure_optimizers), and what every policy shares."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn


class PolicyError(ValueError):
    """A policy or its arguments cannot be used as asked; the message says why in one line."""


class Policy(typing.Protocol):
    name: str
    artefact: str  # what a run saves, in its output directory: a file or a directory name
    starts_at_base: bool  # its starting parameters are the base model (else the base is scored as π_ref)
    DEFAULT_LR: dict[str, float]  # policy name → a rate that learns on the embedded default, with its source

    def attach(self, model: nn.Module, prompts: list[list[int]], progress: bool = False) -> None:
        """Adapt `model` in place; afterwards only `parameters()` require a gradient. `prompts`: a sample of
        training prompts, for policies that choose their layers from data."""

    def parameters(self) -> list[nn.Parameter]:
        """What trains (and what the update reduces over ranks and clips)."""

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimiser groups; a group's `centre` is the value its weight decay pulls towards (the base model)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable state a checkpoint holds."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def reference(self) -> AbstractContextManager:
        """Forwards inside run as π_ref, the base model, without a second copy of it."""

    def step(self, tokens: int, gather_per_step: bool, loss_scale: float = 1.0, sequences: int = 0,
             unpadded: int = 0) -> AbstractContextManager:
        """The scope of one optimiser step's forwards and backwards over `tokens` positions (`unpadded` of them
        not padding) of `sequences` completions (this rank's). `loss_scale`: what the
        backend multiplies the loss by before its backward (fp16's loss scale; DeepSpeed's rank count, as it
        averages): a gradient the policy adds itself must be multiplied alike."""

    def sequences(self, completions: list) -> AbstractContextManager:
        """Forwards inside run these completions (engines.hf.Completion): for statistics per source task
        (`source`) and against how they were sampled (`routes`)."""

    def regulariser(self) -> torch.Tensor | None:
        """A penalty on the parameters themselves, added once to each step's loss (AdaLoRA's orthogonality)."""

    def after_step(self, step: int) -> None:
        """Called once the update is applied, gradients still present (AdaLoRA's rank allocator)."""

    def engine_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, weight) of every adapted matrix at the current parameters: what a colocated
        engine loads after a step."""

    def server_setup(self) -> dict:
        """What a vLLM server worker needs once to compose the adapted weights itself."""

    def server_update(self) -> dict[str, torch.Tensor]:
        """What it needs after each step: the trainable state alone."""

    def metrics(self) -> dict[str, float]: ...

    def save(self, path: Path, record: dict, scores: dict) -> Path:
        """Write the artefact; `record`: base model, fingerprint, targets, task, config."""

    def load(self, path: Path, fingerprint: str) -> None:
        """Load a saved artefact of this run into the attached model."""

    def shard(self) -> None:
        """DeepSpeed ZeRO-3 partitions the frozen weights: they exist whole only inside forwards."""


def check_args(policy: str, schema: type, args: dict):
    """The policy's arguments as its dataclass, every wrong key, type or value refused in one line."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    values = {}
    for key, value in args.items():
        if key not in fields:
            raise PolicyError(f"policy {policy!r} has no argument {key!r}; its arguments: "
                              f"{', '.join(f'{k}={f.default!r}' for k, f in fields.items()) or 'none'}")
        kind = hints[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            raise PolicyError(f"policy_args.{key} of policy {policy!r} must be {kind.__name__}, got {value!r}")
        values[key] = value
    parsed = schema(**values)
    problem = parsed.check() if hasattr(parsed, "check") else None
    if problem:
        raise PolicyError(f"policy {policy!r}: {problem}")
    return parsed


@torch.no_grad()
def linear_map(layer: nn.Module, chunk: int = 1024) -> torch.Tensor:
    """The [out, in] weight of a linear layer, adapter included, read off its own forward on the identity with
    the bias set aside: exactly what the layer computes, whatever its adapter (LoRA, DoRA, VeRA, IA3, ...),
    and nothing of the model is merged, so nothing drifts."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    weight = base.weight
    bias, base.bias = base.bias, None
    try:
        columns = []
        for first in range(0, base.in_features, chunk):
            rows = min(chunk, base.in_features - first)
            eye = torch.zeros(rows, base.in_features, device=weight.device, dtype=weight.dtype)
            eye[:, first:first + rows].fill_diagonal_(1)
            columns.append(layer(eye).T)
        return torch.cat(columns, 1)
    finally:
        base.bias = bias
