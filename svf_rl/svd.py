"""fp32 SVD of the target weights, cached on disk by a fingerprint of each weight."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_SAMPLE = 65536  # elements hashed per tensor: identifies a weight without reading all of it


def weight_fingerprint(weight: torch.Tensor) -> str:
    """Hash of shape, dtype and an evenly strided sample of the values."""
    flat = weight.detach().reshape(-1)
    stride = max(1, flat.numel() // _SAMPLE)
    sample = flat[::stride].float().contiguous().cpu()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(weight.shape)}|{weight.dtype}".encode())
    digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of every parameter of the base model, independent of the target set."""
    digest = hashlib.blake2b(digest_size=16)
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(weight_fingerprint(param).encode())
    return digest.hexdigest()


def svd_fp32(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD in fp32 (no bf16 kernel exists, and fp32 factors keep W'(1) ≈ W)."""
    U, s, Vh = torch.linalg.svd(weight.detach().float().cpu(), full_matrices=False)
    return U.contiguous(), s.contiguous(), Vh.contiguous()


def cached_svd(weight: torch.Tensor, cache_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD factors of `weight`, read from `cache_dir` when present, computed and stored otherwise."""
    if cache_dir is None:
        return svd_fp32(weight)
    path = Path(cache_dir) / f"{weight_fingerprint(weight)}.safetensors"
    if path.exists():
        try:
            with safe_open(path, framework="pt") as f:  # memory-mapped read
                return f.get_tensor("U"), f.get_tensor("s"), f.get_tensor("Vh")
        except Exception:  # a corrupt entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    U, s, Vh = svd_fp32(weight)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({"U": U, "s": s, "Vh": Vh}, tmp)
    os.replace(tmp, path)
    return U, s, Vh
