"""Expert vector files (format v1): the only place that knows how they are written and read.

A safetensors file whose keys are module names and whose values are fp32 vectors; string metadata
carries the format version, base model and fingerprint, targets, parametrisation, task, training
config, eval scores and the svf-rl version. The parametrisation says what the vectors mean:

- singular-value-scale: z itself, W' = U diag(s ⊙ z) Vᵀ (what svf-rl trains);
- sigmoid-rescaled: Sakana's raw pre-sigmoid p, W' = U diag(s ⊙ σ(p)) Vᵀ · Σs / Σ(s ⊙ σ(p)), as their
  Transformer² code applies it. That is z = σ(p) · Σs / Σ(s ⊙ σ(p)), which needs the base model's s.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from svf_rl import __version__
from svf_rl.inputs import check_input_file, check_model_id

FORMAT = "svf-expert"
FORMAT_VERSION = "1"
PARAMETRISATION = "singular-value-scale"  # W' = U diag(s ⊙ z) Vᵀ
SIGMOID_RESCALED = "sigmoid-rescaled"  # Sakana's p: W' = U diag(s ⊙ σ(p)) Vᵀ · Σs / Σ(s ⊙ σ(p))
PARAMETRISATIONS = (PARAMETRISATION, SIGMOID_RESCALED)


class ExpertError(ValueError):
    """An expert file that cannot be used as asked; the message says why in one line."""


@dataclass
class Expert:
    vectors: dict[str, torch.Tensor]
    base_model: str
    base_fingerprint: str
    targets: str
    task: str = ""
    config: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    parametrisation: str = PARAMETRISATION
    svf_rl_version: str = __version__

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "targets": self.targets,
            "parametrisation": self.parametrisation,
            "task": self.task,
            "config": json.dumps(self.config, sort_keys=True, default=str),
            "scores": json.dumps(self.scores, sort_keys=True),
            "svf_rl_version": self.svf_rl_version,
        }

    def check_compatible(self, shapes: dict[str, int], fingerprint: str, targets: str | None = None) -> None:
        """Raise ExpertError unless this expert fits a model with exactly these SVF layers (name → z size), this
        base fingerprint and, when given, these targets."""
        if fingerprint != self.base_fingerprint:
            raise ExpertError(
                f"expert was trained on base {self.base_model!r} (fingerprint {self.base_fingerprint}), "
                f"but this model's fingerprint is {fingerprint}"
            )
        if targets is not None and targets != self.targets:
            raise ExpertError(f"expert was trained with targets {self.targets!r}, but this model's SVF layers "
                              f"were made with targets {targets!r}")
        # Every layer, or the layers the expert leaves out would keep whatever z they had.
        missing = sorted(set(shapes) - set(self.vectors))
        extra = sorted(set(self.vectors) - set(shapes))
        problems = []
        if missing:
            problems.append(f"model SVF layers without a z in the expert: {len(missing)}, e.g. {missing[0]!r}")
        if extra:
            problems.append(f"expert modules that this model does not target: {len(extra)}, e.g. {extra[0]!r}")
        if problems:
            raise ExpertError(f"expert (targets {self.targets!r}, {len(self.vectors)} modules) must cover exactly "
                              f"the model's {len(shapes)} SVF layers: {'; '.join(problems)}")
        for name, z in self.vectors.items():
            if z.numel() != shapes[name]:
                raise ExpertError(f"expert z for {name!r} has {z.numel()} values, the model's has {shapes[name]}")


def save_expert(expert: Expert, path: str | Path) -> Path:
    """Write atomically: a reader never sees a half-written file."""
    path = Path(path)
    tensors = {name: z.detach().float().cpu().contiguous() for name, z in expert.vectors.items()}
    check_vectors(tensors, str(path))  # never write a file that load_expert would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=expert.metadata())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def load_expert(path: str | Path) -> Expert:
    try:
        path = check_input_file(path, "expert file")
    except (OSError, ValueError) as err:
        hint = Path(path) / "expert.safetensors"  # a run directory: its expert is inside
        raise ExpertError(f"{err}; did you mean {hint}?" if hint.is_file() else str(err)) from None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            vectors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ExpertError(f"{path} is not a safetensors file: {err}") from None
    if meta.get("format") != FORMAT:
        raise ExpertError(f"{path} is not an svf-rl expert file (metadata format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExpertError(f"{path} has expert format version {meta.get('format_version')!r}; "
                          f"this svf-rl reads version {FORMAT_VERSION}")
    if meta.get("parametrisation") not in PARAMETRISATIONS:
        raise ExpertError(f"{path} uses parametrisation {meta.get('parametrisation')!r}; "
                          f"this svf-rl reads {' and '.join(PARAMETRISATIONS)}")
    check_vectors(vectors, str(path))
    return Expert(
        vectors=vectors,
        base_model=meta.get("base_model", ""),
        base_fingerprint=meta.get("base_fingerprint", ""),
        targets=meta.get("targets", ""),
        task=meta.get("task", ""),
        config=_metadata_dict(meta, "config", path),
        scores=_metadata_dict(meta, "scores", path),
        parametrisation=meta["parametrisation"],
        svf_rl_version=meta.get("svf_rl_version", ""),
    )


def base_model_for(expert: Expert, where: str, model: str | None = None) -> str:
    """`model` if given, else the base model the expert records; one line, before anything loads, if that
    cannot be a loadable model."""
    if model is not None:
        check_model_id(model)
        return model
    if not expert.base_model:
        raise ExpertError(f"{where} records no base model; give --model")
    try:
        check_model_id(expert.base_model)
    except (OSError, ValueError) as err:
        raise ExpertError(f"{where} records base model {expert.base_model!r}, which cannot be loaded here "
                          f"({err}); give --model") from None
    return expert.base_model


def module_z(expert: Expert, name: str, s: torch.Tensor) -> torch.Tensor:
    """One module's z, W' = U diag(s ⊙ z) Vᵀ, given that module's singular values s."""
    vector = expert.vectors[name]
    if expert.parametrisation == PARAMETRISATION:
        return vector
    s, m = s.double(), torch.sigmoid(vector.double())  # sigmoid-rescaled, in fp64: a ratio of two sums
    return (m * (s.sum() / (s * m).sum())).float()


