"""Transformer²'s two-pass inference: a first pass chooses or mixes experts for each prompt, a second answers.

First passes, as in the paper (Sun et al., 2025, §3.2) but without the faults of Sakana's code (DESIGN.md §9):
- prompt: the base model names each prompt's category, or "other", which runs the base model (z = 1);
- classifier: an expert trained by this trainer to name the category (a classification task such as
  task_classification); none of its training prompts may be in the evaluated set, which is checked;
- few-shot: CEM over α, one weight per expert or per expert and matrix, scored by the task's reward on shots
  from a split the evaluation does not use; equal scores go to the α under which the correct answers found so
  far are likelier.
The second pass generates with each prompt's z, one batch per distinct z, on any engine.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from svf_rl.engines.hf import Sampling, chat_ids, generate_per_z, left_pad
from svf_rl.inference.expert import Expert, ExpertError
from svf_rl.inputs import check_count, check_output, check_split
from svf_rl.loop.logprobs import completion_logprobs, make_token_batch, shares_prefix
from svf_rl.policies.mixture import PromptRouter, prompt_features
from svf_rl.policies.svf_layer import load_z, reference_mode, z_vectors
from svf_rl.rewards import first_label
from svf_rl.run_files import wilson_interval
from svf_rl.task import Task, load_task, safe_score

BASE = "base"  # the route of a prompt that no expert claims: the base model, z = 1
STRATEGIES = ("base", "oracle", "prompt", "classifier", "few-shot", "router")
FIRST_PASSES = ("score", "generate")  # the routers: score each category's log-prob, or generate and read
# The instructions first: what all prompts share is read once by the scored first pass.
CLASSIFY_PROMPT = ("Which category does this question belong to? Categories:\n{options}\n- other: anything else\n\n"
                   "Answer with \\boxed{{category}} and nothing else.\n\n<question>\n{question}\n</question>")


@dataclass
class Item:
    """One prompt of the evaluated set: its task, its row and the category (expert) it truly belongs to."""
    task: Task
    row: dict
    category: str

    def question(self) -> str:
        return self.task.prompt(self.row)[-1]["content"]


@dataclass
class CEM:
    """Cross-entropy search over α; Sakana's code used population 32, elite 0.2 and 50 iterations."""
    population: int = 32
    elite_fraction: float = 0.2
    iterations: int = 10
    per_layer: bool = False  # one α per expert and matrix instead of one per expert
    init_std: float = 0.5
    min_std: float = 0.05  # a floor: a few elites agree by chance long before the search is done
    seed: int = 0

    def __post_init__(self):
        check_count("--population", self.population, 2)
        check_count("--iterations", self.iterations)
        if not 0 < self.elite_fraction <= 1:  # also NaN
            raise ValueError(f"--elite-fraction must be in (0, 1], got {self.elite_fraction}")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"CEM init_std must be a finite number > 0, got {self.init_std}")

    @property
    def elites(self) -> int:
        return max(1, round(self.population * self.elite_fraction))


@dataclass
class PassCost:
    seconds: float = 0.0
    tokens: int = 0  # prompt and generated tokens processed

    def add(self, started: float, completions) -> None:
        self.seconds += time.perf_counter() - started
        self.tokens += sum(len(c.prompt_ids) + len(c.ids) for c in completions)


@dataclass
class Adaptation:
    strategy: str
    routes: list  # per prompt: an expert name, BASE, or a key of `alphas`
    completions: list
    scores: list[float]
    first: PassCost
    second: PassCost
    alphas: dict = field(default_factory=dict)  # few-shot: route key -> α found
    search: dict = field(default_factory=dict)  # few-shot: route key -> CEM trace
    gates: list = field(default_factory=list)  # router: per prompt, its gates (base first, then each expert)

    def report(self, items: list[Item]) -> dict:
        n, correct = len(items), sum(self.scores)
        low, high = wilson_interval(correct, n)
        per_task = defaultdict(list)
        for item, value in zip(items, self.scores, strict=True):
            per_task[item.category].append(value)
        routed = [r for r in self.routes if not isinstance(r, tuple)]
        result = {"strategy": self.strategy, "n": n, "accuracy": correct / n, "accuracy_low": low,
                  "accuracy_high": high, "per_task": {k: sum(v) / len(v) for k, v in per_task.items()},
                  "first_pass_seconds": self.first.seconds, "second_pass_seconds": self.second.seconds,
                  "first_pass_tokens": self.first.tokens, "second_pass_tokens": self.second.tokens,
                  "first_to_second_time": self.first.seconds / self.second.seconds if self.second.seconds else 0.0}
        if len(routed) == n:  # each prompt went to one expert (or the base): how often to its own?
            result["routed_to_own_expert"] = sum(r == i.category for r, i in zip(routed, items, strict=True)) / n
            result["routes"] = {route: routed.count(route) for route in sorted(set(routed))}
            own = defaultdict(list)  # each category's recall: its prompts sent to its own expert
            for route, item in zip(routed, items, strict=True):
                own[item.category].append(route == item.category)
            result["recall"] = {k: sum(v) / len(v) for k, v in own.items()}
        if self.gates:  # each category's mean gate per option (base first, then the experts)
            by_task = defaultdict(list)
            for item, gates in zip(items, self.gates, strict=True):
                by_task[item.category].append(gates)
            result["mean_gates"] = {k: [sum(col) / len(col) for col in zip(*v, strict=True)]
                                    for k, v in by_task.items()}
        if self.alphas:
            result["alphas"] = {str(k): v.tolist() for k, v in self.alphas.items()}
            result["search"] = {str(k): v for k, v in self.search.items()}
        return result


