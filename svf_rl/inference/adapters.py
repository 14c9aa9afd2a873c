"""Saved PEFT adapters on the inference side: what `svf-rl eval` scores and `svf-rl merge` bakes in.

A PEFT policy's run writes a plain PEFT adapter directory (adapter_config.json, adapter_model.safetensors) and
svf-rl's record beside it (svf_rl.json: base fingerprint, task, scores). The adapter is loaded with PEFT and
merged into the weights once, in fp32 where the model is, so inference runs on a plain model.
"""

from __future__ import annotations

import json
from pathlib import Path

from svf_rl.policies.peft import RECORD, is_adapter_dir, read_record


class AdapterError(ValueError):
    """An adapter directory that cannot be used as asked; the message says why in one line."""


def adapter_info(path: str | Path) -> dict:
    """svf-rl's record of an adapter directory (empty for an adapter trained elsewhere), checked in one line."""
    path = Path(path)
    if not is_adapter_dir(path):
        raise AdapterError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").is_file():
        raise AdapterError(f"{path} has no adapter_model.safetensors")
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except ValueError as err:
        raise AdapterError(f"{path}/adapter_config.json is not JSON: {err}") from None
    info = read_record(path)
    info.setdefault("base_model", config.get("base_model_name_or_path") or "")
    return info


def base_model_for_adapter(path: str | Path, model: str | None = None) -> str:
    from svf_rl.inputs import check_model_id

    info = adapter_info(path)
    chosen = model or info["base_model"]
    if not chosen:
        raise AdapterError(f"{path} records no base model; give --model")
    try:
        check_model_id(chosen)
    except (OSError, ValueError) as err:
        raise AdapterError(f"{path}: base model {chosen!r} cannot be loaded here ({err}); give --model") from None
    return chosen


def merged_model(path: str | Path, model_id: str, dtype: str = "auto"):
    """(model, tokenizer, names of the merged layers): the base model with the adapter merged into its weights,
    after checking that the base weights are the ones it was trained on (when svf-rl recorded them)."""
    import warnings

    from peft import PeftModel

    from svf_rl.inference.evaluate import load_model
    from svf_rl.svd import model_fingerprint

    model, tokenizer = load_model(model_id, dtype)
    expected = adapter_info(path).get("base_fingerprint")
    if expected and expected != (found := model_fingerprint(model)):
        raise AdapterError(f"{path} was trained on other base weights (fingerprint {expected}); {model_id} has "
                           f"{found}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = PeftModel.from_pretrained(model, str(path))
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [n.removeprefix("base_model.model.") for n, m in adapted.named_modules() if isinstance(m, BaseTunerLayer)]
    return adapted.merge_and_unload(), tokenizer, names


def merge_adapter(path: str | Path, output_dir: str | Path, model: str | None = None) -> Path:
    """Write the base model with the adapter merged in to `output_dir`, atomically; refused in one line before
    anything loads if the output exists or the adapter or model cannot be used."""
    from transformers import AutoTokenizer

    from svf_rl.base_model import resolve_model_path
    from svf_rl.inputs import check_output
    from svf_rl.run_files import atomic_directory

    output_dir = Path(output_dir)
    check_output(output_dir, [path], directory=True)
    model_id = base_model_for_adapter(path, model)
    lm, _, _ = merged_model(path, model_id, "auto")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_id))
    info = adapter_info(path)
    lm.config.svf_rl_adapter = {"adapter": Path(path).name, "policy": info.get("policy", ""),
                                "task": info.get("task", ""), "base_model": model_id}
    with atomic_directory(output_dir) as staging:
        lm.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return output_dir


__all__ = ["RECORD", "AdapterError", "adapter_info", "is_adapter_dir", "merge_adapter", "merged_model"]
