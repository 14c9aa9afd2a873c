"""A vLLM worker extension that holds U, s, Vᵀ of the SVF layers and composes W' from z on its own device.

Start the server with `--worker-extension-cls svf_rl.vllm_worker.SVFWorkerExtension` (and
VLLM_SERVER_DEV_MODE=1, which opens /collective_rpc). The trainer then sends z alone after each step
(a few hundred KB for an 8B model, instead of gigabytes of W'), and every worker, whatever the tensor-
parallel layout, composes the full W' of each layer and hands it to vLLM's own loader, which fuses and shards.
Arguments arrive as strings: /collective_rpc passes nothing else.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .base_model import cache_root
from .svd import cached_svd, weight_fingerprint
from .svf import compose_weight


def encode_z(vectors: dict[str, torch.Tensor]) -> str:
    return base64.b64encode(save_safetensors({k: v.float().contiguous() for k, v in vectors.items()})).decode()


def decode_z(payload: str) -> dict[str, torch.Tensor]:
    return load_safetensors(base64.b64decode(payload))


def checkpoint_tensors(model: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a model's safetensors checkpoint (a directory, or a Hub id already in the cache)."""
    root = Path(model)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(model, allow_patterns=["*.safetensors"], local_files_only=True))
    wanted, found = set(names), {}
    for file in sorted(root.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in wanted.intersection(f.keys()):
                found[key] = f.get_tensor(key)
    missing = sorted(wanted - set(found))
    if missing:
        raise KeyError(f"{model} has no tensor {missing[0]} ({len(missing)} missing); serve the trainer's base model")
    return found


class SVFWorkerExtension:
    """Mixed into vLLM's worker class; methods are reached through the server's /collective_rpc."""

    def svf_setup(self, spec: str) -> dict:
        """Load the SVD factors of the listed layers (HF module names). Returns each layer's checkpoint weight
        fingerprint, for the trainer to check exactly that both sides hold the same base weights."""
        spec = json.loads(spec)
        device = getattr(self, "device", torch.device("cpu"))
        dtype = self.vllm_config.model_config.dtype
        weights = checkpoint_tensors(self.vllm_config.model_config.model, [f"{n}.weight" for n in spec["names"]])
        self.svf_factors, fingerprints = {}, {}
        for name in spec["names"]:
            weight = weights[f"{name}.weight"]
            # The trainer's SVD cache: on the same machine the factors are read, not recomputed.
            U, s, Vh = cached_svd(weight, cache_root() / "svd")
            self.svf_factors[name] = tuple(t.to(device, dtype) for t in (U, s, Vh))
            fingerprints[name] = weight_fingerprint(weight)  # of the weight as stored, whatever vLLM's dtype
        return fingerprints

    def svf_load_z(self, payload: str) -> dict:
        """Compose W'(z) for every layer and reload it through vLLM's loader (which fuses qkv / gate_up)."""
        vectors = decode_z(payload)
        unknown = sorted(set(vectors) - set(self.svf_factors))
        if unknown:
            raise KeyError(f"z for {unknown[0]}, which svf_setup did not load")

        def weights():
            for name, z in vectors.items():
                U, s, Vh = self.svf_factors[name]
                yield f"{name}.weight", compose_weight(U, s, Vh, z.to(U.device))

        self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        return {"layers": len(vectors), "z_sum": float(sum(z.double().sum() for z in vectors.values()))}