class Adapter:
    """A model with SVF layers, its experts (in z form, one per category) and an engine that generates."""

    def __init__(self, model, tokenizer, experts: dict[str, Expert], engine, max_new_tokens: int = 64,
                 mixing: str = "sum", first_pass: str = "score", first_pass_tokens: int = 256):
        taken = sorted(set(experts) & {*STRATEGIES, "other"})
        if not experts or taken:
            raise ExpertError(f"adaptation needs at least one expert, none named like a strategy or route "
                              f"({taken[0]!r})" if taken else "adaptation needs at least one expert")
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.experts, self.max_new_tokens, self.mixing = experts, max_new_tokens, mixing
        if first_pass not in FIRST_PASSES:
            raise ValueError(f"--first-pass must be one of {', '.join(FIRST_PASSES)}, got {first_pass!r}")
        self.first_pass, self.first_pass_tokens = first_pass, first_pass_tokens
        self.mixed_batches = False  # second pass: every route in the same batches, each row at its own z (HF)
        self.modules = list(next(iter(experts.values())).vectors)
        self.stack = {m: torch.stack([e.vectors[m].float() for e in experts.values()]) for m in self.modules}
        self.experts_index = {name: k for k, name in enumerate(experts)}

    def mix(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """z' = Σₖ αₖ zₖ, or 1 + Σₖ αₖ (zₖ − 1) when anchored; alpha [experts] or [matrices, experts]."""
        alpha = torch.as_tensor(alpha, dtype=torch.float32)
        rows = alpha.expand(len(self.modules), -1) if alpha.dim() == 1 else alpha
        if self.mixing == "anchored":
            return {m: 1 + row @ (self.stack[m] - 1) for row, m in zip(rows, self.modules, strict=True)}
        return {m: row @ self.stack[m] for row, m in zip(rows, self.modules, strict=True)}

    def _prompts(self, items: list[Item]) -> list[list[int]]:
        return [chat_ids(self.tokenizer, item.task.prompt(item.row)) for item in items]

    def _greedy(self, max_new_tokens: int | None = None) -> Sampling:
        return Sampling(1, 0.0, 1.0, max_new_tokens or self.max_new_tokens)

    # First passes: each returns one route per item and what it cost.
    def route_by_prompt(self, items: list[Item], descriptions: dict[str, str] | None = None,
                        max_new_tokens: int = 16) -> tuple[list, PassCost]:
        """The base model (z = 1) names each prompt's category: the likeliest of \\boxed{name} for each expert
        and \\boxed{other} (first_pass "score"), or what it writes in `max_new_tokens` ("generate")."""
        descriptions = descriptions or {}
        options = "\n".join(f"- {name}" + (f": {descriptions[name]}" if name in descriptions else "")
                            for name in self.experts)
        prompts = [chat_ids(self.tokenizer, [{"role": "user", "content": CLASSIFY_PROMPT.format(
            options=options, question=self._shortened(item.question()))}]) for item in items]
        cost, started = PassCost(), time.perf_counter()
        if self.first_pass == "score":
            labels = [*self.experts, "other"]
            with reference_mode(self.model):
                best = self._likeliest(prompts, [f"\\boxed{{{label}}}" for label in labels], cost)
            routes = [BASE if labels[i] == "other" else labels[i] for i in best]
        else:
            [completions] = generate_per_z(self.engine, [(None, prompts)], self._greedy(max_new_tokens))
            cost.tokens += sum(len(c.prompt_ids) + len(c.ids) for c in completions)
            routes = [self.category(c.text) for c in completions]
        cost.seconds += time.perf_counter() - started
        return routes, cost

    def category(self, text: str) -> str:
        """The category the answer names: the boxed text if there is a box, else the whole answer. An answer
        that names "other", no category or several goes to the base model."""
        return named_category(text, list(self.experts))

    def route_by_classifier(self, items: list[Item], classifier: Expert) -> tuple[list, PassCost]:
        """The classifier expert names each prompt's category: its likeliest label ("score"), or the first
        label it writes ("generate"); a label that is no expert's runs the base model."""
        task = classifier_task(classifier, list(self.experts))
        check_disjoint(classifier, task, items)
        prompts = [chat_ids(self.tokenizer, task.prompt({"text": self._shortened(item.question()),
                                                         "labels": task.labels})) for item in items]
        cost, started = PassCost(), time.perf_counter()
        if self.first_pass == "score":
            saved = z_vectors(self.model)
            try:
                load_z(self.model, classifier.vectors)
                routes = [task.labels[i] for i in self._likeliest(prompts, task.labels, cost)]
            finally:
                load_z(self.model, saved)
        else:
            budget = int(classifier.config.get("max_new_tokens", 8))
            [completions] = generate_per_z(self.engine, [(classifier.vectors, prompts)], self._greedy(budget))
            cost.tokens += sum(len(c.prompt_ids) + len(c.ids) for c in completions)
            routes = [first_label(c.text, task.labels) for c in completions]
        cost.seconds += time.perf_counter() - started
        return [r if r in self.experts else BASE for r in routes], cost

    @torch.no_grad()
    def route_by_router(self, items: list[Item], router: SequenceRouter) -> tuple[list, list, PassCost]:
        """A trained sequence router (a mixture's first pass) gives each prompt its gates from the base model's
        final hidden states, averaged over the prompt (PromptRouter): (per prompt its z, its gates, the cost)."""
        prompts = self._prompts(items)
        cost, started, gates = PassCost(), time.perf_counter(), []
        device = next(self.model.parameters()).device
        router.router.to(device)
        for start in range(0, len(prompts), 32):
            ids, mask = left_pad(prompts[start:start + 32], self.tokenizer.pad_token_id)
            gates += router.router(prompt_features(self.model, ids.to(device), mask.to(device))).cpu().tolist()
        cost.tokens += sum(map(len, prompts))
        cost.seconds += time.perf_counter() - started
        order = [self.experts_index[name] for name in router.names]
        zs = [{m: 1 + torch.tensor(g[1:]) @ (self.stack[m][order] - 1) for m in self.modules} for g in gates]
        return zs, gates, cost

    def _shortened(self, question: str) -> str:
        """At most `first_pass_tokens` tokens of the question: its start says what kind of task it is."""
        ids = self.tokenizer.encode(question, add_special_tokens=False)
        return question if len(ids) <= self.first_pass_tokens else self.tokenizer.decode(
            ids[:self.first_pass_tokens]) + " ..."

    def _likeliest(self, prompts: list[list[int]], answers: list[str], cost: PassCost) -> list[int]:
        """Per prompt, the index of the likeliest answer text under the model as it is, counting the tokens read."""
        tokens = [self.tokenizer.encode(answer, add_special_tokens=False) for answer in answers]
        shared = common_start(prompts) if shares_prefix(self.model) else 0  # read once
        cost.tokens += shared + sum(len(p) - shared for p in prompts) + len(prompts) * sum(map(len, tokens))
        return self.answer_logprobs(prompts, tokens).argmax(1).tolist()

    @torch.no_grad()
    def answer_logprobs(self, prompts: list[list[int]], answers: list[list[int]], chunk: int = 32) -> torch.Tensor:
        """log p(answer | prompt) for every prompt and answer, [prompts, answers]. What every prompt starts with
        (the first pass's instructions) runs once; then each prompt's own tokens, once; then its answers, from its
        keys and values."""
        if not shares_prefix(self.model):  # no plain key/value cache to share: whole sequences
            return torch.tensor([[completion_logprobs(self.model, make_token_batch(
                [p], [a], self.tokenizer.pad_token_id).to(self.model.device)).sum().item() for a in answers]
                for p in prompts])
        device, pad = next(self.model.parameters()).device, self.tokenizer.pad_token_id
        shared = common_start(prompts)
        prefix = self.model(input_ids=torch.tensor([prompts[0][:shared]], device=device),
                            use_cache=True).past_key_values if shared else None
        answer_ids, answer_mask = right_pad(answers, pad)
        answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
        rows = []
        for start in range(0, len(prompts), chunk):
            own_ids, own_mask = left_pad([p[shared:] for p in prompts[start:start + chunk]], pad)
            n, k = len(own_ids), len(answers)
            mask = torch.cat([own_mask.new_ones(n, shared), own_mask], 1).to(device)
            cache = copy.deepcopy(prefix) if prefix is not None else None
            if cache is not None:
                cache.batch_repeat_interleave(n)
            own = self.model(input_ids=own_ids.to(device), attention_mask=mask, use_cache=True,
                             position_ids=(mask.cumsum(1) - 1).clamp(min=0)[:, shared:], past_key_values=cache)
            first = torch.log_softmax(own.logits[:, -1].float(), -1)  # predicts each answer's first token
            logp = first.repeat_interleave(k, 0).gather(1, answer_ids[:, :1].repeat(n, 1))
            if answer_ids.shape[1] > 1:  # the answers' other tokens, every prompt's cache repeated for each answer
                cache = own.past_key_values
                cache.batch_repeat_interleave(k)
                full = torch.cat([mask.repeat_interleave(k, 0), answer_mask.repeat(n, 1)], 1)
                rest = self.model(input_ids=answer_ids[:, :-1].repeat(n, 1), attention_mask=full[:, :-1],
                                  position_ids=(full.cumsum(1) - 1)[:, mask.shape[1]:-1], past_key_values=cache,
                                  use_cache=True).logits
                later = torch.log_softmax(rest.float(), -1).gather(2, answer_ids[:, 1:].repeat(n, 1)[..., None])
                logp = torch.cat([logp, later.squeeze(-1)], 1)
            rows.append((logp * answer_mask.repeat(n, 1)).sum(1).cpu().view(n, k))
        return torch.cat(rows)

    def search_alpha(self, shots: list[Item], cem: CEM, max_new_tokens: int | None = None
                     ) -> tuple[torch.Tensor, list[dict], PassCost]:
        """CEM over α ∈ [0, 1] on the shots: the α with the best mean task score; equal scores go to the α
        under which the correct completions found so far (by any candidate) are likelier. The first population
        holds each expert alone and their uniform mix, so the search starts from (and never returns worse on
        the shots than) the best single expert."""
        k = len(self.experts)
        shape = (len(self.modules), k) if cem.per_layer else (k,)
        generator = torch.Generator().manual_seed(cem.seed)
        mean, std = torch.full(shape, 1.0 / k), torch.full(shape, cem.init_std)
        prompts, saved = self._prompts(shots), z_vectors(self.model)
        correct: list[dict[tuple, None]] = [{} for _ in shots]  # per shot, correct completions (ordered set)
        cost, trace, best = PassCost(), [], None
        try:
            for iteration in range(cem.iterations):
                started = time.perf_counter()
                candidates = (mean + std * torch.randn((cem.population, *shape), generator=generator)).clamp(0, 1)
                if iteration == 0:
                    anchors = torch.cat([torch.eye(k), torch.full((1, k), 1.0 / k)])[:cem.population]
                    candidates[:len(anchors)] = anchors[:, None, :].expand(-1, *shape) if cem.per_layer else anchors
                groups = generate_per_z(self.engine, [(self.mix(a), prompts) for a in candidates],
                                        self._greedy(max_new_tokens))
                accuracy = []
                for completions in groups:
                    values = [safe_score(s.task, c.text, s.row) for s, c in zip(shots, completions, strict=True)]
                    for pool, c, value in zip(correct, completions, values, strict=True):
                        if value >= 1.0:
                            pool.setdefault(tuple(c.ids), None)
                    accuracy.append(sum(values) / len(values))
                    cost.tokens += sum(len(c.prompt_ids) + len(c.ids) for c in completions)
                pooled = [(prompts[i], list(ids)) for i, pool in enumerate(correct) for ids in pool]

                def likelihood(alpha, pooled=pooled):  # its forwards are part of the first pass's cost
                    cost.tokens += sum(len(p) + len(c) for p, c in pooled)
                    return self.likelihood(alpha, pooled)

                # Likelihoods only where a tie decides: among the top scores or at the elites' boundary.
                ranked = sorted(accuracy, reverse=True)
                deciding = {score for score in (ranked[0], ranked[cem.elites - 1]) if accuracy.count(score) > 1}
                if best is not None and best[1] == ranked[0]:
                    deciding.add(ranked[0])
                keys = [(acc, likelihood(a) if acc in deciding else 0.0)
                        for acc, a in zip(accuracy, candidates, strict=True)]
                order = sorted(range(cem.population), key=lambda i: keys[i], reverse=True)
                elites = candidates[order[:cem.elites]]
                mean, std = elites.mean(0), elites.std(0, unbiased=False).clamp(min=cem.min_std)
                top = order[0]
                if best is None or accuracy[top] > best[1] or (
                        accuracy[top] == best[1] and keys[top][1] > likelihood(best[0])):
                    best = (candidates[top], accuracy[top])
                cost.seconds += time.perf_counter() - started
                trace.append({"iteration": iteration, "best_score": accuracy[top],
                              "mean_score": sum(accuracy) / len(accuracy), "kept_score": best[1],
                              "alpha_mean": (mean.mean(0) if cem.per_layer else mean).tolist()})
        finally:  # the likelihoods leave a candidate's z in the model; the engine must hold the model's weights
            load_z(self.model, saved)
            self.engine.update_weights()
        return best[0], trace, cost

    @torch.no_grad()
    def likelihood(self, alpha: torch.Tensor, pooled: list[tuple[list[int], list[int]]]) -> float:
        """Mean per-token log-likelihood of the pooled correct completions under z(α); 0 with none."""
        if not pooled:
            return 0.0
        load_z(self.model, self.mix(alpha))
        device, total = next(self.model.parameters()).device, 0.0
        for start in range(0, len(pooled), 32):
            chunk = pooled[start:start + 32]
            batch = make_token_batch([p for p, _ in chunk], [c for _, c in chunk], self.tokenizer.pad_token_id
                                     ).to(device)
            logp = completion_logprobs(self.model, batch) * batch.completion_mask
            total += (logp.sum(1) / batch.completion_mask.sum(1).clamp(min=1)).sum().item()
        return total / len(pooled)

    def answer(self, items: list[Item], routes: list, zs: dict) -> tuple[list, list[float], PassCost]:
        """Second pass: one greedy generate() per distinct route, each with its z (`zs[route]`)."""
        prompts = self._prompts(items)
        order = defaultdict(list)
        for index, route in enumerate(routes):
            order[route].append(index)
        cost, started = PassCost(), time.perf_counter()
        groups = generate_per_z(self.engine, [(zs[route], [prompts[i] for i in indices])
                                              for route, indices in order.items()], self._greedy(),
                                mixed=self.mixed_batches)
        completions = [None] * len(items)
        for indices, group in zip(order.values(), groups, strict=True):
            for index, completion in zip(indices, group, strict=True):
                completions[index] = completion
        cost.add(started, completions)
        scores = [safe_score(item.task, c.text, item.row) for item, c in zip(items, completions, strict=True)]
        return completions, scores, cost

    def run(self, strategy: str, items: list[Item], classifier: Expert | None = None,
            shots: dict[str, list[Item]] | None = None, cem: CEM | None = None,
            descriptions: dict[str, str] | None = None, router: SequenceRouter | None = None) -> Adaptation:
        """One strategy end to end. A name of an expert as `strategy` runs that expert alone on every prompt.
        few-shot: `shots` maps a route (a task, as in the paper, or one key for the whole mixture) to its shots;
        items go to the route of their category if it has shots, else to the single route."""
        first, alphas, search, gates = PassCost(), {}, {}, []
        zs = {BASE: None, **{name: expert.vectors for name, expert in self.experts.items()}}
        if strategy == "base" or strategy in self.experts:
            routes = [BASE if strategy == "base" else strategy] * len(items)
        elif strategy == "oracle":
            routes = [item.category for item in items]
        elif strategy == "prompt":
            routes, first = self.route_by_prompt(items, descriptions)
        elif strategy == "classifier":
            if classifier is None:
                raise ExpertError("the classifier strategy needs a classifier expert")
            routes, first = self.route_by_classifier(items, classifier)
        elif strategy == "few-shot":
            if not shots:
                raise ExpertError("the few-shot strategy needs shots")
            for key, key_shots in shots.items():
                alpha, search[key], cost = self.search_alpha(key_shots, cem or CEM())
                alphas[key] = alpha
                zs[("alpha", key)] = self.mix(alpha)
                first.seconds, first.tokens = first.seconds + cost.seconds, first.tokens + cost.tokens
            only = next(iter(shots)) if len(shots) == 1 else None
            routes = [("alpha", item.category if item.category in shots else only) for item in items]
            if any(key is None for _, key in routes):
                missing = sorted({item.category for item in items} - set(shots))
                raise ExpertError(f"few-shot: no shots for categories {missing}")
        elif strategy == "router":
            if router is None:
                raise ExpertError("the router strategy needs a sequence router (a mixture file)")
            per_prompt, gates, first = self.route_by_router(items, router)
            zs.update({("router", i): z for i, z in enumerate(per_prompt)})
            routes = [("router", i) for i in range(len(items))]
        else:
            raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)} or an expert's name")
        mixed, self.mixed_batches = self.mixed_batches, self.mixed_batches or strategy == "router"  # a z per prompt
        try:
            completions, scores, second = self.answer(items, routes, zs)
        finally:
            self.mixed_batches = mixed
        if strategy == "router":  # reported by its largest gate
            labels = [BASE, *router.names]
            routes = [labels[max(range(len(g)), key=g.__getitem__)] for g in gates]
        return Adaptation(strategy, routes, completions, scores, first, second, alphas, search, gates)


