"""Compose experts: z' = Σₖ αₖ zₖ, with one α per expert or one per expert and module."""

from __future__ import annotations

import hashlib

import torch

from .expert import PARAMETRISATION, Expert, ExpertError


def z_digest(expert: Expert) -> str:
    """Identity of an expert's vectors: SHA-256 of every module name and z value."""
    digest = hashlib.sha256()
    for name in sorted(expert.vectors):
        digest.update(name.encode())
        digest.update(expert.vectors[name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def check_composable(experts: list[Expert], names: list[str]) -> None:
    """One line if the experts cannot be mixed: another base model, other targets or other modules."""
    if not experts:
        raise ExpertError("nothing to compose: give at least one expert")
    for expert, name in zip(experts, names, strict=True):
        if expert.parametrisation != PARAMETRISATION:
            raise ExpertError(f"{name} holds {expert.parametrisation} vectors, whose z depends on the base model's "
                              f"singular values: import it with --as-z, or mix it in svf-rl eval or adapt, which "
                              f"convert it on the model")
    first = experts[0]
    for expert, name in zip(experts[1:], names[1:], strict=True):
        if expert.base_fingerprint != first.base_fingerprint:
            raise ExpertError(f"{name} was trained on another base model ({expert.base_model!r}, fingerprint "
                              f"{expert.base_fingerprint}) than {names[0]} ({first.base_model!r}, "
                              f"{first.base_fingerprint}); experts compose only on the same base")
        if expert.targets != first.targets or set(expert.vectors) != set(first.vectors):
            raise ExpertError(f"{name} adapts other matrices (targets {expert.targets!r}, {len(expert.vectors)} "
                              f"modules) than {names[0]} ({first.targets!r}, {len(first.vectors)}); experts "
                              f"compose only over the same targets")
        for module, z in expert.vectors.items():
            if z.shape != first.vectors[module].shape:
                raise ExpertError(f"{name}: z for {module!r} has shape {tuple(z.shape)}, {names[0]}'s "
                                  f"{tuple(first.vectors[module].shape)}")


def compose(experts: list[Expert], alpha: list[float] | dict[str, list[float]], names: list[str] | None = None
            ) -> Expert:
    """z' = Σₖ αₖ zₖ. `alpha`: one weight per expert, or {module: one weight per expert} covering every module
    (per-layer mixing, as Transformer²'s few-shot adaptation searches). The result records its parts, their
    digests and the weights."""
    names = names or [expert.task or f"expert {k}" for k, expert in enumerate(experts)]
    check_composable(experts, names)
    modules = list(experts[0].vectors)
    if isinstance(alpha, dict):
        missing = sorted(set(modules) - set(alpha))
        extra = sorted(set(alpha) - set(modules))
        if missing or extra:
            raise ExpertError(f"per-module alpha must name exactly the experts' {len(modules)} modules: "
                              f"{len(missing)} missing (e.g. {missing[:1]}), {len(extra)} unknown (e.g. {extra[:1]})")
        weights = {m: [float(a) for a in alpha[m]] for m in modules}
    else:
        weights = {m: [float(a) for a in alpha] for m in modules}
    for module, values in weights.items():
        if len(values) != len(experts):
            raise ExpertError(f"alpha for {module!r} has {len(values)} weights for {len(experts)} experts")
        if not all(torch.isfinite(torch.tensor(values))):
            raise ExpertError(f"alpha for {module!r} must be finite numbers, got {values}")
    vectors = {m: sum(a * expert.vectors[m].float() for a, expert in zip(weights[m], experts, strict=True))
               for m in modules}
    parts = [{"name": name, "task": expert.task, "z_sha256": z_digest(expert), "base_model": expert.base_model}
             for name, expert in zip(names, experts, strict=True)]
    composition = {"parts": parts, "alpha": alpha if isinstance(alpha, dict) else [float(a) for a in alpha]}
    first = experts[0]
    return Expert(vectors, first.base_model, first.base_fingerprint, first.targets,
                  task="+".join(expert.task or "?" for expert in experts), config={"composition": composition})
