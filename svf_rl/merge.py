"""Bake an expert into a plain Hugging Face model directory: W' = U diag(s ⊙ z) Vᵀ stored as each layer's weight.

The result loads with transformers or vLLM alone. It keeps the base checkpoint's dtype; W' is composed in
fp32 from the fp32 SVD and rounded once. config.json's `svf_expert` records which expert it holds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import __version__
from .base_model import cache_root, load_base_model, resolve_model_path
from .compose import z_digest
from .expert import load_expert, module_z
from .run_files import atomic_directory
from .svd import cached_svd, model_fingerprint
from .svf import compose_weight, find_targets


def merge_expert(expert_path: str | Path, output_dir: str | Path, model: str | None = None) -> Path:
    """Write the base model (the expert's own unless `model` is given) with the expert's W' to `output_dir`,
    atomically; an existing non-empty `output_dir` is refused before anything loads."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} already exists and is not empty; give a new directory")
    expert = load_expert(expert_path)
    model_id = model or expert.base_model
    from transformers import AutoTokenizer

    lm, _ = load_base_model(model_id, "auto")  # the checkpoint's own dtype
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_id))  # as shipped, without a pad fix
    names = find_targets(lm, expert.targets)
    expert.check_compatible({n: min(lm.get_submodule(n).weight.shape) for n in names}, model_fingerprint(lm))
    with torch.no_grad():
        for name in names:
            weight = lm.get_submodule(name).weight
            U, s, Vh = cached_svd(weight, cache_root() / "svd")
            weight.copy_(compose_weight(U, s, Vh, module_z(expert, name, s).to(s.device)))
    lm.config.svf_expert = {"file": Path(expert_path).name, "task": expert.task, "z_sha256": z_digest(expert),
                            "parametrisation": expert.parametrisation, "targets": expert.targets,
                            "base_model": expert.base_model, "base_fingerprint": expert.base_fingerprint,
                            "svf_rl_version": __version__}
    with atomic_directory(output_dir) as staging:
        lm.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return output_dir

