import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from svf_rl.base_model import EMBEDDED_MODEL, resolve_model_path  # noqa: E402


def tiny_llama(vocab_size: int = 64, seed: int = 0, initializer_range: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=initializer_range)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded SmolLM2 converted once into the cache."""
    return resolve_model_path(EMBEDDED_MODEL)


def save_tiny_model(tmp_path_factory, smollm2_path, initializer_range: float = 0.02) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = tiny_llama(vocab_size=len(tokenizer), initializer_range=initializer_range)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_path) -> str:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, saved as a HF directory."""
    return save_tiny_model(tmp_path_factory, smollm2_path)


@pytest.fixture(scope="session")
def sharp_model_dir(tmp_path_factory, smollm2_path) -> str:
    """The tiny Llama with larger weights: its greedy answers depend on the prompt and on z (the default
    initialisation answers every prompt with the same token)."""
    return save_tiny_model(tmp_path_factory, smollm2_path, initializer_range=0.5)


@pytest.fixture(scope="session")
def tiny_experts(tiny_model_dir, tmp_path_factory):
    """Two expert files for the tiny model's MLPs, each z a different random scale (for mixtures)."""
    from transformers import AutoModelForCausalLM

    from svf_rl.inference.expert import Expert, save_expert
    from svf_rl.policies.svf_layer import apply_svf, svf_layers
    from svf_rl.svd import model_fingerprint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fingerprint = model_fingerprint(model)
    apply_svf(model, "mlp", progress=False)
    generator = torch.Generator().manual_seed(5)
    folder = tmp_path_factory.mktemp("experts")
    return [str(save_expert(Expert({n: 1 + 0.5 * torch.randn(layer.z.shape, generator=generator)
                                    for n, layer in svf_layers(model).items()}, tiny_model_dir, fingerprint, "mlp",
                                   f"t{k}"), folder / f"t{k}.safetensors")) for k in range(2)]
