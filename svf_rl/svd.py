"""fp32 SVD of the target weights, cached on disk by a hash of each weight's values; fingerprints of base models."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

_CHUNK = 1 << 22  # elements cast and hashed at a time: bounds the extra memory to one chunk per thread
_RECONSTRUCTION = 20  # a cached SVD passes if ‖U diag(s) Vᵀ − W‖ ≤ 20 (1 + √r) ε₃₂ ‖W‖ (LAPACK gives ~1 √r ε₃₂)
_PROBES = 8  # random vectors that estimate that norm: a full product would cost as much as a forward of W
_verified: set[str] = set()  # cache files whose factors were checked against their matrix in this process


def _hash_values(weight: torch.Tensor, dtype: torch.dtype) -> str:
    """SHA-256 (OpenSSL, hardware-accelerated) of the shape and of every value cast to `dtype`, chunk by chunk."""
    digest = hashlib.sha256(f"{tuple(weight.shape)}|{dtype}".encode())
    flat = weight.detach().reshape(-1)
    buffer = torch.empty(min(_CHUNK, flat.numel()), dtype=dtype)  # one buffer: fresh chunks would grow the heap
    for start in range(0, flat.numel(), _CHUNK):
        chunk = buffer[:min(_CHUNK, flat.numel() - start)]
        chunk.copy_(flat[start:start + _CHUNK])  # the cast, on the buffer
        digest.update(chunk.view(torch.uint8).numpy())  # the raw bytes, without another copy
    return digest.hexdigest()[:32]


def weight_fingerprint(weight: torch.Tensor) -> str:
    """Identity of a base weight, whatever dtype it was loaded in: a hash of all its values rounded to bf16.

    Loading a checkpoint in bf16 rounds it to nearest even, as torch's cast does, and a bf16 checkpoint loaded
    in fp32 holds the bf16 values exactly, so fp32 and bf16 loads of the same checkpoint hash alike. Two weights
    that differ only below bf16's precision are the same base for an expert, as a bf16 load of either would be.
    """
    return _hash_values(weight, torch.bfloat16 if weight.is_floating_point() else weight.dtype)


def weight_fingerprints(model: torch.nn.Module) -> dict[str, str]:
    """weight_fingerprint of every parameter, by name; hashed in parallel (hashlib and casts release the GIL)."""
    named = dict(model.named_parameters())
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(named, pool.map(weight_fingerprint, named.values()), strict=True))


def model_fingerprint(model: torch.nn.Module, weights: dict[str, str] | None = None) -> str:
    """Fingerprint of every parameter of the base model, independent of the target set and of the dtype.

    `weights`: the model's weight_fingerprints, when already computed.
    """
    weights = weight_fingerprints(model) if weights is None else weights
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(f"{name}={weights[name]};".encode())
    return digest.hexdigest()[:32]


def svd_key(weight: torch.Tensor) -> str:
    """Exact identity of the fp32 matrix that is decomposed: a weight that bf16 holds exactly hashes its bf16
    values (half the bytes, and the same key for bf16 and fp32 copies of it), any other its fp32 values."""
    exact = weight.dtype == torch.bfloat16 or torch.equal(weight.to(torch.bfloat16).to(weight.dtype), weight)
    return _hash_values(weight, torch.bfloat16 if exact else torch.float32)


def svd_fp32(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD in fp32 (no bf16 kernel exists, and fp32 factors keep W'(1) ≈ W)."""
    U, s, Vh = torch.linalg.svd(weight.detach().float().cpu(), full_matrices=False)
    return U.contiguous(), s.contiguous(), Vh.contiguous()


def factors_fit(weight: torch.Tensor, U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, check_values: bool = True
                ) -> bool:
    """Whether U diag(s) Vᵀ has the weight's shapes and, if asked, reconstructs it to fp32 accuracy."""
    (m, n), r = weight.shape, min(weight.shape)
    if U.shape != (m, r) or s.shape != (r,) or Vh.shape != (r, n):
        return False
    if not check_values:
        return True
    W = weight.detach().float().cpu()
    # ‖(U diag(s) Vᵀ − W) X‖ / ‖W X‖ over Gaussian X estimates the relative Frobenius error; seeded, so the
    # training RNG is untouched and the check is reproducible.
    X = torch.randn(n, _PROBES, generator=torch.Generator().manual_seed(0))
    WX = W @ X
    error = (U.float() @ (s.float()[:, None] * (Vh.float() @ X)) - WX).norm()
    return bool(error <= _RECONSTRUCTION * (1 + math.sqrt(r)) * torch.finfo(torch.float32).eps * WX.norm())


def _read_factors(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    try:
        with safe_open(path, framework="pt") as f:  # memory-mapped read
            return f.get_tensor("U"), f.get_tensor("s"), f.get_tensor("Vh")
    except Exception:  # unreadable or incomplete: recomputed, never trusted
        return None


def cached_svd(weight: torch.Tensor, cache_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD factors of `weight`, read from `cache_dir` when present, computed and stored otherwise.

    A cache entry is checked against the weight (shapes always; reconstruction once per process, as it costs
    a few matrix products); one that fails is recomputed and overwritten.
    """
    if cache_dir is None:
        return svd_fp32(weight)
    path = Path(cache_dir) / f"{svd_key(weight)}.safetensors"
    if path.exists():
        factors = _read_factors(path)
        if factors is not None and factors_fit(weight, *factors, check_values=str(path) not in _verified):
            _verified.add(str(path))
            return factors
        log.warning("SVD cache entry %s is unreadable or does not decompose its %s weight; recomputing it",
                    path, tuple(weight.shape))
    U, s, Vh = svd_fp32(weight)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({"U": U, "s": s, "Vh": Vh}, tmp)
    os.replace(tmp, path)
    _verified.add(str(path))
    return U, s, Vh
