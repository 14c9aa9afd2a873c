"""vLLM colocated in the trainer process: fast sampling, and W' of the targeted layers pushed after each step.

Only the SVF layers' composed weights are sent, by their Hugging Face names; vLLM's own weight loader
fuses them (qkv, gate_up) and repacks them for its kernels, so nothing here is model-specific.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from .engine import Completion, Sampling
from .svf import svf_layers


def _rng_state():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_state(state) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


class VLLMEngine:
    def __init__(self, model, tokenizer, model_path: str, seed: int = 0, gpu_memory_utilization: float = 0.3,
                 max_model_len: int = 2048):
        # In-process engine: weights can then be handed over as tensors, with no serialisation.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # vLLM pins threads itself
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB, CPU only
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # each push would list every weight not pushed
        from vllm import LLM

        self.model, self.tokenizer = model, tokenizer
        cpu = model.device.type == "cpu"
        state = _rng_state()  # vLLM seeds the global RNGs; the trainer's sampling must not change because of it
        threads = torch.get_num_threads()
        self.llm = LLM(
            model=model_path, tokenizer=model_path, seed=seed, max_model_len=max_model_len,
            # CPU: fp32 (no bf16 hardware on most CPUs, and bf16 output degrades), eager (compiling takes minutes).
            # GPU: the model's dtype, compiled with CUDA graphs.
            dtype="float32" if cpu else model.dtype, enforce_eager=cpu,
            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",  # log-probs of the distribution actually sampled (T, top-p)
        )
        torch.set_num_threads(threads)
        _set_rng_state(state)
        self.update_weights()

    def update_weights(self) -> None:
        """Push W'(z) of every SVF layer; vLLM fuses, repacks and replaces its copies in place."""
        weights = [(f"{name}.weight", layer.weight_for_inference()) for name, layer in svf_layers(self.model).items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        from vllm import SamplingParams, TokensPrompt

        greedy = sampling.temperature == 0
        seeds = sampling.seeds or [None] * len(prompts)
        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature,
                                 top_p=1.0 if greedy else sampling.top_p, max_tokens=sampling.max_new_tokens,
                                 logprobs=0, skip_special_tokens=True, seed=seed)
                  for seed in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        completions = []
        for prompt, output in zip(prompts, outputs, strict=True):
            for sample in output.outputs:
                ids = list(sample.token_ids)
                logprobs = [step[token].logprob for step, token in zip(sample.logprobs, ids, strict=True)]
                completions.append(Completion(prompt, ids, sample.text, logprobs))
        return completions
