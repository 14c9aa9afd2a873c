"""An SVF expert as a PEFT LoRA adapter, for servers that switch adapters per request (vLLM `--enable-lora`).

An expert changes each matrix by ΔW = W' − W = U diag(s ⊙ (z − 1)) Vᵀ, which is already a singular value
decomposition of ΔW: its singular values are |dᵢ|, dᵢ = sᵢ(zᵢ − 1). The best rank-k approximation (Eckart–Young)
is therefore its k terms of largest |dᵢ|, with no new SVD: B = U[:, top] diag(d[top]), A = Vᵀ[top, :], and
lora_alpha = r so that PEFT's scale is 1. The error is ‖ΔW − BA‖_F = √(Σ of the other dᵢ²), reported per layer.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from svf_rl.inference.expert import base_model_for, load_expert, module_z
from svf_rl.inputs import check_count, check_output

REPORT = "svf_export.json"  # beside the adapter: the rank and, per layer, the share of ‖ΔW‖ kept


def lora_factors(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, z: torch.Tensor, rank: int
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [rank, in], B [out, rank], kept) for the rank-`rank` truncation of U diag(s ⊙ (z − 1)) Vᵀ, in fp32;
    kept = ‖BA‖_F / ‖ΔW‖_F (1 when ΔW = 0). A matrix of lower rank than asked is padded with zero terms, since
    a LoRA adapter has one rank for every layer."""
    d = s.float() * (z.float() - 1)
    top = d.abs().topk(min(rank, d.numel())).indices
    A = torch.zeros(rank, Vh.shape[1])
    B = torch.zeros(U.shape[0], rank)
    A[:len(top)], B[:, :len(top)] = Vh.float()[top], U.float()[:, top] * d[top]
    total = d.square().sum().item()
    return A, B, math.sqrt(d[top].square().sum().item() / total) if total > 0 else 1.0


def check_export_lora(expert_path, output_dir, rank: int, model: str | None = None):
    check_count("--rank", rank)
    check_output(output_dir, [expert_path], directory=True)
    expert = load_expert(expert_path)
    return expert, base_model_for(expert, str(expert_path), model)


def export_lora(expert_path: str | Path, output_dir: str | Path, rank: int, model: str | None = None) -> dict:
    """Write the expert as a PEFT LoRA adapter of rank `rank` to `output_dir` (new or empty), with svf-rl's
    record (so `svf-rl eval` scores it on the expert's task) and the per-layer share of ‖ΔW‖ kept. Bad input is
    one line before the model loads."""
    from peft import LoraConfig, get_peft_model

    from svf_rl.base_model import cache_root, load_base_model
    from svf_rl.inference.compose import z_digest
    from svf_rl.policies.peft import RECORD
    from svf_rl.run_files import atomic_directory
    from svf_rl.svd import cached_svd, model_fingerprint
    from svf_rl.targets import find_targets

    expert, model_id = check_export_lora(expert_path, output_dir, rank, model)
    lm, _ = load_base_model(model_id)  # fp32: the factors are composed there
    names = find_targets(lm, expert.targets)
    fingerprint = model_fingerprint(lm)
    expert.check_compatible({n: min(lm.get_submodule(n).weight.shape) for n in names}, fingerprint)
    factors, kept = {}, {}
    for name in names:
        U, s, Vh = cached_svd(lm.get_submodule(name).weight, cache_root() / "svd")
        A, B, kept[name] = lora_factors(U, s, Vh, module_z(expert, name, s), rank)
        factors[name] = (A, B)
    # Short names ("down_proj") where every such module is a target, as servers expect; full names otherwise.
    short = {n.rsplit(".", 1)[-1] for n in names}
    whole = all(n in names for n, m in lm.named_modules()
                if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in short)
    targets = sorted(short) if whole else names
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, bias="none",
                        init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = get_peft_model(lm, config)
    with torch.no_grad():
        for name, (A, B) in factors.items():
            layer = adapted.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
    values = list(kept.values())
    report = {"rank": rank, "expert": str(expert_path), "z_sha256": z_digest(expert), "layers": len(values),
              "kept_min": min(values), "kept_mean": sum(values) / len(values), "kept": kept}
    record = {"policy": "svf-export", "base_model": model_id, "base_fingerprint": fingerprint,
              "targets": expert.targets, "task": expert.config.get("task", expert.task),
              "config": {k: expert.config[k] for k in ("task", "task_args", "max_new_tokens") if k in expert.config},
              "scores": {}, "exported_from": {"expert": str(expert_path), "rank": rank}}
    with atomic_directory(Path(output_dir)) as staging:
        adapted.save_pretrained(staging)
        (staging / RECORD).write_text(json.dumps(record, indent=2, default=str))
        (staging / REPORT).write_text(json.dumps(report, indent=2))
    return report
