"""vLLM colocated in the trainer process (fast sampling, the adapted layers' weights pushed after each step), or
vLLM servers of their own (only the policy's trainable state is sent; the servers build the weights).

Only the adapted layers' weights are loaded, by their Hugging Face names; vLLM's own weight loader fuses them
(qkv, gate_up) and repacks them for its kernels, so nothing here is model-specific.
"""

from __future__ import annotations

import json
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from svf_rl.engines.hf import Completion, Sampling
from svf_rl.engines.vllm_worker import encode_tensors


def _rng_state():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_state(state) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


class VLLMEngine:
    def __init__(self, model, tokenizer, model_path: str, weights, seed: int = 0, gpu_memory_utilization: float = 0.3,
                 max_model_len: int = 2048):
        """`weights()`: (Hugging Face name, weight) of every adapted matrix, at the policy's current parameters."""
        # In-process engine: weights can then be handed over as tensors, with no serialisation.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # vLLM pins threads itself
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB, CPU only
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # each push would list every weight not pushed
        from vllm import LLM

        self.model, self.tokenizer, self.weights = model, tokenizer, weights
        cpu = model.device.type == "cpu"
        state = _rng_state()  # vLLM seeds the global RNGs; the trainer's sampling must not change because of it
        threads = torch.get_num_threads()
        self.llm = LLM(
            model=model_path, tokenizer=model_path, seed=seed, max_model_len=max_model_len,
            # The trainer's dtype (config `dtype`). CPU: eager (compiling takes minutes); GPU: CUDA graphs.
            dtype=str(model.dtype).removeprefix("torch."), enforce_eager=cpu,
            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",  # log-probs of the distribution actually sampled (T, top-p)
        )
        torch.set_num_threads(threads)
        _set_rng_state(state)
        self.update_weights()

    def update_weights(self) -> None:
        """Push every adapted layer's weight; vLLM fuses, repacks and replaces its copies in place."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(self.weights())),
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


class VLLMServerError(RuntimeError):
    """A vLLM server cannot serve the policy; the message says which one and how to start it right."""


class VLLMServerEngine:
    """Rollouts on vLLM servers of their own (launch/vllm_server.sh), on GPUs the trainer does not use.

    Prompts go out through TRL's VLLMClient, spread over the servers (data parallel; each server may itself be
    tensor parallel). After each step the main process sends the policy's trainable state alone (SVF's z, an
    adapter's parameters), and every server worker builds the adapted weights from the base weights it holds
    (svf_rl.engines.vllm_worker); the other ranks wait until the new weights are in.
    """

    def __init__(self, model, tokenizer, policy, urls: list[str], timeout: float = 300.0, main: bool = True,
                 wait=lambda: None, fingerprints: dict[str, str] | None = None):
        """`fingerprints`: weight_fingerprints of the base model, taken before the policy adapted it; the servers'
        checkpoint weights must match them exactly."""
        import warnings

        with warnings.catch_warnings():  # TRL warns about every vLLM version it was not released with
            warnings.simplefilter("ignore")
            from trl.generation.vllm_client import VLLMClient

            self.clients = []
            for url in urls:
                try:
                    self.clients.append(VLLMClient(base_url=url, connection_timeout=timeout))
                except OSError:  # requests' ConnectionError
                    raise VLLMServerError(f"no vLLM server answered at {url} within {timeout:.0f} s; start one "
                                          f"with launch/vllm_server.sh") from None
        self.model, self.tokenizer, self.policy, self.main, self.wait = model, tokenizer, policy, main, wait
        setup = policy.server_setup()
        if "state" in setup:  # tensors travel as safetensors in base64, as every update does
            setup = {**setup, "state": encode_tensors(setup["state"])}
        layers = setup["names"]
        if fingerprints is None:
            logging.getLogger(__name__).warning("no base weight fingerprints given: the vLLM servers' weights are "
                                                "not checked against the trainer's")
        for client in self.clients:
            for worker in self._rpc(client, "policy_setup", json.dumps(setup)):
                # The same base weights on both sides, or nothing will match: compared exactly, by hash.
                wrong = [n for n in layers if fingerprints is not None and worker.get(n) != fingerprints[f"{n}.weight"]]
                if wrong:
                    raise VLLMServerError(f"vLLM server {client.base_url} serves other weights than the trainer's "
                                          f"model: {len(wrong)} of {len(layers)} adapted layers differ, e.g. "
                                          f"{wrong[0]} (fingerprint {worker.get(wrong[0])} vs "
                                          f"{fingerprints[f'{wrong[0]}.weight']}); serve the trainer's base model")
        self.update_weights()

    def _rpc(self, client, method: str, argument: str) -> list:
        response = client.session.post(f"{client.base_url}/collective_rpc",
                                       json={"method": method, "args": [argument]}, timeout=600)
        if response.status_code == 404:
            raise VLLMServerError(f"vLLM server {client.base_url} has no /collective_rpc; start it with "
                                  f"VLLM_SERVER_DEV_MODE=1 (launch/vllm_server.sh does)")
        if response.status_code != 200:
            hint = (" (start it with --worker-extension-cls svf_rl.engines.vllm_worker.PolicyWorkerExtension, as "
                    "launch/vllm_server.sh does)" if method in response.text and "attribute" in response.text
                    else "")
            raise VLLMServerError(f"vLLM server {client.base_url}: {method} failed with HTTP "
                                  f"{response.status_code}: {response.text[:300]}{hint}")
        return response.json()["results"]

    def update_weights(self) -> None:
        """The main process sends the trainable state to every server; all ranks leave once the servers hold the
        new weights."""
        if self.main:
            payload = encode_tensors(self.policy.server_update())

            def push(client):
                self._rpc(client, "policy_update", payload)
                client.reset_prefix_cache()  # cached KV blocks were computed with the old weights

            with ThreadPoolExecutor(len(self.clients)) as pool:
                list(pool.map(push, self.clients))
        self.wait()

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        # One request per prompt when each has its own seed; otherwise one request per server.
        if sampling.seeds is not None:
            requests = [([p], seed) for p, seed in zip(prompts, sampling.seeds, strict=True)]
        else:
            share = -(-len(prompts) // len(self.clients)) or 1
            requests = [(prompts[i:i + share], None) for i in range(0, len(prompts), share)]

        def send(indexed):
            index, (chunk, seed) = indexed
            client = self.clients[index % len(self.clients)]
            return client.generate(chunk, n=sampling.n, temperature=sampling.temperature,
                                   top_p=1.0 if sampling.temperature == 0 else sampling.top_p,
                                   max_tokens=sampling.max_new_tokens, logprobs=0,
                                   generation_kwargs=None if seed is None else {"seed": seed})

        completions = []
        with ThreadPoolExecutor(min(32, max(1, len(requests)))) as pool:
            for (chunk, _), out in zip(requests, pool.map(send, enumerate(requests)), strict=True):
                for row, (ids, logprobs) in enumerate(zip(out["completion_ids"], out["logprobs"], strict=True)):
                    completions.append(Completion(chunk[row // sampling.n], list(ids),
                                                  self.tokenizer.decode(ids, skip_special_tokens=True),
                                                  [step[0] for step in logprobs]))
        return completions