@dataclass
class SequenceRouter:
    """A trained mixture's sequence router, as a first pass over these experts (the mixture's own PromptRouter,
    with its top-k and centre); `names`: the experts of its options 1.., by their names here."""

    router: PromptRouter
    names: list[str]


def read_router(path: str | Path, experts: dict[str, Path], fingerprint: str) -> SequenceRouter:
    """A mixture file with a sequence router over exactly these expert files (by SHA-256), or one line why not."""
    import hashlib

    from svf_rl.policies.base import PolicyError
    from svf_rl.policies.mixture import SEQUENCE_ROUTER
    from svf_rl.policies.routing import read_routed

    try:
        tensors, info = read_routed(path)
    except PolicyError as err:
        raise ExpertError(f"--router: {err}") from None
    args = info["policy_args"]
    if info["policy"] != "mixture" or args.get("routing") != "sequence":
        raise ExpertError(f"--router: {path} is a {info['policy']} policy with routing={args.get('routing')!r}; "
                          f"the router strategy needs a mixture trained with policy_args.routing=sequence")
    if info["base_fingerprint"] != fingerprint:
        raise ExpertError(f"--router: {path} was trained on other base weights than the experts")
    by_sha = {hashlib.sha256(Path(p).read_bytes()).hexdigest(): name for name, p in experts.items()}
    recorded = args.get("expert_files", [])
    names = [by_sha.get(e.get("sha256")) for e in recorded]
    if not recorded or None in names:
        missing = next((e.get("path") for e, n in zip(recorded, names, strict=True) if n is None), "its experts")
        raise ExpertError(f"--router: {path} routes over {missing}, which is not among the experts given "
                          f"(matched by SHA-256); give the expert files it was trained with")
    weight, bias = tensors.get(f"{SEQUENCE_ROUTER}.weight"), tensors.get(f"{SEQUENCE_ROUTER}.bias")
    if weight is None or bias is None or weight.shape[0] != len(names) + 1 or bias.shape != weight.shape[:1]:
        raise ExpertError(f"--router: {path} holds no sequence router over its {len(names)} experts")
    centre = tensors.get(f"{SEQUENCE_ROUTER}.centre", torch.zeros(weight.shape[1]))  # none: written uncentred
    if centre.shape != weight.shape[1:]:
        raise ExpertError(f"--router: {path}'s router centre has shape {tuple(centre.shape)}, its router reads "
                          f"{weight.shape[1]} features")
    router = PromptRouter(weight.shape[1], weight.shape[0], int(args.get("top_k", 0)))
    router.load_state_dict({"weight": weight.float(), "bias": bias.float(), "centre": centre.float()})
    return SequenceRouter(router.requires_grad_(False), names)


