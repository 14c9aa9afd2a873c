"""Routed policies on the adaptation benchmark's three tasks at once: a learned router over the arithmetic, gcd
and counting experts, HydraLoRA and MoLoRA from scratch, and one SVF expert trained on the mixture (the natural
baseline), each with the same training budget and recipe (8 prompts × G 8, dynamic sampling, cosine, 30 steps) on
`task=mixed`.

Every run is `svf-rl train` in its own process, one at a time, resumable (benchmarks/learning.py runs them).
Each trained file is then scored by `svf-rl eval` on the same 300 test problems as benchmarks/adaptation.py
(100 distinct problems per task), overall and per task, and the router's statistics at its last step are kept.
Rows already in results.json for other configurations or seeds are kept (each records the experts' SHA-256), and
each configuration's accuracy is summarised over its seeds: mean, minimum and a 95% t interval.

    python benchmarks/mixtures.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from learning import finished, read_metrics, summarise_run, t95, train  # noqa: E402

EXPERTS = [f"runs/experts/{name}/expert.safetensors" for name in ("arithmetic", "gcd", "counting")]
# The recipe every row was trained with (the default's until the default moved to benchmarks/RESULTS.md's Table 1).
SHARED = ["task=mixed", "test_size=300", "eval_size=150", "base_eval_max_new_tokens=0", "generations_per_prompt=8",
          "max_sampling_rounds=3", "lr_schedule=cosine", "steps=30", "eval_every=10"]
CONFIGURATIONS = {
    "mixture (token routing, frozen experts), lr 1e-3": ["policy=mixture", f"policy_args.experts=[{','.join(EXPERTS)}]",
                                                          "lr=1e-3"],
    "HydraLoRA (from scratch)": ["policy=hydralora"],
    "MoLoRA (from scratch)": ["policy=molora"],
    "one SVF expert on the mixture": ["policy=svf"],
    "mixture (token routing, frozen experts), lr 1e-2 (its default)": [
        "policy=mixture", f"policy_args.experts=[{','.join(EXPERTS)}]", "lr=1e-2"],
    "mixture (sequence routing, frozen experts), lr 1e-2": [
        "policy=mixture", f"policy_args.experts=[{','.join(EXPERTS)}]", "policy_args.routing=sequence", "lr=1e-2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2])
    parser.add_argument("--only", help="comma-separated configuration numbers (1-based) to run")
    parser.add_argument("--out", default="benchmarks/mixtures")
    args = parser.parse_args()
    out = Path(args.out)
    kept = json.loads((out / "results.json").read_text())["rows"] if (out / "results.json").is_file() else []
    rows = []
    chosen = [int(k) - 1 for k in args.only.split(",")] if args.only else range(len(CONFIGURATIONS))
    with_experts = any(EXPERTS[0] in " ".join(o) for n, o in enumerate(CONFIGURATIONS.values()) if n in chosen)
    missing = [path for path in EXPERTS if not Path(path).is_file()] if with_experts else []
    if missing:
        raise SystemExit(f"{missing[0]} is missing: train the experts first (launch/experts/*.yaml)")
    experts = {Path(p).parent.name: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in EXPERTS
               if Path(p).is_file()}
    for number, (label, overrides) in enumerate(CONFIGURATIONS.items()):
        if number not in chosen:
            continue
        for seed in args.seeds:
            directory = out / f"config_{number + 1}" / f"seed_{seed}"
            if not finished(read_metrics(directory / "metrics.jsonl")):
                train(SHARED + overrides, seed, directory)
            artefact = next(directory / n for n in ("mixture.safetensors", "expert.safetensors", "adapter")
                            if (directory / n).exists())
            scored = directory / "eval_test.json"
            if not scored.is_file():
                subprocess.run([sys.executable, "-m", "svf_rl", "eval", str(artefact), "--size", "300",
                                "--max-new-tokens", "12", "-o", str(scored)], check=True)
            result = json.loads(scored.read_text())
            last = [r for r in read_metrics(directory / "metrics.jsonl") if "reward" in r][-1]
            rows.append({"label": label, **summarise_run(directory, seed), "eval": result["accuracy"],
                         "per_source": result.get("per_source", {}),
                         "routing": {k: v for k, v in last.items() if k.startswith("route")},
                         "routing_by_task": result.get("routing", {}),
                         "experts_sha256": experts if any("experts" in o for o in overrides) else None})
    done = {(r["label"], r["seed"]) for r in rows}
    rows = sorted([r for r in kept if (r["label"], r["seed"]) not in done] + rows,
                  key=lambda r: (list(CONFIGURATIONS).index(r["label"]), r["seed"]))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"command": "python benchmarks/mixtures.py " + " ".join(sys.argv[1:]),
                               "rows": rows}, indent=1))
    os.replace(tmp, out / "results.json")
    print("| configuration | seed | all 300 | arithmetic | gcd | counting | step s | wall min | parameters |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        per = r["per_source"]
        print(f"| {r['label']} | {r['seed']} | {100 * r['eval']:.1f}% | "
              + " | ".join(f"{100 * per.get(k, float('nan')):.0f}%" for k in ("arithmetic", "gcd", "counting"))
              + f" | {r['step_s']:.1f} | {r['wall_s'] / 60:.1f} | {r['trainable_parameters']:,} |")
    print("\n| configuration | seeds | mean | min | 95% interval |\n|---|---:|---:|---:|---|")
    for label in CONFIGURATIONS:
        scores = [r["eval"] for r in rows if r["label"] == label]
        if scores:
            mean = statistics.mean(scores)
            half = (t95(len(scores) - 1) * statistics.stdev(scores) / math.sqrt(len(scores)) if len(scores) > 1
                    else math.nan)
            print(f"| {label} | {len(scores)} | {100 * mean:.1f}% | {100 * min(scores):.1f}% | "
                  f"[{100 * (mean - half):.1f}, {100 * (mean + half):.1f}] |")
    print("\nRouting on the test problems, per task (mean router probability of each option; top-1 share in brackets):")
    for r in rows:
        for source, stats in r["routing_by_task"].items():
            options = [k.removeprefix("share/") for k in stats if k.startswith("share/")]
            print(f"| {r['label']} | {source} | entropy {stats['entropy']:.2f} | " + " | ".join(
                f"{o} {100 * stats['share/' + o]:.0f}% ({100 * stats['top1/' + o]:.0f}%)" for o in options) + " |")


if __name__ == "__main__":
    main()
