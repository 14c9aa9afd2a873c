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

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from svf_rl.engines.hf import Sampling, chat_ids, generate_per_z
from svf_rl.inference.expert import Expert, ExpertError
from svf_rl.inputs import check_count, check_output, check_split
from svf_rl.loop.logprobs import completion_logprobs, make_token_batch
from svf_rl.policies.svf_layer import load_z, z_vectors
from svf_rl.rewards import first_label
from svf_rl.run_files import wilson_interval
from svf_rl.task import Task, load_task, safe_score

BASE = "base"  # the route of a prompt that no expert claims: the base model, z = 1
STRATEGIES = ("base", "oracle", "prompt", "classifier", "few-shot")
CLASSIFY_PROMPT = ("Which category does this question belong to? Categories:\n{options}\n- other: anything else\n\n"
                   "<question>\n{question}\n</question>\n\nAnswer with \\boxed{{category}} and nothing else.")


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
        if self.alphas:
            result["alphas"] = {str(k): v.tolist() for k, v in self.alphas.items()}
            result["search"] = {str(k): v for k, v in self.search.items()}
        return result


class Adapter:
    """A model with SVF layers, its experts (in z form, one per category) and an engine that generates."""

    def __init__(self, model, tokenizer, experts: dict[str, Expert], engine, max_new_tokens: int = 64):
        if not experts or BASE in experts or "other" in experts:
            raise ExpertError(f"adaptation needs at least one expert, none named {BASE!r} or 'other'")
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.experts, self.max_new_tokens = experts, max_new_tokens
        self.modules = list(next(iter(experts.values())).vectors)
        self.stack = {m: torch.stack([e.vectors[m].float() for e in experts.values()]) for m in self.modules}

    def mix(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """z' = Σₖ αₖ zₖ; alpha [experts] or [matrices, experts]."""
        alpha = torch.as_tensor(alpha, dtype=torch.float32)
        if alpha.dim() == 1:
            return {m: alpha @ self.stack[m] for m in self.modules}
        return {m: alpha[i] @ self.stack[m] for i, m in enumerate(self.modules)}

    def _prompts(self, items: list[Item]) -> list[list[int]]:
        return [chat_ids(self.tokenizer, item.task.prompt(item.row)) for item in items]

    def _greedy(self, max_new_tokens: int | None = None) -> Sampling:
        return Sampling(1, 0.0, 1.0, max_new_tokens or self.max_new_tokens)

    # First passes: each returns one route per item and what it cost.
    def route_by_prompt(self, items: list[Item], descriptions: dict[str, str] | None = None,
                        max_new_tokens: int = 16) -> tuple[list, PassCost]:
        descriptions = descriptions or {}
        options = "\n".join(f"- {name}" + (f": {descriptions[name]}" if name in descriptions else "")
                            for name in self.experts)
        prompts = [chat_ids(self.tokenizer, [{"role": "user", "content": CLASSIFY_PROMPT.format(
            options=options, question=item.question())}]) for item in items]
        cost, started = PassCost(), time.perf_counter()
        [completions] = generate_per_z(self.engine, [(None, prompts)], self._greedy(max_new_tokens))
        cost.add(started, completions)
        return [self.category(c.text) for c in completions], cost

    def category(self, text: str) -> str:
        """The boxed category if there is one, else the first category named; anything else is the base."""
        names = list(self.experts)
        boxed = text.split("\\boxed{", 1)[1].split("}", 1)[0] if "\\boxed{" in text else None
        found = first_label(boxed if boxed is not None else text, names)
        return found if found is not None else BASE

    def route_by_classifier(self, items: list[Item], classifier: Expert) -> tuple[list, PassCost]:
        task = classifier_task(classifier, list(self.experts))
        check_disjoint(classifier, task, items)
        prompts = [chat_ids(self.tokenizer, task.prompt({"text": item.question(), "labels": task.labels}))
                   for item in items]
        budget = int(classifier.config.get("max_new_tokens", 8))
        cost, started = PassCost(), time.perf_counter()
        [completions] = generate_per_z(self.engine, [(classifier.vectors, prompts)], self._greedy(budget))
        cost.add(started, completions)
        routes = [first_label(c.text, task.labels) for c in completions]
        return [r if r in self.experts else BASE for r in routes], cost

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
            # Likelihoods only where a tie decides: among the top scores or at the elites' boundary.
            ranked = sorted(accuracy, reverse=True)
            deciding = {score for score in (ranked[0], ranked[cem.elites - 1]) if accuracy.count(score) > 1}
            if best is not None and best[1] == ranked[0]:
                deciding.add(ranked[0])
            keys = [(acc, self.likelihood(a, pooled) if acc in deciding else 0.0)
                    for acc, a in zip(accuracy, candidates, strict=True)]
            cost.tokens += sum(acc in deciding for acc in accuracy) * sum(len(p) + len(c) for p, c in pooled)
            order = sorted(range(cem.population), key=lambda i: keys[i], reverse=True)
            elites = candidates[order[:cem.elites]]
            mean, std = elites.mean(0), elites.std(0, unbiased=False).clamp(min=cem.min_std)
            top = order[0]
            if best is None or accuracy[top] > best[1] or (
                    accuracy[top] == best[1] and keys[top][1] > self.likelihood(best[0], pooled)):
                best = (candidates[top], accuracy[top])
            cost.seconds += time.perf_counter() - started
            trace.append({"iteration": iteration, "best_score": accuracy[top],
                          "mean_score": sum(accuracy) / len(accuracy), "kept_score": best[1],
                          "alpha_mean": (mean.mean(0) if cem.per_layer else mean).tolist()})
        load_z(self.model, saved)  # the likelihoods left the last candidate's z in the model
        return best[0], trace, cost

    @torch.no_grad()
    def likelihood(self, alpha: torch.Tensor, pooled: list[tuple[list[int], list[int]]]) -> float:
        """Mean per-token log-likelihood of the pooled correct completions under z(α); 0 with none."""
        if not pooled:
            return 0.0
        load_z(self.model, self.mix(alpha))
        total = 0.0
        for start in range(0, len(pooled), 32):
            chunk = pooled[start:start + 32]
            batch = make_token_batch([p for p, _ in chunk], [c for _, c in chunk], self.tokenizer.pad_token_id)
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
                                              for route, indices in order.items()], self._greedy())
        completions = [None] * len(items)
        for indices, group in zip(order.values(), groups, strict=True):
            for index, completion in zip(indices, group, strict=True):
                completions[index] = completion
        cost.add(started, completions)
        scores = [safe_score(item.task, c.text, item.row) for item, c in zip(items, completions, strict=True)]
        return completions, scores, cost

    def run(self, strategy: str, items: list[Item], classifier: Expert | None = None,
            shots: dict[str, list[Item]] | None = None, cem: CEM | None = None,
            descriptions: dict[str, str] | None = None) -> Adaptation:
        """One strategy end to end. A name of an expert as `strategy` runs that expert alone on every prompt.
        few-shot: `shots` maps a route (a task, as in the paper, or one key for the whole mixture) to its shots;
        items go to the route of their category if it has shots, else to the single route."""
        first, alphas, search = PassCost(), {}, {}
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
        else:
            raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)} or an expert's name")
        completions, scores, second = self.answer(items, routes, zs)
        return Adaptation(strategy, routes, completions, scores, first, second, alphas, search)


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
    """Refuse a classifier whose training prompts include any evaluated prompt (Sakana's were drawn from the
    test sets): its training rows are rebuilt from the seed and size its file records."""
    size, seed = int(classifier.config.get("train_size", 5000)), int(classifier.config.get("seed", 0))
    seen = {row["text"] for row in task.rows("train", size, seed)}
    overlap = sum(item.question() in seen for item in items)
    if overlap:
        raise ExpertError(f"{overlap} of the {len(items)} evaluated prompts were among the classifier's training "
                          f"prompts; evaluate on a split it was not trained on")


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