def classifier_task(classifier: Expert, categories: list[str]) -> Task:
    """The task the classifier expert was trained on, rebuilt from its file; its labels must name every
    category (an extra label, if chosen, runs the base model)."""
    task_name, task_args = classifier.config.get("task"), classifier.config.get("task_args", {})
    if not task_name:
        raise ExpertError("the classifier expert records no training task; train it with svf-rl train")
    task = load_task(task_name, task_args)
    labels = getattr(task, "labels", None)
    if not labels:
        raise ExpertError(f"the classifier's task {task_name!r} has no labels: it must be a classification task "
                          f"(rows {{'text', 'label', 'labels'}}, like task_classification)")
    missing = sorted(set(categories) - set(labels))
    if missing:
        raise ExpertError(f"the classifier names {labels}, not the categories {missing}; train it with sources "
                          f"named like the experts")
    return task


def check_disjoint(classifier: Expert, task: Task, items: list[Item]) -> None:
    """Refuse a classifier whose training rows hold any evaluated problem (Sakana's were drawn from the test
    sets), whatever instruction either put around it: its training rows are rebuilt from the seed and size its
    file records, and problems compared by their data (Task.problem)."""
    size, seed = int(classifier.config.get("train_size", 5000)), int(classifier.config.get("seed", 0))
    seen = {row.get("problem", row["text"]) for row in task.rows("train", size, seed)}
    overlap = sum(item.task.problem(item.row) in seen or item.question() in seen for item in items)
    if overlap:
        raise ExpertError(f"{overlap} of the {len(items)} evaluated problems were among the classifier's training "
                          f"problems; evaluate on a split it was not trained on")


