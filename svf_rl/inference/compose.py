"""Compose experts, with one α per expert or one per expert and module:
- sum (Transformer²): z' = Σₖ αₖ zₖ; α → 0 drives every singular value to 0;
- anchored: z' = 1 + Σₖ αₖ (zₖ − 1), the base model plus each expert's change; α → 0 is the base model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from svf_rl.inference.expert import PARAMETRISATION, Expert, ExpertError, load_expert, save_expert
from svf_rl.inputs import check_finite, check_input_file, check_output


def z_digest(expert: Expert) -> str:
    """Identity of an expert's vectors: SHA-256 of every module name and z value."""
    digest = hashlib.sha256()
    for name in sorted(expert.vectors):
        digest.update(name.encode())
        digest.update(expert.vectors[name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def check_same_base(experts: list[Expert], names: list[str]) -> None:
    """One line unless the experts share a base model (by fingerprint), targets and modules: only then can
    their z be mixed, whatever their parametrisation."""
    first = experts[0]
    for expert, name in zip(experts[1:], names[1:], strict=True):
        if expert.base_fingerprint != first.base_fingerprint:
            raise ExpertError(f"{name} was trained on another base model ({expert.base_model!r}, fingerprint "
                              f"{expert.base_fingerprint}) than {names[0]} ({first.base_model!r}, "
                              f"{first.base_fingerprint}); experts mix only on the same base")
        if expert.targets != first.targets or set(expert.vectors) != set(first.vectors):
            raise ExpertError(f"{name} adapts other matrices (targets {expert.targets!r}, {len(expert.vectors)} "
                              f"modules) than {names[0]} ({first.targets!r}, {len(first.vectors)}); experts "
                              f"mix only over the same targets")
        for module, z in expert.vectors.items():
            if z.shape != first.vectors[module].shape:
                raise ExpertError(f"{name}: z for {module!r} has shape {tuple(z.shape)}, {names[0]}'s "
                                  f"{tuple(first.vectors[module].shape)}")


def check_composable(experts: list[Expert], names: list[str]) -> None:
    """One line if the experts cannot be mixed here: another base model, other targets or other modules, or
    vectors whose z needs the model."""
    if not experts:
        raise ExpertError("nothing to compose: give at least one expert")
    for expert, name in zip(experts, names, strict=True):
        if expert.parametrisation != PARAMETRISATION:
            raise ExpertError(f"{name} holds {expert.parametrisation} vectors, whose z depends on the base model's "
                              f"singular values: import it with --as-z, or mix it in svf-rl eval or adapt, which "
                              f"convert it on the model")
    check_same_base(experts, names)


def check_alpha(alpha, count: int, modules: list[str]) -> dict[str, list[float]]:
    """The weights as {module: one float per expert}, from one weight per expert or {module: [weights]} naming
    exactly `modules`; anything else (a scalar per module, a wrong count, NaN, text) is one line."""
    alpha = alpha.tolist() if hasattr(alpha, "tolist") else alpha
    if isinstance(alpha, (list, tuple)):
        per_module, label = dict.fromkeys(modules, alpha), "alpha"
    elif isinstance(alpha, dict):
        missing, extra = sorted(set(modules) - set(alpha)), sorted(set(alpha) - set(modules))
        if missing or extra:
            raise ExpertError(f"per-module alpha must name exactly the experts' {len(modules)} modules: "
                              f"{len(missing)} missing (e.g. {missing[:1]}), {len(extra)} unknown (e.g. {extra[:1]})")
        per_module, label = alpha, None
    else:
        raise ExpertError(f"alpha must be a list of one weight per expert, or {{module: [one weight per expert]}}; "
                          f"got {type(alpha).__name__} {alpha!r}"[:300])
    for module, values in per_module.items():
        where = label or f"alpha for {module!r}"
        if not isinstance(values, (list, tuple)):
            raise ExpertError(f"{where} must be a list of {count} weights, one per expert; got {values!r}"[:300])
        if len(values) != count:
            raise ExpertError(f"{where} has {len(values)} weights for {count} experts")
        check_finite(where, values)
    return {m: [float(a) for a in per_module[m]] for m in modules}


def read_alpha_file(path: str | Path) -> list | dict:
    """--alpha-file: JSON, [one weight per expert] or {module: [one weight per expert]}."""
    path = check_input_file(path, "--alpha-file")
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # also text that is not UTF-8
        raise ValueError(f"--alpha-file {path} is not JSON: {err}") from None


MIXINGS = ("sum", "anchored")


def check_mixing(mixing: str) -> None:
    if mixing not in MIXINGS:
        raise ValueError(f"--mixing must be one of {', '.join(MIXINGS)}, got {mixing!r}")


def mix_vectors(vectors: list, weights, mixing: str = "sum"):
    """Σₖ αₖ zₖ, or 1 + Σₖ αₖ (zₖ − 1) when anchored at the base model, for one module's z of each expert."""
    if mixing == "anchored":
        return 1 + sum(a * (z - 1) for a, z in zip(weights, vectors, strict=True))
    return sum(a * z for a, z in zip(weights, vectors, strict=True))


def compose(experts: list[Expert], alpha: list[float] | dict[str, list[float]], names: list[str] | None = None,
            mixing: str = "sum") -> Expert:
    """z' = Σₖ αₖ zₖ. `alpha`: one weight per expert, or {module: one weight per expert} covering every module
    (per-layer mixing, as Transformer²'s few-shot adaptation searches). The result records its parts, their
    digests and the weights."""
    names = names or [expert.task or f"expert {k}" for k, expert in enumerate(experts)]
    check_mixing(mixing)
    check_composable(experts, names)
    modules = list(experts[0].vectors)
    weights = check_alpha(alpha, len(experts), modules)
    vectors = {m: mix_vectors([expert.vectors[m].float() for expert in experts], weights[m], mixing) for m in modules}
    parts = [{"name": name, "task": expert.task, "z_sha256": z_digest(expert), "base_model": expert.base_model}
             for name, expert in zip(names, experts, strict=True)]
    composition = {"parts": parts, "alpha": weights if isinstance(alpha, dict) else weights[modules[0]],
                   "mixing": mixing}
    config = {"composition": composition}
    tasks = {json.dumps([e.config.get("task"), e.config.get("task_args", {})], sort_keys=True) for e in experts}
    if len(tasks) == 1 and experts[0].config.get("task"):  # one task for every part: the composition's own
        config.update(task=experts[0].config["task"], task_args=experts[0].config.get("task_args", {}))
    first = experts[0]
    return Expert(vectors, first.base_model, first.base_fingerprint, first.targets,
                  task="+".join(expert.task or "?" for expert in experts), config=config)


def compose_files(paths: list[str], output: str | Path, alpha: list[float] | None = None,
                  alpha_file: str | Path | None = None, overwrite: bool = True, mixing: str = "sum") -> Path:
    """`svf-rl compose`: the expert files mixed with `alpha` (or the JSON in `alpha_file`; equal weights by
    default) and written to `output`, which is never one of the inputs and replaces a file only with
    `overwrite`. Everything is checked before anything is written."""
    if alpha is not None and alpha_file is not None:
        raise ValueError("give --alpha or --alpha-file, not both")
    check_mixing(mixing)
    output = check_output(output, [*paths, *([alpha_file] if alpha_file else [])], overwrite)
    experts = [load_expert(path) for path in paths]
    if alpha_file is not None:
        alpha = read_alpha_file(alpha_file)
    return save_expert(compose(experts, [1.0 / len(experts)] * len(experts) if alpha is None else alpha, paths,
                               mixing), output)
