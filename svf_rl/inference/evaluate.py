"""Score the base model, an expert or a composition of experts on a task's split.

Greedy accuracy with a 95% Wilson interval over distinct problems, and, from n samples per problem, the
unbiased pass@k of Chen et al. (2021): 1 − C(n−c, k) / C(n, k) for c correct samples, averaged over problems.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

from svf_rl.base_model import EMBEDDED_MODEL, cache_root, load_base_model, resolve_dtype, resolve_model_path
from svf_rl.engines.hf import Sampling, chat_ids
from svf_rl.inference.compose import check_alpha, check_mixing, check_same_base, compose
from svf_rl.inference.expert import Expert, ExpertError, as_scale_expert, base_model_for, load_expert
from svf_rl.inputs import check_count, check_model_id, check_output, check_split
from svf_rl.policies.svf_layer import apply_svf, load_z, svf_layers
from svf_rl.run_files import wilson_interval, write_atomic
from svf_rl.svd import model_fingerprint
from svf_rl.task import TaskError, load_task, safe_score, unique_rows


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from `samples` is correct."""
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def load_model(model: str, dtype: str = "auto"):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_base_model(model, resolve_dtype(dtype, device))  # on CPU: the SVD runs there, then .to(device)


def experts_on_model(model, experts: list[Expert], names: list[str] | None = None) -> list[Expert]:
    """Give the base model SVF layers for the experts' targets (once: a model that has them keeps them) and
    return the experts in z form, each checked against the model (names, sizes, base fingerprint) in one line.
    The layers keep W, so z = 1 is the base model's own weights in any dtype, as in a merged model."""
    names = names or [expert.task or f"expert {k}" for k, expert in enumerate(experts)]
    if not svf_layers(model):
        model.svf_base_fingerprint = model_fingerprint(model)  # of the plain model: SVF layers change it
        apply_svf(model, experts[0].targets, cache_dir=cache_root() / "svd", progress=False, keep_base=True)
        for layer in svf_layers(model).values():
            layer.z.requires_grad_(False)  # inference: forwards use W' as kept, with or without grad mode
    fingerprint = getattr(model, "svf_base_fingerprint", None) or model_fingerprint(model)
    layers = svf_layers(model)
    shapes = {name: layer.z.numel() for name, layer in layers.items()}
    resolved = []
    for expert, name in zip(experts, names, strict=True):
        try:
            expert.check_compatible(shapes, fingerprint, experts[0].targets)
        except ExpertError as err:
            raise ExpertError(f"{name}: {err}") from None
        resolved.append(as_scale_expert(expert, lambda module: layers[module].s))
    return resolved


def model_with_experts(model: str, experts: list[Expert], alpha=None, dtype: str = "auto", names=None,
                       mixing: str = "sum"):
    """(model, tokenizer, the applied expert or None): the base model, with SVF and the (composed) z if given."""
    model_obj, tokenizer = load_model(model, dtype)
    if not experts:
        return model_obj, tokenizer, None
    experts = experts_on_model(model_obj, experts, names)
    expert = experts[0] if len(experts) == 1 and alpha is None else compose(experts, alpha or [1.0 / len(experts)]
                                                                            * len(experts), names, mixing)
    load_z(model_obj, expert.vectors)
    return model_obj, tokenizer, expert


def check_engine(engine: str) -> None:
    if engine not in ("hf", "vllm"):
        raise ValueError(f"--engine must be hf or vllm, got {engine!r}")
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("--engine vllm needs vLLM, which is not installed: pip install -e '.[vllm]'")


def check_evaluation(experts: list[Expert], names: list[str], alpha, split: str, size: int, max_new_tokens: int,
                     samples: int, temperature: float, top_p: float, engine: str) -> None:
    """One line for any argument that cannot be evaluated, and for experts that cannot be mixed, before the
    model loads."""
    check_count("--size", size)
    check_count("--max-new-tokens", max_new_tokens)
    check_count("--samples", samples, 0)
    check_split("--split", split)
    if samples > 0 and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0 to sample (--samples {samples}), got "
                         f"{temperature}")
    if samples > 0:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    check_engine(engine)
    if experts:
        check_same_base(experts, names)
    if alpha is not None:
        if not experts:
            raise ValueError("--alpha weighs experts: give the expert files too")
        check_alpha(alpha, len(experts), list(experts[0].vectors))