def mixture(tasks: dict[str, Task], split: str, size: int, seed: int) -> list[Item]:
    """`size` distinct problems of each category's task, in category order."""
    from svf_rl.task import unique_rows

    return [Item(task, row, name) for name, task in tasks.items()
            for row in unique_rows(task, task.rows(split, size, seed), split)]


def shot_sets(tasks: dict[str, Task], split: str, shots: int, seed: int, one_for_mixture: bool
              ) -> dict[str, list[Item]]:
    """Few-shot search sets: `shots` problems of each task's `split`, or `shots` drawn across all tasks (one α
    for the whole mixture, searched without task identity)."""
    per_task = {name: mixture({name: task}, split, shots, seed) for name, task in tasks.items()}
    if not one_for_mixture:
        return per_task
    every = [item for group in per_task.values() for item in group]
    return {"mixture": every[::len(tasks)] if len(every) > shots else every}


def common_start(prompts: list[list[int]]) -> int:
    """How many tokens every prompt starts with, leaving each at least one of its own."""
    shared = 0
    while shared < min(map(len, prompts)) - 1 and len({p[shared] for p in prompts}) == 1:
        shared += 1
    return shared


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
    return ids, torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])


def named_category(text: str, names: list[str]) -> str:
    """The one category an answer names (whole words, any case): the first \\boxed{...} if there is one, else
    the whole answer. "other", no category or several: the base model."""
    boxed = re.search(r"\\boxed\{([^{}]*)\}", text)
    where = boxed.group(1) if boxed else text
    named = {name for name in [*names, "other"] if re.search(rf"\b{re.escape(name)}\b", where, re.IGNORECASE)}
    return named.pop() if len(named) == 1 and "other" not in named else BASE


