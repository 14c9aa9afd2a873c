"""A vLLM worker extension that builds the policy's adapted weights on its own device: SVF's W' from U, s, Vᵀ and
z, or a PEFT adapter's W + ΔW from the base weights and the adapter's parameters.

Start the server with `--worker-extension-cls svf_rl.engines.vllm_worker.PolicyWorkerExtension` (and
VLLM_SERVER_DEV_MODE=1, which opens /collective_rpc). The trainer then sends the trainable state alone after
each step (a few hundred KB of z for an 8B model, or the adapter's parameters, instead of gigabytes of
weights), and every worker, whatever the tensor-parallel layout, builds the full weight of each layer and
hands it to vLLM's own loader, which fuses and shards. Arguments arrive as strings: /collective_rpc passes
nothing else.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from svf_rl.base_model import cache_root
from svf_rl.policies.svf_layer import compose_weight
from svf_rl.svd import cached_svd, weight_fingerprint


def encode_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """fp32 for floating tensors (z, adapter parameters); others as they are."""
    return base64.b64encode(save_safetensors({k: (v.float() if v.is_floating_point() else v).contiguous().cpu()
                                              for k, v in tensors.items()})).decode()


def decode_tensors(payload: str) -> dict[str, torch.Tensor]:
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


class PolicyWorkerExtension:
    """Mixed into vLLM's worker class; methods are reached through the server's /collective_rpc."""

    def policy_setup(self, spec: str) -> dict:
        """Hold what the policy needs to build its layers' weights: SVF's factors, or the base weights with the
        adapter attached to them (PEFT, the trainer's own configuration). Returns each layer's checkpoint weight
        fingerprint, for the trainer to check exactly that both sides hold the same base weights."""
        spec = json.loads(spec)
        device = getattr(self, "device", torch.device("cpu"))
        dtype = self.vllm_config.model_config.dtype
        weights = checkpoint_tensors(self.vllm_config.model_config.model, [f"{n}.weight" for n in spec["names"]])
        fingerprints = {name: weight_fingerprint(weights[f"{name}.weight"]) for name in spec["names"]}
        self.policy_kind, self.svf_factors, self.adapter = spec["policy"], {}, None
        if spec["policy"] == "svf":
            for name in spec["names"]:
                # The trainer's SVD cache: on the same machine the factors are read, not recomputed.
                U, s, Vh = cached_svd(weights[f"{name}.weight"], cache_root() / "svd")
                self.svf_factors[name] = tuple(t.to(device, dtype) for t in (U, s, Vh))
        else:
            self.adapter = AdaptedLayers({n: weights[f"{n}.weight"].to(device, dtype) for n in spec["names"]},
                                         spec["config"])
            self.adapter.load(decode_tensors(spec["state"]))
        return fingerprints

    def policy_update(self, payload: str) -> dict:
        """Build every adapted layer's weight from the trainable state and reload it through vLLM's loader (which
        fuses qkv / gate_up)."""
        state = decode_tensors(payload)
        if self.policy_kind == "svf":
            unknown = sorted(set(state) - set(self.svf_factors))
            if unknown:
                raise KeyError(f"z for {unknown[0]}, which policy_setup did not load")

            def weights():
                for name, z in state.items():
                    U, s, Vh = self.svf_factors[name]
                    yield f"{name}.weight", compose_weight(U, s, Vh, z.to(U.device))
        else:
            weights = self.adapter.weights(state)
        self.reload_weights(weights_iterator=iter(weights()), is_checkpoint_format=True)
        return {"tensors": len(state), "sum": float(sum(t.double().sum() for t in state.values()))}


class AdaptedLayers:
    """The adapted matrices alone, each a Linear on its base weight under its Hugging Face name, with the PEFT
    adapter attached as the trainer attached it; their weights are read off their forwards (linear_map)."""

    def __init__(self, base: dict[str, torch.Tensor], config: dict):
        import peft
        from torch import nn

        root = nn.Module()
        for name, weight in base.items():
            parent = root
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=False)
            parent.add_module(leaf, linear)
        config = {**config, "task_type": None, "inference_mode": True}
        if config.get("init_lora_weights") not in (None, True, False):
            config["init_lora_weights"] = True  # the state arrives with every update
        self.names = list(base)
        self.model = peft.get_peft_model(root, peft.get_peft_config(config))

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Some or all of the adapter's tensors (after setup, the ones that changed)."""
        from peft import set_peft_model_state_dict

        self.state = {**getattr(self, "state", {}), **state}  # PEFT loads VeRA's only with its projections
        set_peft_model_state_dict(self.model, self.state)

    def weights(self, state: dict[str, torch.Tensor]):
        from svf_rl.policies.base import linear_map

        self.load(state)

        def each():
            for name in self.names:
                yield f"{name}.weight", linear_map(self.model.base_model.model.get_submodule(name))

        return each


