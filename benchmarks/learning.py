"""Does a recipe learn, every time? Runs `svf-rl train` configurations over seeds and reports the gain over the
base model with its spread.

Each configuration (the shared overrides, times every combination of the `--grid` values) runs once per seed, one
run at a time, each in its own process. The seed changes the training prompts drawn and the sampling (and an
adapter's random initialisation); the validation and test problems are the same for every run. Finished runs
are not redone and an interrupted one resumes from its last checkpoint, so a long benchmark can run in parts.

Per run: the base model's and the trained policy's greedy test accuracy on the same distinct problems, the
gain, the base at 64 tokens, wall-clock, steps, step time, peak memory and trainable parameters. Per
configuration: the mean gain, the minimum, and a 95% t-interval over seeds. Writes OUT/NAME.json, OUT/NAME.png
(validation accuracy against step: the mean over seeds and its min-max band) and prints a Markdown table.

    python benchmarks/learning.py --name default --seeds 0,1,2
    python benchmarks/learning.py --name control --seeds 0,1,2 rewards=[reward_fns.control:coin_flip]
    python benchmarks/learning.py --name sweep --seeds 0 --grid policy=svf,lora --grid lr=1e-3,3e-3
    python benchmarks/learning.py --name table1 --seeds 0 max_train_minutes=4 steps=200 policy=lora \
        --grid lr=2e-4,5e-4,1e-3    # an equal wall-clock budget per run
    python benchmarks/learning.py --name gcd --config launch/experts/gcd.yaml    # another task
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond 30).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    return T95[max(k for k in T95 if k <= df)] if df <= 30 else 1.96  # between tabulated ones: the wider


def configurations(shared: list[str], grid: list[str]) -> list[tuple[str, list[str]]]:
    """(label, overrides) for every combination of the grid's values, after the shared overrides."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--grid {item!r} must look like key=v1,v2")
        axes.append([f"{key}={value}" for value in values.split(",")])
    combos = list(itertools.product(*axes)) or [()]
    return [(" ".join(combo) or "default", shared + list(combo)) for combo in combos]


def run_dir(out: Path, name: str, label: str, seed: int) -> Path:
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label.replace("=", "-").replace(" ", "_"))
    return out / name / slug / f"seed_{seed}"


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line torn by a kill
            pass
    return records


def finished(records: list[dict]) -> bool:
    return any("test/accuracy" in r for r in records)