def summary_line(result: dict) -> str:
    ratio = result["first_to_second_time"]
    extra = f", first pass {100 * ratio:.0f}% of the second" if ratio and not math.isnan(ratio) else ""
    return (f"{result['strategy']}: {100 * result['accuracy']:.1f}% [{100 * result['accuracy_low']:.1f}-"
            f"{100 * result['accuracy_high']:.1f}] on {result['n']}{extra}")


def split_expert_arg(arg: str) -> tuple[str, str]:
    """(name, path) of an expert argument: NAME=PATH gives NAME; runs/x/expert.safetensors gives x; other
    files their stem. A path that exists, or whose "=" comes after a "/", is a path."""
    name, sep, path = arg.partition("=")
    if sep and not Path(arg).exists() and not any(ch in name for ch in "/\\"):  # runs/lr=1/... is a path
        return name, path
    parts = arg.replace("\\", "/").rstrip("/").split("/")
    stem = parts[-1].rsplit(".", 1)[0]
    return (parts[-2] if stem in ("expert", "expert_best") and len(parts) > 1 else stem), arg


def expert_name(arg: str) -> str:
    return split_expert_arg(arg)[0]


def parse_named(items: list[str], option: str = "--describe", value: str = "TEXT") -> dict[str, str]:
    """--describe NAME=TEXT ... (or another option's NAME=VALUE pairs), each name once."""
    if any("=" not in item for item in items):
        raise ValueError(f"{option} takes NAME={value}, got {next(i for i in items if '=' not in i)!r}")
    pairs = [item.split("=", 1) for item in items]
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"{option} names {next(n for n in names if names.count(n) > 1)!r} twice")
    return dict(pairs)



def check_adaptation(names: list[str], strategy: str, classifier: str | None, split: str, size: int, shots: int,
                     shot_split: str, max_new_tokens: int | None, engine: str, descriptions: dict[str, str],
                     task_specs: dict | None = None, task_args: dict | None = None, router: str | None = None) -> None:
    """One line for any argument `svf-rl adapt` cannot use, before a file is read or the model loads."""
    from svf_rl.inference.evaluate import check_engine

    if any(not name for name in names):
        raise ExpertError("an expert name is empty; give NAME=PATH with a name")
    if len(set(names)) != len(names):
        raise ExpertError(f"expert names must differ (give NAME=PATH): {names}")
    taken = sorted(set(names) & {*STRATEGIES, "other"})  # "base" and "other" route to the base model
    if taken:
        raise ExpertError(f"an expert cannot be named {taken[0]!r}, which is a strategy or route; give NAME=PATH")
    if strategy not in STRATEGIES and strategy not in names:
        raise ValueError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)} or an expert's name "
                         f"({', '.join(names)})")
    if strategy == "classifier" and not classifier:
        raise ValueError("--strategy classifier needs --classifier, the classifier expert file")
    if classifier and strategy != "classifier":
        raise ValueError(f"--classifier is used only by --strategy classifier, not {strategy!r}")
    if strategy == "router" and not router:
        raise ValueError("--strategy router needs --router, a mixture file trained with policy_args.routing=sequence")
    if router and strategy != "router":
        raise ValueError(f"--router is used only by --strategy router, not {strategy!r}")
    if strategy == "router" and engine != "hf":
        raise ValueError("--strategy router gives each prompt its own z, which only the HF engine batches; use "
                         "--engine hf")
    check_split("--split", split)
    check_count("--size", size)
    if strategy == "few-shot":
        check_split("--shot-split", shot_split)
        check_count("--shots", shots)
        if shot_split == split:
            raise ExpertError(f"few-shot shots must come from another split than the evaluated {split!r}")
    if max_new_tokens is not None:
        check_count("--max-new-tokens", max_new_tokens)
    check_engine(engine)
    if descriptions and strategy != "prompt":
        raise ValueError(f"--describe is used only by --strategy prompt, not {strategy!r}")
    for option, given in (("--describe", descriptions), ("--task", task_specs), ("--task-args", task_args)):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"{option} names {unknown[0]!r}, which is not an expert ({', '.join(names)})")