def summary_line(result: dict) -> str:
    ratio = result["first_to_second_time"]
    extra = f", first pass {100 * ratio:.0f}% of the second" if ratio and not math.isnan(ratio) else ""
    return (f"{result['strategy']}: {100 * result['accuracy']:.1f}% [{100 * result['accuracy_low']:.1f}-"
            f"{100 * result['accuracy_high']:.1f}] on {result['n']}{extra}")


def split_expert_arg(arg: str) -> tuple[str, str]:
    """(name, path) of an expert argument: NAME=PATH gives NAME; runs/x/expert.safetensors gives x; other
    files their stem. A path that exists is a path, even with an "=" in it."""
    if "=" in arg and not Path(arg).exists():
        name, path = arg.split("=", 1)
        return name, path
    parts = arg.replace("\\", "/").rstrip("/").split("/")
    stem = parts[-1].rsplit(".", 1)[0]
    return (parts[-2] if stem in ("expert", "expert_best") and len(parts) > 1 else stem), arg


def expert_name(arg: str) -> str:
    return split_expert_arg(arg)[0]


def parse_descriptions(items: list[str]) -> dict[str, str]:
    """--describe NAME=TEXT ..."""
    if any("=" not in item for item in items):
        raise ValueError(f"--describe takes NAME=TEXT, got {next(i for i in items if '=' not in i)!r}")
    return dict(item.split("=", 1) for item in items)


