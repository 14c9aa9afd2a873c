"""Transformer² Table-2 analogue on the embedded default: experts for three reasoning-gym tasks, evaluated on a
held-out mixture of those tasks with each first-pass strategy.

First train the experts and the classifier (about 10 minutes each on 2 CPU cores):

    for n in arithmetic gcd counting classifier; do svf-rl train --config launch/experts/$n.yaml; done
    python benchmarks/adaptation.py            # writes benchmarks/adaptation.json and prints the table

With a sequence-routed mixture over the experts (`python benchmarks/mixtures.py --only 6`), its router is one
more first pass (`--router`).

Every row runs in this one process on the same prompts: the test split of each task (100 distinct problems
each), greedy, 12 new tokens. Few-shot draws its shots from the validation splits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from svf_rl.engines.hf import HFEngine
from svf_rl.inference.adapt import BASE, CEM, Adapter, expert_name, mixture, read_router, shot_sets
from svf_rl.inference.evaluate import experts_on_model, load_model
from svf_rl.inference.expert import load_expert
from svf_rl.run_files import write_atomic
from svf_rl.task import load_task

EXPERTS = ["runs/experts/arithmetic/expert.safetensors", "runs/experts/gcd/expert.safetensors",
           "runs/experts/counting/expert.safetensors"]
CLASSIFIER = "runs/experts/classifier/expert.safetensors"
DESCRIPTIONS = {"arithmetic": "calculate an arithmetic expression", "gcd": "greatest common divisor of numbers",
                "counting": "count how often a letter appears in a text"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", nargs="+", default=EXPERTS)
    parser.add_argument("--classifier", default=CLASSIFIER)
    parser.add_argument("--size", type=int, default=100, help="test problems per task")
    parser.add_argument("--shots", type=int, default=16, help="few-shot: validation problems per search")
    parser.add_argument("--population", type=int, default=12)
    parser.add_argument("--elite-fraction", type=float, default=0.25)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--router", default="benchmarks/mixtures/config_6/seed_0/mixture.safetensors",
                        help="a sequence-routed mixture over the experts (benchmarks/mixtures.py --only 6)")
    parser.add_argument("--only", nargs="+", help="run only these strategies or rows (e.g. few-shot, mixture)")
    parser.add_argument("--output", default="benchmarks/adaptation.json")
    args = parser.parse_args()
    torch.manual_seed(0)

    names = [expert_name(p) for p in args.experts]
    loaded = [load_expert(p) for p in args.experts]
    classifier = load_expert(args.classifier) if Path(args.classifier).is_file() else None  # its rows need it
    tasks = {n: load_task(e.config["task"], e.config.get("task_args", {})) for n, e in zip(names, loaded, strict=True)}
    items = mixture(tasks, "test", args.size, 0)
    per_task_shots = shot_sets(tasks, "validation", args.shots, 1, one_for_mixture=False)
    mixture_shots = shot_sets(tasks, "validation", args.shots, 1, one_for_mixture=True)

    model, tokenizer = load_model(loaded[0].base_model, "auto")
    resolved = experts_on_model(model, loaded + ([classifier] if classifier else []),
                                names + (["classifier"] if classifier else []))
    budget = max(int(e.config.get("max_new_tokens", 64)) for e in loaded)
    adapter = Adapter(model, tokenizer, dict(zip(names, resolved[:len(names)], strict=True)),
                      HFEngine(model, tokenizer), budget)
    cem = CEM(args.population, args.elite_fraction, args.iterations)
    score, generate, anchored = {"first_pass": "score"}, {"first_pass": "generate"}, {"mixing": "anchored"}
    # (row, strategy, run()'s arguments, Adapter settings)
    runs = [("base model", "base", {}, {}), *[(f"{n} expert", n, {}, {}) for n in names],
            ("oracle routing", "oracle", {}, {}),
            ("oracle routing, every expert in one batch", "oracle", {}, {"mixed_batches": True}),
            ("prompt, labels scored", "prompt", {"descriptions": DESCRIPTIONS}, score),
            ("prompt, generated", "prompt", {"descriptions": DESCRIPTIONS}, generate),
            *([("classifier expert, labels scored", "classifier", {"classifier": resolved[-1]}, score),
               ("classifier expert, generated", "classifier", {"classifier": resolved[-1]}, generate)]
              if classifier else []),
            ("few-shot CEM, one α for the mixture", "few-shot", {"shots": mixture_shots, "cem": cem}, {}),
            ("few-shot CEM, one α for the mixture, anchored", "few-shot", {"shots": mixture_shots, "cem": cem},
             anchored),
            ("few-shot CEM, α per task (given each prompt's true task)", "few-shot",
             {"shots": per_task_shots, "cem": cem}, {}),
            ("few-shot CEM, α per task (given each prompt's true task), anchored", "few-shot",
             {"shots": per_task_shots, "cem": cem}, anchored)]
    if Path(args.router).is_file():  # a learned first pass: the mixture's sequence router, trained by RL
        router = read_router(args.router, dict(zip(names, map(Path, args.experts), strict=True)),
                             loaded[0].base_fingerprint)
        runs.append(("sequence router, trained by RL (a mixture's first pass)", "router", {"router": router}, {}))
    results = []
    chosen = [r for r in runs if not args.only or any(o == r[1] or o in r[0] for o in args.only)]
    for label, strategy, kwargs, settings in chosen:
        adapter.first_pass, adapter.mixing = settings.get("first_pass", "score"), settings.get("mixing", "sum")
        adapter.mixed_batches = settings.get("mixed_batches", False)
        started = time.perf_counter()
        outcome = adapter.run(strategy, items, **kwargs)
        report = {"row": label, **outcome.report(items), "wall_seconds": time.perf_counter() - started,
                  **settings}
        results.append(report)
        print(row(report, names), flush=True)
    config = {"experts": dict(zip(names, args.experts, strict=True)), "classifier": args.classifier,
              "size": args.size, "shots": args.shots, "cem": vars(cem), "max_new_tokens": budget,
              "threads": torch.get_num_threads()}
    write_atomic(Path(args.output), json.dumps({"config": config, "results": results}, indent=2))
    print(f"\n{header(names)}")
    for report in results:
        print(row(report, names))


def header(names: list[str]) -> str:
    columns = ["", "mixture (95% CI)", *names, "to own expert", "first pass / second"]
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def row(report: dict, names: list[str]) -> str:
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    own = report.get("routed_to_own_expert")
    routes = report.get("routes", {})
    to_base = f", {routes[BASE]} to base" if routes.get(BASE) else ""
    cost = report["first_to_second_time"]
    return (f"| {report['row']} | {pct(report['accuracy'])} [{pct(report['accuracy_low'])}-"
            f"{pct(report['accuracy_high'])}] | " + " | ".join(pct(report["per_task"][n]) for n in names)
            + f" | {pct(own) + '%' + to_base if own is not None else '—'} | {f'{100 * cost:.0f}%' if cost else '—'} |")


if __name__ == "__main__":
    main()