def expert_task(name: str, expert: Expert, specs: dict[str, str], args: dict[str, dict]) -> Task:
    """The task whose problems an expert answers: as given for its name, else the one its file records."""
    recorded = expert.config.get("task")
    spec = specs.get(name) or recorded
    if not spec:
        raise ExpertError(f"{name} records no training task, so its problems are unknown; give --task {name}=TASK")
    return load_task(spec, args.get(name, expert.config.get("task_args", {}) if spec == recorded else {}))


def answer_budget(experts: dict[str, Expert]) -> int:
    """The largest of the experts' training budgets (max_new_tokens in their config), 64 where none is recorded."""
    budgets = []
    for name, expert in experts.items():
        value = expert.config.get("max_new_tokens", 64)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExpertError(f"{name} records max_new_tokens {value!r}, not a positive whole number; give "
                              f"--max-new-tokens")
        budgets.append(value)
    return max(budgets)


class UserPrompts(Task):
    """Prompts a user gives (`--prompts FILE.jsonl`): no task, no gold answer, nothing scored."""
    name = "prompts"

    def user_message(self, row: dict) -> str:
        return row["prompt"]

    def prompt(self, row: dict) -> list[dict]:
        return row["messages"] if "messages" in row else super().prompt(row)

    def score(self, completion: str, row: dict) -> float:
        return 0.0


def read_prompts(path: str | Path) -> list[dict]:
    """JSON lines, each {"prompt": text} or {"messages": [{"role", "content"}, ..., a user turn last]}, with any
    other fields (kept in the answers); a line that is neither is one line naming it."""
    import json

    from svf_rl.inputs import check_input_file

    path = check_input_file(path, "--prompts")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {path} is not UTF-8 text") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--prompts {path} line {number}"
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{where} is not JSON: {err}") from None
        if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
            raise ValueError(f"{where} must be an object with either \"prompt\" or \"messages\"")
        if "prompt" in row and not (isinstance(row["prompt"], str) and row["prompt"].strip()):
            raise ValueError(f"{where}: \"prompt\" must be non-empty text")
        messages = row.get("messages")
        if messages is not None and not (
                isinstance(messages, list) and messages
                and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                        for m in messages) and messages[-1]["role"] == "user"):
            raise ValueError(f"{where}: \"messages\" must be a list of {{role, content}} ending with a user turn")
        rows.append(row)
    if not rows:
        raise ValueError(f"--prompts {path} holds no prompts")
    return rows


def found_experts(outcome: Adaptation, experts: dict[str, Expert], mixing: str) -> dict[str, tuple[Expert, object]]:
    """Few-shot's α per route as (a composed expert, the weights in compose --alpha-file's format)."""
    from svf_rl.inference.compose import compose

    modules, found = list(next(iter(experts.values())).vectors), {}
    for key, alpha in outcome.alphas.items():
        weights = (alpha.tolist() if alpha.dim() == 1
                   else {m: row.tolist() for m, row in zip(modules, alpha, strict=True)})
        expert = compose(list(experts.values()), weights, list(experts), mixing)
        expert.config["composition"]["found_by"] = {"strategy": "few-shot", "route": str(key),
                                                    "search": outcome.search.get(key, [])[-1:]}
        found[str(key)] = (expert, weights)
    return found