def scale_vectors(expert: Expert, singular_values) -> dict[str, torch.Tensor]:
    """The expert as z for every module. `singular_values(name)` gives a module's s; it is called only for
    parametrisations that depend on it."""
    if expert.parametrisation == PARAMETRISATION:
        return expert.vectors
    return {name: module_z(expert, name, singular_values(name)) for name in expert.vectors}


def as_scale_expert(expert: Expert, singular_values) -> Expert:
    """The same W' as an expert in z form, which composes and trains like any svf-rl expert."""
    if expert.parametrisation == PARAMETRISATION:
        return expert
    config = {**expert.config, "converted_from": expert.parametrisation}
    return Expert(scale_vectors(expert, singular_values), expert.base_model, expert.base_fingerprint,
                  expert.targets, expert.task, config, expert.scores)


def check_vectors(vectors: dict[str, torch.Tensor], where: str) -> None:
    """Raise ExpertError unless there is at least one z and every z is a finite 1-D fp32 vector."""
    if not vectors:
        raise ExpertError(f"{where}: the expert has no z vectors; it needs one per SVF layer")
    for name, z in vectors.items():
        if z.dim() != 1 or z.dtype != torch.float32:
            raise ExpertError(f"{where}: z for {name!r} must be a 1-D fp32 vector, got {z.dtype} {tuple(z.shape)}")
        bad = int((~torch.isfinite(z)).sum())
        if bad:
            raise ExpertError(f"{where}: z for {name!r} has {bad} non-finite values (NaN or inf); z must be finite")


def _metadata_dict(meta: dict[str, str], key: str, path: Path) -> dict:
    try:
        value = json.loads(meta.get(key, "{}"))
    except json.JSONDecodeError as err:
        raise ExpertError(f"{path}: metadata {key!r} is not valid JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(value, dict):
        raise ExpertError(f"{path}: metadata {key!r} must be a JSON object, got {type(value).__name__}")
    return value


def describe_expert(expert: Expert) -> str:
    """A human-readable summary for `svf-rl inspect`."""
    zs = torch.cat([z.reshape(-1) for z in expert.vectors.values()]) if expert.vectors else torch.ones(1)
    label = "z"
    if expert.parametrisation == SIGMOID_RESCALED:  # the multiplier before the rescale, which needs s
        zs, label = torch.sigmoid(zs), "σ(p)"
    dev = (zs - 1).abs()
    lines = [
        f"format          {FORMAT} v{FORMAT_VERSION} (svf-rl {expert.svf_rl_version})",
        f"base model      {expert.base_model}",
        f"fingerprint     {expert.base_fingerprint}",
        f"task            {expert.task}",
        f"parametrisation {expert.parametrisation}",
        f"targets         {expert.targets}: {len(expert.vectors)} modules, {zs.numel():,} values",
        f"{label:16s}mean {zs.mean():.4f}  min {zs.min():.4f}  max {zs.max():.4f}",
        f"{'|' + label + ' - 1|':16s}mean {dev.mean():.2e}  max {dev.max():.2e}",
    ]
    composition = expert.config.get("composition") or {}
    for k, part in enumerate(composition.get("parts", [])):
        alpha = composition["alpha"]
        weight = alpha[k] if isinstance(alpha, list) else "per module"
        lines.append(f"part            {part['name']} (task {part['task']}, z {part['z_sha256'][:12]}): α {weight}")
    for name, value in sorted(expert.scores.items()):
        lines.append(f"score           {name}: {value}")
    return "\n".join(lines)