def eval_target(experts: list[str], model: str | None, task: str | None, task_args: dict | None
                ) -> tuple[str, str, dict | None]:
    """(base model, task, task arguments) to evaluate: as given, else the (first) expert's own; the base model
    alone runs on the embedded model unless `model` says otherwise. The model is checked (one line)."""
    from svf_rl.inference.adapters import adapter_info, base_model_for_adapter, is_adapter_dir
    from svf_rl.policies.routing import is_routed_file, read_routed

    adapter = bool(experts) and is_adapter_dir(experts[0])
    routed = bool(experts) and is_routed_file(experts[0])
    if (adapter or routed) and len(experts) > 1:
        raise ValueError(f"{experts[0]} is a {'PEFT adapter' if adapter else 'routed policy'}; it is scored alone, "
                         "not composed")
    first = None if adapter or routed or not experts else load_expert(experts[0])
    config = adapter_info(experts[0]).get("config", {}) if adapter else (first.config if first else {})
    if adapter:
        model = base_model_for_adapter(experts[0], model)
    elif routed:
        info = read_routed(experts[0])[1]
        config, model = info["config"], model or info["base_model"]
        check_model_id(model)
    elif first is None:
        model = EMBEDDED_MODEL if model is None else model
        check_model_id(model)
    else:
        model = base_model_for(first, str(experts[0]), model)
    if task is None:  # the task the (first) expert or adapter was trained on, with its arguments
        if not experts or not config.get("task"):
            raise ValueError("give --task: " + ("the base model has no task of its own" if not experts
                                                 else f"{experts[0]} records no training task"))
        task = config["task"]
        task_args = config.get("task_args", {}) if task_args is None else task_args
    return model, task, task_args


def default_output(task: str, split: str) -> str:
    return f"eval_{task.replace('/', '_').replace(':', '_')}_{split}.json"


class ModelWeights:
    """The weights a colocated vLLM needs of an inference model: its SVF layers' W' at their z, and the listed
    plain layers (an adapter merged into them)."""

    def __init__(self, model, merged: list[str] = ()):
        self.model, self.merged = model, list(merged)

    def engine_weights(self):
        for name, layer in svf_layers(self.model).items():
            yield f"{name}.weight", layer.weight_for_inference()
        for name in self.merged:
            yield f"{name}.weight", self.model.get_submodule(name).weight


def inference_engine(kind: str, model, tokenizer, model_id: str, seed: int = 0, merged: list[str] = (),
                     routed=None):
    """The model on the GPU if there is one, and its engine: HF generate or a colocated vLLM. `routed`: the
    routed policy attached to the model; a sequence router's vLLM engine generates each prompt at its own weights."""
    from svf_rl.engines.hf import make_engine

    if torch.cuda.is_available():
        model.to("cuda")
    weights = routed if getattr(routed, "per_prompt", False) else ModelWeights(model, merged)
    return make_engine(kind, model, tokenizer, weights,
                       model_path=resolve_model_path(model_id) if kind == "vllm" else "", seed=seed)