def run_adaptation(experts: list[str], strategy: str, model: str | None = None, classifier: str | None = None,
                   split: str = "test", size: int = 100, seed: int = 0, shots: int = 16,
                   shot_split: str = "validation", mixture_shots: bool = False, cem: CEM | None = None,
                   max_new_tokens: int | None = None, engine: str = "hf", dtype: str = "auto",
                   output=None, descriptions: dict[str, str] | None = None, overwrite: bool = True,
                   task_specs: dict[str, str] | None = None, task_args: dict[str, dict] | None = None,
                   mixing: str = "sum", save_experts: str | Path | None = None,
                   prompts: str | Path | None = None, first_pass: str = "score", first_pass_tokens: int = 256,
                   router: str | Path | None = None) -> dict:
    """`svf-rl adapt`: the experts (paths, or NAME=PATH) on a mixture of their own tasks' `split` (`size`
    problems each, from the task each expert's file records), with one strategy. few-shot searches one α
    per task on `shots` problems of `shot_split` (as the paper does), or one α for the whole mixture.

    `prompts` (a JSON-lines file): answer those prompts instead, recording each one's route or α; they have no
    task, so few-shot searches one α for all of them on the experts' tasks, and oracle cannot run. The output
    is then JSON lines, one answer per prompt.

    Everything that the arguments and files can show wrong fails in one line before the model loads; the
    output replaces a file only with `overwrite`, an input never. `task_specs` and `task_args` give an expert
    (by name) its task where its file records none (an import, a mix of tasks) or another. `save_experts`:
    a directory for few-shot's α, each as an expert file and as compose's --alpha-file JSON."""
    import json

    from svf_rl.inference.compose import check_mixing, check_same_base
    from svf_rl.inference.evaluate import experts_on_model, inference_engine, load_model
    from svf_rl.inference.expert import base_model_for, load_expert, save_expert
    from svf_rl.run_files import write_atomic

    pairs = [split_expert_arg(e) for e in experts]
    names, paths = [name for name, _ in pairs], [path for _, path in pairs]
    if not names:
        raise ExpertError("adaptation needs at least one expert")
    descriptions = descriptions or {}
    check_adaptation(names, strategy, classifier, split, size, shots, shot_split, max_new_tokens, engine,
                     descriptions, task_specs or {}, task_args or {}, router)
    check_mixing(mixing)
    if first_pass not in FIRST_PASSES:
        raise ValueError(f"--first-pass must be one of {', '.join(FIRST_PASSES)}, got {first_pass!r}")
    check_count("--first-pass-tokens", first_pass_tokens)
    if prompts is not None and strategy == "oracle":
        raise ValueError("--strategy oracle needs each prompt's task; your prompts have none (use prompt, "
                         "classifier, few-shot, base or an expert's name)")
    if save_experts is not None and strategy != "few-shot":
        raise ValueError(f"--save-experts keeps what few-shot finds; --strategy {strategy} finds no α")
    user_rows = read_prompts(prompts) if prompts is not None else None
    inputs = paths + [path for path in (classifier, prompts, router) if path]
    loaded = [load_expert(p) for p in paths]
    classifier_expert = load_expert(classifier) if classifier else None
    check_same_base(loaded + ([classifier_expert] if classifier_expert else []),
                    names + ([str(classifier)] if classifier_expert else []))
    first_router = (read_router(router, dict(zip(names, map(Path, paths), strict=True)), loaded[0].base_fingerprint)
                    if router else None)
    model = base_model_for(loaded[0], paths[0], model)
    budget = max_new_tokens or answer_budget(dict(zip(names, loaded, strict=True)))
    if output is not None:
        check_output(output, inputs, overwrite)
    mixture_shots = mixture_shots or user_rows is not None  # prompts without a task: one α for all of them
    if user_rows is None or strategy == "few-shot":  # only then are the experts' tasks read
        tasks = {name: expert_task(name, expert, task_specs or {}, task_args or {})
                 for name, expert in zip(names, loaded, strict=True)}
    if user_rows is not None:
        items = [Item(UserPrompts(), row, "") for row in user_rows]
    else:
        items = mixture(tasks, split, size, seed)  # bad task data fails here, before the model loads
    shot_items = shot_sets(tasks, shot_split, shots, seed + 1, mixture_shots) if strategy == "few-shot" else None
    if not items or (shot_items is not None and not all(shot_items.values())):
        raise ExpertError(f"the experts' tasks hold no problems in the {split if not items else shot_split} split")
    if save_experts is not None:
        for key in shot_items:
            for suffix in (".safetensors", ".alpha.json"):
                check_output(Path(save_experts) / f"{key}{suffix}", inputs, overwrite)
    if classifier_expert is not None:  # its labels, and for the experts' problems its training rows
        task = classifier_task(classifier_expert, names)
        if user_rows is None:
            check_disjoint(classifier_expert, task, items)
    model_obj, tokenizer = load_model(model, dtype)
    together = experts_on_model(model_obj, loaded + ([classifier_expert] if classifier_expert else []),
                                names + (["classifier"] if classifier_expert else []))
    rollouts = inference_engine(engine, model_obj, tokenizer, model, seed)
    in_z = dict(zip(names, together[:len(names)], strict=True))
    adapter = Adapter(model_obj, tokenizer, in_z, rollouts, budget, mixing, first_pass, first_pass_tokens)
    outcome = adapter.run(strategy, items, together[-1] if classifier_expert else None, shot_items, cem,
                          descriptions, first_router)
    found = found_experts(outcome, in_z, mixing)
    if save_experts is not None:
        for key, (expert, weights) in found.items():
            save_expert(expert, Path(save_experts) / f"{key}.safetensors")
            write_atomic(Path(save_experts) / f"{key}.alpha.json", json.dumps(weights, indent=1))
    if user_rows is not None:
        answers = [{**row, "route": route[1] if isinstance(route, tuple) else route, "answer": c.text,
                    **({"alpha": outcome.alphas[route[1]].tolist()} if isinstance(route, tuple) else {}),
                    **({"gates": outcome.gates[i]} if outcome.gates else {})}
                   for i, (row, route, c) in enumerate(zip(user_rows, outcome.routes, outcome.completions,
                                                           strict=True))]
        result = {"strategy": strategy, "n": len(answers), "mixing": mixing, "first_pass": first_pass,
                  "answers": answers,
                  "routes": {r: sum(a["route"] == r for a in answers) for r in sorted({a["route"] for a in answers})},
                  "first_pass_seconds": outcome.first.seconds, "second_pass_seconds": outcome.second.seconds,
                  "first_pass_tokens": outcome.first.tokens, "second_pass_tokens": outcome.second.tokens}
        if output is not None:
            write_atomic(Path(output), "".join(json.dumps(a) + "\n" for a in answers))
        return result
    result = {"experts": dict(zip(names, paths, strict=True)), "split": split, "max_new_tokens": budget,
              "mixing": mixing, "first_pass": first_pass, **outcome.report(items)}
    result["completions"] = [{"category": item.category, "route": str(route), "completion": c.text, "score": v}
                             for item, route, c, v in zip(items, outcome.routes, outcome.completions,
                                                          outcome.scores, strict=True)]
    if output is not None:
        write_atomic(Path(output), json.dumps(result, indent=2))
    return result
