"""A vLLM engine for a policy whose weights follow the prompt.

A sequence-routed mixture gives each prompt its own SVF expert, z(x) = 1 + Σₖ gₖ(x)(zₖ − 1), from a first pass over
the prompt, while vLLM holds one set of weights. So each generate() routes its prompts at once, on the trainer's
model, then pushes each route's weights and generates that route's prompts; prompts with the same gates share a
push. Nothing is pushed after an optimiser step: every generate() pushes its own routes. Each distinct route
costs a weight reload; the HF engine routes inside its batches instead.
"""

from __future__ import annotations

import dataclasses

from svf_rl.engines.hf import Completion, Sampling


class PerPromptEngine:
    def __init__(self, engine, policy):
        self.engine, self.policy, self.model = engine, policy, engine.model

    def update_weights(self) -> None:
        """Nothing to push after a step: generate() pushes each route's weights."""

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        gates = self.policy.prompt_gates(prompts, sampling.n)
        routes: dict[tuple, list[int]] = {}
        for index, row in enumerate([None] * len(prompts) if gates is None else gates.tolist()):
            routes.setdefault(None if row is None else tuple(row), []).append(index)
        out: list[list[Completion]] = [[] for _ in prompts]
        for indices in routes.values():
            with self.policy.at_gates(None if gates is None else gates[indices[0]]):
                self.engine.update_weights()
            seeds = None if sampling.seeds is None else [sampling.seeds[i] for i in indices]
            completions = self.engine.generate([prompts[i] for i in indices],
                                               dataclasses.replace(sampling, seeds=seeds))
            for position, index in enumerate(indices):
                out[index] = completions[position * sampling.n:(position + 1) * sampling.n]
        return [completion for group in out for completion in group]
