"""Import an expert written by Sakana's Transformer² code (self-adaptive-llms): `policy_params.pt`.

Their file is a state dict keyed `learnable_params_module_list.{i}`, one raw pre-sigmoid vector p per MLP
matrix, in the order the Hugging Face model lists its MLP weights. Their W' = U diag(s ⊙ σ(p)) Vᵀ · Σs / Σ(s ⊙ σ(p))
is kept exactly as the expert format's sigmoid-rescaled parametrisation, or converted to z on request.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from svf_rl.inference.expert import SIGMOID_RESCALED, Expert, ExpertError, as_scale_expert, save_expert
from svf_rl.inputs import check_model_id, check_output, read_torch_file
from svf_rl.svd import cached_svd, model_fingerprint
from svf_rl.targets import find_targets

KEY = re.compile(r"learnable_params_module_list\.(\d+)")


def read_policy_params(path: str | Path) -> list[torch.Tensor]:
    """The vectors p in file order, or one line saying why the file is not in Sakana's layout or holds values
    that are no expert (NaN, inf, empty vectors). Only tensors are unpickled: anything else is refused."""
    path = Path(path)
    state = read_torch_file(path, "Sakana expert file")
    if not isinstance(state, dict):
        raise ExpertError(f"{path} is not a state dict of vectors (got {type(state).__name__})")
    if not state:
        raise ExpertError(f"{path} is an empty state dict: it holds no vectors")
    indices = {}
    for key, value in state.items():
        match = KEY.fullmatch(str(key))
        if not match:
            raise ExpertError(f"{path}: key {key!r} is not learnable_params_module_list.<i>; is this Sakana's "
                              f"policy_params.pt?")
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or not value.is_floating_point():
            raise ExpertError(f"{path}: {key} must be a 1-D float vector")
        if not value.numel():
            raise ExpertError(f"{path}: {key} holds no values")
        if not torch.isfinite(value).all():
            raise ExpertError(f"{path}: {key} has {int((~torch.isfinite(value)).sum())} non-finite values (NaN or "
                              f"inf); p must be finite")
        indices[int(match.group(1))] = value
    if sorted(indices) != list(range(len(indices))):
        raise ExpertError(f"{path}: indices must run 0..{len(indices) - 1} without gaps, got "
                          f"{sorted(indices)[:8]}")
    return [indices[i].float() for i in range(len(indices))]


def import_policy_params(path: str | Path, model, base_model: str, task: str = "", as_z: bool = False,
                         vectors: list[torch.Tensor] | None = None, task_args: dict | None = None) -> Expert:
    """An expert for `model` (the base model Sakana's expert was trained on, as loaded by transformers) from
    their file (`vectors`: read_policy_params(path), if already read). Their targets are every MLP matrix; a
    count or size that does not match is one line. Their scale is σ(p)·max_mult rescaled by Σs / Σ(s ⊙ σ(p)·max_mult),
    so max_mult cancels: the file's p alone gives W', whatever max_mult they trained with."""
    vectors = read_policy_params(path) if vectors is None else vectors
    names = find_targets(model, "mlp")  # named_modules order: the order of the model's state dict
    if len(vectors) != len(names):
        raise ExpertError(f"{path} holds {len(vectors)} vectors, but {base_model} has {len(names)} MLP matrices; "
                          f"was it trained on another model?")
    for k, (name, p) in enumerate(zip(names, vectors, strict=True)):
        weight = model.get_submodule(name).weight
        if p.numel() != min(weight.shape):
            raise ExpertError(f"{path}: vector {k} has {p.numel()} values, but {name} has {min(weight.shape)} "
                              f"singular values")
        if not torch.isfinite(p).all():  # read_policy_params refuses these; `vectors` may come from elsewhere
            raise ExpertError(f"{path}: vector {k} has non-finite values")
    config = {"imported_from": str(path), "source_format": "self-adaptive-llms policy_params.pt",
              **({"task": task, "task_args": task_args or {}} if task else {})}  # as a trained expert records it
    expert = Expert(dict(zip(names, vectors, strict=True)), base_model, model_fingerprint(model), "mlp", task,
                    config, parametrisation=SIGMOID_RESCALED)
    if as_z:
        from svf_rl.base_model import cache_root

        def singular_values(name):
            return cached_svd(model.get_submodule(name).weight, cache_root() / "svd")[1]

        expert = as_scale_expert(expert, singular_values)
    return expert


def check_config_shapes(path, vectors: list[torch.Tensor], model: str) -> None:
    """Before the weights load: a Llama-style config says how many MLP matrices there are (gate, up and down
    per layer) and how many singular values each has (the smaller of hidden and intermediate size)."""
    import json

    from svf_rl.base_model import resolve_model_path

    config_file = Path(resolve_model_path(model)) / "config.json"
    try:
        config = json.loads(config_file.read_text())
        layers, sizes = config["num_hidden_layers"], (config["hidden_size"], config["intermediate_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # not a local Llama-style directory: the loaded model is checked instead
    if len(vectors) != 3 * layers:
        raise ExpertError(f"{path} holds {len(vectors)} vectors, but {model} has {3 * layers} MLP matrices; was it "
                          f"trained on another model?")
    bad = next((k for k, p in enumerate(vectors) if p.numel() != min(sizes)), None)
    if bad is not None:
        raise ExpertError(f"{path}: vector {bad} has {vectors[bad].numel()} values, but {model}'s MLP matrices "
                          f"have {min(sizes)} singular values")


def import_file(path: str | Path, model: str, output: str | Path, task: str = "", as_z: bool = False,
                overwrite: bool = True, task_args: dict | None = None) -> tuple[Expert, Path]:
    """`svf-rl import-sakana`: the file, the model id, the task and the output are checked before the model loads
    (the output is never the input, and replaces a file only with `overwrite`); then the expert is written. The
    task is recorded as training runs record theirs, so eval and adapt find its problems."""
    from svf_rl.base_model import load_base_model
    from svf_rl.task import load_task

    vectors = read_policy_params(path)
    check_model_id(model)
    if task:
        load_task(task, task_args or {})
    elif task_args is not None:
        raise ValueError("--task-args needs --task")
    output = check_output(output, [path], overwrite)
    check_config_shapes(path, vectors, model)
    lm, _ = load_base_model(model, "auto")  # the checkpoint's own dtype (the fingerprint does not depend on it)
    expert = import_policy_params(path, lm, model, task, as_z, vectors, task_args)
    return expert, save_expert(expert, output)
