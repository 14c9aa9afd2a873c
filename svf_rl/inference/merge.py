"""Bake an expert into a plain Hugging Face model directory: W' = W + U diag(s ⊙ (z − 1)) Vᵀ as each layer's weight.

The result loads with transformers or vLLM alone. It keeps the base checkpoint's dtype; the change is
computed in fp32 from the SVD factors in that dtype, added to W and rounded once, exactly as eval and adapt
compose W' (z = 1 leaves W as it is). config.json's `svf_expert` records which expert it holds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from svf_rl import __version__
from svf_rl.base_model import cache_root, load_base_model, resolve_model_path
from svf_rl.inference.compose import z_digest
from svf_rl.inference.expert import Expert, base_model_for, load_expert, module_z
from svf_rl.inputs import check_output
from svf_rl.policies.svf_layer import with_change
from svf_rl.run_files import atomic_directory
from svf_rl.svd import cached_svd, model_fingerprint
from svf_rl.targets import find_targets


def check_merge(expert_path: str | Path, output_dir: str | Path, model: str | None = None) -> tuple[Expert, str]:
    """(the expert, the base model id) once the output directory, the expert and the model are usable; one line
    before anything loads if not. An existing file or non-empty directory is never replaced."""
    check_output(output_dir, [expert_path], directory=True)
    expert = load_expert(expert_path)
    return expert, base_model_for(expert, str(expert_path), model)


def merge_expert(expert_path: str | Path, output_dir: str | Path, model: str | None = None) -> Path:
    """Write the base model (the expert's own unless `model` is given) with the expert's W' to `output_dir`,
    atomically; bad input (an existing non-empty `output_dir`, a file there, ...) is refused before anything
    loads."""
    output_dir = Path(output_dir)
    expert, model_id = check_merge(expert_path, output_dir, model)
    from transformers import AutoTokenizer

    lm, _ = load_base_model(model_id, "auto")  # the checkpoint's own dtype
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_id))  # as shipped, without a pad fix
    names = find_targets(lm, expert.targets)
    expert.check_compatible({n: min(lm.get_submodule(n).weight.shape) for n in names}, model_fingerprint(lm))
    with torch.no_grad():
        for name in names:
            weight = lm.get_submodule(name).weight
            # The factors in the checkpoint's dtype, as eval and adapt hold them: the same W', bit for bit.
            U, s, Vh = (f.to(weight.device, weight.dtype) for f in cached_svd(weight, cache_root() / "svd"))
            weight.copy_(with_change(weight, U, s, Vh, module_z(expert, name, s).to(weight.device)))
    lm.config.svf_expert = {"file": Path(expert_path).name, "task": expert.task, "z_sha256": z_digest(expert),
                            "parametrisation": expert.parametrisation, "targets": expert.targets,
                            "base_model": expert.base_model, "base_fingerprint": expert.base_fingerprint,
                            "svf_rl_version": __version__}
    with atomic_directory(output_dir) as staging:
        lm.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return output_dir