@torch.no_grad()
def greedy_accuracy(task, rows: list[dict], tokenizer, engine, max_new_tokens: int, batch_size: int,
                    accelerator=None) -> dict:
    """Greedy accuracy on `rows` with its 95% Wilson interval, and each row's completion and score. With an
    `accelerator`, each rank scores its share of the rows and the counts are summed (`greedy` then holds this
    rank's)."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = rows[rank::world]
    # Every rank generates for as many rows (ZeRO-3 forwards are collective); the padding is not scored.
    share = -(-len(rows) // world)
    padded = mine + rows[:share - len(mine)]
    prompts = [chat_ids(tokenizer, task.prompt(row)) for row in padded]
    sampling = Sampling(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    completions = []
    for first in range(0, len(prompts), batch_size):
        completions += engine.generate(prompts[first:first + batch_size], sampling)
    completions = completions[:len(mine)]
    scores = score(task, mine, [c.text for c in completions])
    correct = sum(scores)
    if accelerator is not None:
        correct = accelerator.reduce(torch.tensor(float(correct), device=accelerator.device), "sum").item()
    low, high = wilson_interval(correct, len(rows))
    result = {"accuracy": correct / len(rows), "accuracy_low": low, "accuracy_high": high, "n": len(rows)}
    result["greedy"] = [{"prompt": task.prompt(row)[-1]["content"], "completion": c.text, "score": value}
                        for row, c, value in zip(mine, completions, scores, strict=True)]
    return result


def score(task, rows: list[dict], completions: list[str]) -> list[float]:
    return [safe_score(task, text, row) for row, text in zip(rows, completions, strict=True)]


def evaluate(model: str | None, task: str | None, experts: list[str] = (), alpha=None,
             task_args: dict | None = None, split: str = "test", size: int = 200, seed: int = 0,
             max_new_tokens: int = 64, samples: int = 0, temperature: float = 1.0, top_p: float = 1.0,
             engine: str = "hf", batch_size: int = 64, dtype: str = "auto", output: str | Path | None = None,
             overwrite: bool = True, mixing: str = "sum") -> dict:
    """Greedy accuracy (and pass@k from `samples` samples per problem, if > 0) of the model with the experts
    (none: the base model; several: composed with `alpha`, equal weights by default). `model` and `task`
    default to the first expert's own (eval_target). Written to `output` as JSON when given; an existing
    file is replaced only with `overwrite`, an expert file never. Bad input fails in one line before the model
    loads."""
    model, task, task_args = eval_target(list(experts), model, task, task_args)
    from svf_rl.inference.adapters import is_adapter_dir, merged_model
    from svf_rl.policies.routing import check_routed_engine, is_routed_file, routed_model

    adapter = bool(experts) and is_adapter_dir(experts[0])
    routed = bool(experts) and is_routed_file(experts[0])
    if (adapter or routed) and alpha is not None:
        raise ValueError("--alpha weighs SVF experts; a PEFT adapter or routed policy is scored as it is")
    if routed:
        check_routed_engine(experts[0], engine)
    check_mixing(mixing)
    loaded = [] if adapter or routed else [load_expert(path) for path in experts]
    check_evaluation(loaded, [str(p) for p in experts], alpha, split, size, max_new_tokens, samples, temperature,
                     top_p, engine)
    if output is not None:
        task_file = task.rpartition(":")[0]
        check_output(output, [*experts, *([task_file] if task_file.endswith(".py") else [])], overwrite)
    task_obj = load_task(task, task_args or {})
    rows = unique_rows(task_obj, task_obj.rows(split, size, seed), split)
    if not rows:
        raise TaskError(f"task {task_obj.name}: the {split} split holds no problems")
    policy = None  # a routed file's
    if adapter:
        (model_obj, tokenizer, merged), expert = merged_model(experts[0], model, dtype), None
    elif routed:
        (model_obj, tokenizer, policy), expert, merged = routed_model(experts[0], model, dtype), None, []
    else:
        (model_obj, tokenizer, expert), merged = model_with_experts(model, loaded, alpha, dtype,
                                                                    [str(p) for p in experts], mixing), []
    rollouts = inference_engine(engine, model_obj, tokenizer, model, seed, merged, policy)
    greedy = greedy_accuracy(task_obj, rows, tokenizer, rollouts, max_new_tokens, batch_size)
    result = {"model": model, "experts": [str(p) for p in experts], "alpha": alpha, "task": task_obj.name,
              "split": split, "n": len(rows), **{k: greedy[k] for k in ("accuracy", "accuracy_low", "accuracy_high")},
              "max_new_tokens": max_new_tokens}
    sources = [task_obj.source(row) for row in rows]
    if all(sources):  # a task of several (mixed): each source's own accuracy too
        per_source: dict[str, list[float]] = {}
        for source, item in zip(sources, greedy["greedy"], strict=True):
            per_source.setdefault(source, []).append(item["score"])
        result["per_source"] = {k: sum(v) / len(v) for k, v in sorted(per_source.items())}
    prompts = [chat_ids(tokenizer, task_obj.prompt(row)) for row in rows]
    if routed:  # which expert each source's tokens went to: prompt and greedy answer, teacher-forced
        from svf_rl.policies.routing import read_routed, routing_by_group

        groups: dict[str, list[tuple[list[int], list[int]]]] = {}
        for source, ids, item in zip(sources, prompts, greedy["greedy"], strict=True):
            answer = tokenizer(item["completion"], add_special_tokens=False).input_ids
            groups.setdefault(source or "all", []).append((ids, answer))
        result["routing"] = routing_by_group(model_obj, groups, read_routed(experts[0])[1]["labels"])
    if samples > 0:
        per_call = max(1, batch_size // samples)
        sampled = []
        for first in range(0, len(prompts), per_call):
            sampled += rollouts.generate(prompts[first:first + per_call],
                                         Sampling(samples, temperature, top_p, max_new_tokens))
        repeated = [row for row in rows for _ in range(samples)]
        hits_per_row = torch.tensor(score(task_obj, repeated, [c.text for c in sampled])).view(len(rows), samples)
        counts = (hits_per_row >= 1.0).sum(1).tolist()
        ks = sorted({1, samples} | {k for k in (2, 4, 8, 16) if k < samples})
        result["pass_at_k"] = {str(k): sum(pass_at_k(samples, c, k) for c in counts) / len(rows) for k in ks}
        result.update(samples=samples, temperature=temperature, top_p=top_p)
    if expert is not None:
        result["composition"] = expert.config.get("composition")
    result["greedy"] = greedy["greedy"]
    if output is not None:
        write_atomic(Path(output), json.dumps(result, indent=2))
    return result
