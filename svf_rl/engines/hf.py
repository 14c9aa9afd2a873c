"""Rollout engines: generate sampled completions for token-id prompts, and follow the policy's weights."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

HF_BATCH_SEQUENCES = 256  # sequences per generate() call of the HF engine


@dataclass
class Sampling:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 decodes greedily (evaluation only)
    top_p: float = 1.0
    max_new_tokens: int = 16
    seeds: list[int] | None = None  # one per prompt: samples then do not depend on batching or on the rank


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # sampled tokens, up to and including the first end-of-sequence token
    text: str
    logprobs: list[float] | None = None  # engine's log-probs of `ids`, when it gives them
    source: str | None = None  # the part of the task its prompt came from (Task.source), set by the loop
    routes: torch.Tensor | None = None  # [token routers, prompt + completion but its last token]: each fed token's
    # top-1 option while sampled (a policy routing tokens, HF engine), which the update compares with its own


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        """`sampling.n` completions per prompt, prompt-major: prompt i's are entries i*n .. i*n+n-1."""

    def update_weights(self) -> None:
        """Make the next generate() use the policy's current parameters."""


def make_engine(kind: str, model, tokenizer, policy=None, model_path: str = "", seed: int = 0,
                gpu_memory_utilization: float = 0.3, max_model_len: int = 2048, urls=(), timeout: float = 300.0,
                accelerator=None, fingerprints: dict[str, str] | None = None) -> RolloutEngine:
    """hf: generate() on the model itself; vllm: a vLLM engine in this process, fed the policy's weights by name;
    vllm_server: vLLM servers of their own, fed the policy's trainable state. `policy` None: the model as it is.
    A policy whose weights follow the prompt gets each prompt generated at its own (PerPromptEngine)."""
    if kind == "hf":
        return HFEngine(model, tokenizer)
    per_prompt = getattr(policy, "per_prompt", False)
    if kind == "vllm":
        from svf_rl.engines.vllm_engine import VLLMEngine

        weights = policy.engine_weights if policy is not None else lambda: iter(())
        engine = VLLMEngine(model, tokenizer, model_path, weights, seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
    else:
        from svf_rl.engines.vllm_engine import VLLMServerEngine

        main, wait = (accelerator.is_main_process, accelerator.wait_for_everyone) if accelerator else (True, None)
        engine = VLLMServerEngine(model, tokenizer, policy, list(urls), timeout, main=main,
                                  wait=wait or (lambda: None), fingerprints=fingerprints)
    if per_prompt:
        from svf_rl.engines.per_prompt import PerPromptEngine

        engine = PerPromptEngine(engine, policy)
    return engine


def generate_per_z(engine, groups: list[tuple[dict | None, list[list[int]]]], sampling: Sampling,
                   mixed: bool = False) -> list[list[Completion]]:
    """Each group's prompts with that group's z (None: the base model, z = 1), one generate() per group, on any
    engine: the policy's z is set and pushed as after a training step, and restored afterwards. `mixed`, on an
    engine that can: every group in the same batches, each row at its own z."""
    from svf_rl.policies.svf_layer import load_z, svf_layers, z_vectors

    if mixed and hasattr(engine, "generate_rows"):
        prompts = [p for _, group in groups for p in group]
        zs = [z for z, group in groups for _ in group]
        flat, out = engine.generate_rows(prompts, zs, sampling) if prompts else [], []
        for _, group in groups:
            out.append(flat[:len(group) * sampling.n])
            flat = flat[len(group) * sampling.n:]
        return out

    saved = z_vectors(engine.model)
    out = []
    try:
        for z, prompts in groups:
            load_z(engine.model, z if z is not None else {n: torch.ones_like(v) for n, v in saved.items()})
            engine.update_weights()
            out.append(engine.generate(prompts, sampling) if prompts else [])
    finally:
        if svf_layers(engine.model):
            load_z(engine.model, saved)
            engine.update_weights()
    return out


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
    return ids, mask


def prompt_rows(model, ids: torch.Tensor, mask: torch.Tensor, repeats: int = 1):
    """Forwards inside run `repeats` sequences of each prompt in `ids` (left-padded), in that order: a model that
    routes each sequence by its prompt (`route_rows`, a mixture's first pass) sets their gates; others ignore it."""
    route = getattr(model, "route_rows", None)
    return route(ids, mask, repeats) if route is not None else contextlib.nullcontext()


def kept_routes(model):
    """Generation inside keeps where a model that routes each token (`keep_routes`) sent each token it fed; yields
    routes(row, length) → the first `length` tokens' routes of that row (None for other models)."""
    keep = getattr(model, "keep_routes", None)
    return keep() if keep is not None else contextlib.nullcontext(lambda row, length: None)


class RolloutDistribution(LogitsProcessor):
    """The sampling distribution, written out: softmax(logits / T) cut to its top-p nucleus, as log-probs.

    generate() samples from what this returns, and it records each sampled token's log-prob (the token drawn
    after call t is the last input of call t + 1), so rollouts come with the sampler's own log-probs.
    """

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p
        self.sampled: list[torch.Tensor] = []  # [rows] per generated position
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is not None:
            self.sampled.append(self._last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        logprobs = torch.log_softmax(scores.float() / self.temperature, -1)
        if self.top_p < 1:  # keep the most likely tokens until their mass reaches top_p
            ordered, order = logprobs.sort(-1, descending=True)
            mass_before = ordered.exp().cumsum(-1) - ordered.exp()
            ordered = ordered.masked_fill(mass_before >= self.top_p, float("-inf"))
            logprobs = torch.log_softmax(torch.empty_like(logprobs).scatter_(-1, order, ordered), -1)
        self._last = logprobs
        return logprobs

    def logprobs(self, sequences: torch.Tensor) -> torch.Tensor:
        """[rows, generated] log-probs of the generated part of `sequences`."""
        if self._last is not None:
            self.sampled.append(self._last.gather(-1, sequences[:, -1:]).squeeze(-1))
            self._last = None
        return torch.stack(self.sampled, 1) if self.sampled else sequences.new_zeros((len(sequences), 0)).float()


@contextlib.contextmanager
def neutral_generation_defaults(model):
    """generate() fills every unset option from the model's generation_config (a checkpoint's repetition_penalty,
    top_k, min_new_tokens, ...), which would make rollouts off-policy; for the call, it holds none."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


class HFEngine:
    """`model.generate` on the SVF model itself; its no-grad forwards use the cached W'."""

    def __init__(self, model, tokenizer, batch_size: int = HF_BATCH_SEQUENCES):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])

    def update_weights(self) -> None:
        """Nothing to push: the engine is the policy's own module, whose cached W' follows z's values."""

    @torch.no_grad()
    def generate_rows(self, prompts: list[list[int]], zs: list, sampling: Sampling) -> list[Completion]:
        """Each prompt at its own z (None: the base model), several experts in each batch."""
        from svf_rl.policies.svf_layer import per_row_z

        completions = []
        per_call = max(1, self.batch_size // sampling.n)
        for start in range(0, len(prompts), per_call):
            chunk = range(start, min(start + per_call, len(prompts)))
            with per_row_z(self.model, [zs[i] for i in chunk for _ in range(sampling.n)]):
                completions += self._generate([prompts[i] for i in chunk], sampling, share_prompts=False)
        return completions

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        if sampling.seeds is not None:  # one prompt per call, each under its own seed
            completions = []
            for prompt, seed in zip(prompts, sampling.seeds, strict=True):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    completions += self._generate([prompt], sampling)
            return completions
        completions = []
        per_call = max(1, self.batch_size // sampling.n)
        for start in range(0, len(prompts), per_call):
            completions += self._generate(prompts[start:start + per_call], sampling)
        return completions

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, repeats: int):
        """The prompts' KV cache, repeated for each completion; positions counted as generate() counts them."""
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        cache = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(repeats)
        return cache

    def _generate(self, prompts: list[list[int]], sampling: Sampling, share_prompts: bool = True
                  ) -> list[Completion]:
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        greedy = sampling.temperature == 0
        # Sampling: generate() draws from RolloutDistribution's output, with every built-in processor off.
        distribution = None if greedy else RolloutDistribution(sampling.temperature, sampling.top_p)
        options = GenerationConfig(do_sample=not greedy, max_new_tokens=sampling.max_new_tokens,
                                   num_return_sequences=sampling.n, pad_token_id=self.tokenizer.pad_token_id,
                                   eos_token_id=sorted(self.eos_ids), num_beams=1,
                                   **({} if greedy else {"temperature": 1.0, "top_p": 1.0, "top_k": 0}))
        ids, mask = ids.to(self.model.device), mask.to(self.model.device)
        shared = {}
        # a model routing each sequence by its prompt reads it; one routing each token keeps where it sent them
        with prompt_rows(self.model, ids, mask, sampling.n), kept_routes(self.model) as routes:
            if share_prompts and sampling.n > 1 and ids.shape[1] > 1:  # each prompt's keys and values once, for n
                shared["past_key_values"] = self._prefill(ids[:, :-1], mask[:, :-1], sampling.n)
                ids, mask = ids.repeat_interleave(sampling.n, 0), mask.repeat_interleave(sampling.n, 0)
                options.num_return_sequences = 1
            with neutral_generation_defaults(self.model):
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=options,
                                          logits_processor=LogitsProcessorList([distribution] if distribution else []),
                                          **shared)
        generated = out[:, ids.shape[1]:]
        logprobs = distribution.logprobs(out).tolist() if distribution else None
        completions = []
        for row, sequence in enumerate(generated.tolist()):
            end = next((i + 1 for i, token in enumerate(sequence) if token in self.eos_ids), len(sequence))
            tokens = sequence[:end]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            prompt = prompts[row // sampling.n]
            completions.append(Completion(prompt, tokens, text, logprobs[row][:end] if logprobs else None,
                                          routes=routes(row, len(prompt) + end - 1)))
        return completions