def check_adaptation(names: list[str], strategy: str, classifier: str | None, split: str, size: int, shots: int,
                     shot_split: str, max_new_tokens: int | None, engine: str, descriptions: dict[str, str]) -> None:
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
    unknown = sorted(set(descriptions) - set(names))
    if unknown:
        raise ValueError(f"--describe names {unknown[0]!r}, which is not an expert ({', '.join(names)})")


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


def run_adaptation(experts: list[str], strategy: str, model: str | None = None, classifier: str | None = None,
                   split: str = "test", size: int = 100, seed: int = 0, shots: int = 16,
                   shot_split: str = "validation", mixture_shots: bool = False, cem: CEM | None = None,
                   max_new_tokens: int | None = None, engine: str = "hf", dtype: str = "auto",
                   output=None, descriptions: dict[str, str] | None = None, overwrite: bool = True) -> dict:
    """`svf-rl adapt`: the experts (paths, or NAME=PATH) on a mixture of their own tasks' `split` (`size`
    problems each, from the task each expert's file records), with one strategy. few-shot searches one α
    per task on `shots` problems of `shot_split` (as the paper does), or one α for the whole mixture.
    Everything that the arguments and files can show wrong fails in one line before the model loads; the
    JSON `output` replaces a file only with `overwrite`, an input never."""
    import json

    from svf_rl.inference.compose import check_same_base
    from svf_rl.inference.evaluate import experts_on_model, inference_engine, load_model
    from svf_rl.inference.expert import base_model_for, load_expert
    from svf_rl.run_files import write_atomic

    pairs = [split_expert_arg(e) for e in experts]
    names, paths = [name for name, _ in pairs], [path for _, path in pairs]
    if not names:
        raise ExpertError("adaptation needs at least one expert")
    descriptions = descriptions or {}
    check_adaptation(names, strategy, classifier, split, size, shots, shot_split, max_new_tokens, engine,
                     descriptions)
    loaded = [load_expert(p) for p in paths]
    classifier_expert = load_expert(classifier) if classifier else None
    check_same_base(loaded + ([classifier_expert] if classifier_expert else []),
                    names + ([str(classifier)] if classifier_expert else []))
    model = base_model_for(loaded[0], paths[0], model)
    budget = max_new_tokens or answer_budget(dict(zip(names, loaded, strict=True)))
    if output is not None:
        check_output(output, paths + ([classifier] if classifier else []), overwrite)
    tasks = {}
    for name, expert in zip(names, loaded, strict=True):
        if not expert.config.get("task"):
            raise ExpertError(f"{name} records no training task, so its test problems are unknown")
        tasks[name] = load_task(expert.config["task"], expert.config.get("task_args", {}))
    items = mixture(tasks, split, size, seed)  # bad task data fails here, before the model loads
    shot_items = shot_sets(tasks, shot_split, shots, seed + 1, mixture_shots) if strategy == "few-shot" else None
    if not items or (shot_items is not None and not all(shot_items.values())):
        raise ExpertError(f"the experts' tasks hold no problems in the {split if not items else shot_split} split")
    if classifier_expert is not None:  # its labels and training prompts, from its file
        check_disjoint(classifier_expert, classifier_task(classifier_expert, names), items)
    model_obj, tokenizer = load_model(model, dtype)
    together = experts_on_model(model_obj, loaded + ([classifier_expert] if classifier_expert else []),
                                names + (["classifier"] if classifier_expert else []))
    rollouts = inference_engine(engine, model_obj, tokenizer, model, seed)
    adapter = Adapter(model_obj, tokenizer, dict(zip(names, together[:len(names)], strict=True)), rollouts, budget)
    outcome = adapter.run(strategy, items, together[-1] if classifier_expert else None, shot_items, cem,
                          descriptions)
    result = {"experts": dict(zip(names, paths, strict=True)), "split": split, "max_new_tokens": budget,
              **outcome.report(items)}
    result["completions"] = [{"category": item.category, "route": str(route), "completion": c.text, "score": v}
                             for item, route, c, v in zip(items, outcome.routes, outcome.completions,
                                                          outcome.scores, strict=True)]
    if output is not None:
        write_atomic(Path(output), json.dumps(result, indent=2))
    return result
