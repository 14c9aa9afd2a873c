"""Rollout engines: generate sampled completions for token-id prompts, and follow the policy's weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .svf import svf_layers


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


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        """`sampling.n` completions per prompt, prompt-major: prompt i's are entries i*n .. i*n+n-1."""

    def update_weights(self) -> None:
        """Make the next generate() use the policy's current z."""


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
    return ids, mask


class HFEngine:
    """`model.generate` on the SVF model itself; its no-grad forwards use the cached W'."""

    def __init__(self, model, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])

    def update_weights(self) -> None:
        for layer in svf_layers(self.model).values():  # same module: W' recomposes on its next use
            layer.invalidate()

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

    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        greedy = sampling.temperature == 0
        out = self.model.generate(
            input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
            do_sample=not greedy, temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=None if greedy else 0,
            max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.n,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        completions = []
        for row, sequence in enumerate(out[:, ids.shape[1]:].tolist()):
            end = next((i + 1 for i, token in enumerate(sequence) if token in self.eos_ids), len(sequence))
            tokens = sequence[:end]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            completions.append(Completion(prompts[row // sampling.n], tokens, text))
        return completions