def train(overrides: list[str], seed: int, directory: Path) -> dict:
    """One run in its own process, resumed if it was interrupted; wall-clock and peak memory are added up over
    the parts."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "benchmark_overrides.json").write_text(json.dumps(overrides))
    timing_file = directory / "benchmark_timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {"seconds": 0.0, "peak_rss_mib": 0}
    command = [sys.executable, "-m", "svf_rl", "train", *overrides, f"seed={seed}", f"output_dir={directory}",
               "resume=true", "progress=false"]
    print("$", " ".join(command[2:]), flush=True)
    start = time.perf_counter()
    with open(directory / "benchmark.log", "a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    timing["seconds"] += time.perf_counter() - start
    timing["peak_rss_mib"] = max(timing["peak_rss_mib"], usage.ru_maxrss // 1024)
    timing_file.write_text(json.dumps(timing))
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (directory / "benchmark.log").read_text().strip().splitlines()[-1:]
        raise SystemExit(f"run {directory} failed: {tail[0] if tail else 'no output'}")
    return timing


def summarise_run(directory: Path, seed: int) -> dict:
    records = read_metrics(directory / "metrics.jsonl")
    timing = json.loads((directory / "benchmark_timing.json").read_text())
    first = {k: v for r in records if r.get("step") == 0 for k, v in r.items()}
    steps = [r for r in records if "reward" in r]
    base, final = first["base_test/accuracy"], next(r["test/accuracy"] for r in records if "test/accuracy" in r)
    info = directory / "run.json"
    return {
        "seed": seed, "base": base, "base_64_tokens": first.get("base_test_64_tokens/accuracy"),
        "test": final, "gain": final - base, "steps": max((r["step"] for r in steps), default=0),
        "step_s": statistics.mean(r["rollout_s"] + r["update_s"] + r["sync_s"] for r in steps) if steps else None,
        "wall_s": timing["seconds"], "peak_rss_mib": timing["peak_rss_mib"],
        "trainable_parameters": first.get("trainable_parameters"),
        "validation": [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r],
        "environment": json.loads(info.read_text()).get("environment") if info.is_file() else None,
    }


def summarise(runs: list[dict]) -> dict:
    gains = [r["gain"] for r in runs]
    mean = statistics.mean(gains)
    half = t95(len(gains) - 1) * statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else math.nan
    return {"seeds": len(runs), "base": statistics.mean(r["base"] for r in runs),
            "best_validation": statistics.mean(max((v for _, v in r["validation"]), default=0) for r in runs),
            "test": statistics.mean(r["test"] for r in runs), "gain_mean": mean, "gain_min": min(gains),
            "gain_low": mean - half, "gain_high": mean + half,
            "wall_s_mean": statistics.mean(r["wall_s"] for r in runs),
            "wall_s_max": max(r["wall_s"] for r in runs)}


def pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:+.1f}"


def table(results: list[dict]) -> str:
    lines = ["| configuration | seed | base | base, 64 tokens | trained | gain (points) | steps | step s | wall | "
             "peak MiB | parameters |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        for r in result["runs"]:
            base_64 = "-" if r["base_64_tokens"] is None else f"{100 * r['base_64_tokens']:.1f}%"
            step_s = "-" if r["step_s"] is None else f"{r['step_s']:.1f}"
            lines.append(f"| {result['label']} | {r['seed']} | {100 * r['base']:.1f}% | {base_64} | "
                         f"{100 * r['test']:.1f}% | {pct(r['gain'])} | {r['steps']} | {step_s} | "
                         f"{r['wall_s'] / 60:.1f} min | {r['peak_rss_mib']} | {r['trainable_parameters'] or '-'} |")
    lines += ["", "| configuration | seeds | best validation (mean) | mean gain | min gain | "
              "95% interval of the mean | "
              "mean wall | max wall |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for result in results:
        s = result["summary"]
        best = "-" if "best_validation" not in s else f"{100 * s['best_validation']:.1f}%"
        lines.append(f"| {result['label']} | {s['seeds']} | {best} | {pct(s['gain_mean'])} | {pct(s['gain_min'])} | "
                     f"[{pct(s['gain_low'])}, {pct(s['gain_high'])}] | {s['wall_s_mean'] / 60:.1f} min | "
                     f"{s['wall_s_max'] / 60:.1f} min |")
    # The libraries' versions decide the random samples a seed draws; runs recorded before they were kept show none.
    environments = {json.dumps(r["environment"]) for result in results for r in result["runs"] if r.get("environment")}
    lines += [f"\nenvironment: {', '.join(f'{k} {v}' for k, v in json.loads(e).items())}" for e in sorted(environments)]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for result in results:
        curves = [dict(r["validation"]) for r in result["runs"]]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        values = [[100 * c[s] for c in curves] for s in steps]
        line, = ax.plot(steps, [statistics.mean(v) for v in values], marker="o", label=result["label"])
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2, color=line.get_color())
        base = 100 * result["summary"]["base"]
        ax.axhline(base, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("mean over seeds, min-max band; dotted: base model on test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides shared by every run (svf-rl train's)")
    parser.add_argument("--name", required=True, help="the benchmark's name: OUT/NAME.json, OUT/NAME.png")
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2],
                        help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--grid", action="append", default=[], help="key=v1,v2: one configuration per value")
    parser.add_argument("--config", help="a YAML file every run starts from (svf-rl train --config)")
    parser.add_argument("--out", default="benchmarks/learning", help="where runs and results go")
    parser.add_argument("--report-only", action="store_true", help="summarise the finished runs, train none")
    args = parser.parse_intermixed_args()  # overrides before and after the options
    out = Path(args.out)
    results = []
    shared = (["--config", args.config] if args.config else []) + args.overrides
    for label, overrides in configurations(shared, args.grid):
        runs = []
        for seed in args.seeds:
            directory = run_dir(out, args.name, label, seed)
            recorded = directory / "benchmark_overrides.json"
            held = json.loads(recorded.read_text()) if recorded.is_file() else overrides
            if held != overrides:
                raise SystemExit(f"{directory} holds a run of other settings ({' '.join(held)}); give another --name")
            if not finished(read_metrics(directory / "metrics.jsonl")):
                if args.report_only:
                    continue
                train(overrides, seed, directory)
            runs.append(summarise_run(directory, seed))
        if runs:
            results.append({"label": label, "overrides": overrides, "runs": runs, "summary": summarise(runs)})
    command = "python benchmarks/learning.py " + " ".join(sys.argv[1:])
    if not results:
        raise SystemExit(f"no finished runs of {args.name} under {out}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{args.name}.json.tmp"
    tmp.write_text(json.dumps({"command": command, "results": results}, indent=1))
    os.replace(tmp, out / f"{args.name}.json")
    plot(results, out / f"{args.name}.png")
    print(f"\n`{command}`\n\n{table(results)}")


if __name__ == "__main__":
    main()
