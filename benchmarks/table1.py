"""The Table-1 analogue: SVF against the LoRA family, like for like, with benchmarks/learning.py's runs.

Every run has the same recipe, the same wall-clock budget for its steps (`max_train_minutes`) and the same
validation and test problems. Each policy's learning rate is swept on seed 0 (`table1_<policy>`, one
configuration per rate); when the best validation is at either end of the sweep, the sweep goes on by a factor
of 3 past it (at most twice), so the rate chosen has a worse one on each side. The chosen rate (the best
validation; a tie goes to the higher mean validation over the run's second half) then runs seeds 1 and 2
(`table1_<policy>_seeds`, whose seed 0 is the sweep's own run). On another task (`--task`), each policy runs
seeds 0, 1 and 2 at the rate chosen on the first (`table1_<task>_<policy>_seeds`), without a sweep. Every run
resumes, so the table fills in parts. Then one row per policy: the rates swept and their best validations, the
chosen rate, and over its seeds the test gain (mean, minimum, 95% interval), trainable parameters, steps, step
time and peak memory.

    python benchmarks/table1.py --run svf lora16                  # sweep, extend, seeds; then the table
    python benchmarks/table1.py --run dora --dry-run               # what it would run next
    python benchmarks/table1.py --task gcd --run svf lora16 tinylora   # the second task, at those rates
    python benchmarks/table1.py                                   # the table from the runs so far
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from learning import run_dir, t95  # noqa: E402

RECIPE = ["generations_per_prompt=4", "max_sampling_rounds=1", "lr_schedule=constant", "max_train_minutes=4",
          "steps=200", "eval_every=5", "base_eval_max_new_tokens=0"]
# key: (label, the policy's overrides, the first sweep's rates)
POLICIES = {
    "svf": ("SVF", ["policy=svf"], ["1e-3", "2e-3", "5e-3", "1e-2"]),
    "lora16": ("LoRA r 16", ["policy=lora"], ["2e-4", "5e-4", "1e-3"]),
    "lora1": ("LoRA r 1", ["policy=lora", "policy_args.rank=1", "policy_args.alpha=2"], ["5e-4", "1e-3", "2e-3"]),
    "dora": ("DoRA r 16", ["policy=dora"], ["2e-4", "5e-4", "1e-3"]),
    "tinylora": ("TinyLoRA", ["policy=tinylora"], ["3e-4", "1e-3", "3e-3"]),
    "vera": ("VeRA", ["policy=vera"], ["2e-3", "5e-3", "1e-2"]),
    "pissa": ("PiSSA r 16", ["policy=lora", "policy_args.init=pissa"], ["5e-5", "2e-4", "5e-4"]),
}
EXTENSIONS = 2  # at most this many rates past the first sweep's ends
# The first task is the embedded default (no config); others start from an expert's config, the recipe on top.
TASKS = {"arithmetic": None, "gcd": "launch/experts/gcd.yaml"}


def rate(config: dict) -> str:
    return config["label"].split("=", 1)[1]


def late_validation(config: dict) -> float:
    scores = [v for _, v in config["runs"][0]["validation"]]
    return statistics.mean(scores[len(scores) // 2:]) if scores else 0.0


def chosen(sweep: list[dict]) -> dict:
    return max(sweep, key=lambda c: (c["summary"]["best_validation"], late_validation(c)))


def short(value: float) -> str:
    """1e-4, 3e-5: one significant digit, as the rates are written."""
    exponent = math.floor(math.log10(value))
    mantissa = round(value / 10 ** exponent)
    return f"1e{exponent + 1}" if mantissa == 10 else f"{mantissa}e{exponent}"


def next_rates(sweep: list[dict], first: list[str]) -> list[str] | None:
    """The sweep's rates with one more past the best, if the best is at an end and extensions are left; else None."""
    rates = sorted({rate(c) for c in sweep}, key=float)
    best = rate(chosen(sweep))
    extended = sum(float(r) < min(map(float, first)) or float(r) > max(map(float, first)) for r in rates)
    if extended >= EXTENSIONS or best not in (rates[0], rates[-1]):
        return None
    return sorted({*rates, short(float(best) / 3 if best == rates[0] else float(best) * 3)}, key=float)


def learning(out: Path, name: str, seeds: str, overrides: list[str], grid: list[str] | None, dry: bool,
             config: str | None = None) -> None:
    command = [sys.executable, str(Path(__file__).parent / "learning.py"), "--name", name, "--seeds", seeds,
               "--out", str(out), *(["--config", config] if config else []), *RECIPE, *overrides,
               *(["--grid", "lr=" + ",".join(grid)] if grid else [])]
    print("$", " ".join(command[1:]), flush=True)
    if not dry:
        subprocess.run(command, check=True)


def run(out: Path, key: str, dry: bool, task: str = "arithmetic") -> None:
    _, overrides, first = POLICIES[key]
    sweep_file = out / f"table1_{key}.json"
    if task != "arithmetic":  # the first task's rate, three seeds
        if not sweep_file.is_file():
            raise SystemExit(f"{sweep_file} is missing: run the first task's sweep first (--run {key})")
        best = rate(chosen(json.loads(sweep_file.read_text())["results"]))
        learning(out, f"table1_{task}_{key}_seeds", "0,1,2", [*overrides, f"lr={best}"], None, dry, TASKS[task])
        return
    rates = first
    if sweep_file.is_file():  # a sweep already extended goes on from where it is
        rates = sorted({*first, *map(rate, json.loads(sweep_file.read_text())["results"])}, key=float)
    while True:
        learning(out, f"table1_{key}", "0", overrides, rates, dry)
        if dry:
            return
        sweep = json.loads(sweep_file.read_text())["results"]
        rates = next_rates(sweep, first)
        if rates is None:
            break
    best = rate(chosen(sweep))
    seed0 = run_dir(out, f"table1_{key}_seeds", "default", 0)
    if not seed0.exists():  # the sweep's run at this rate is the seeds' seed 0
        shutil.copytree(run_dir(out, f"table1_{key}", f"lr={best}", 0), seed0)
    learning(out, f"table1_{key}_seeds", "0,1,2", [*overrides, f"lr={best}"], None, dry)


def row(out: Path, key: str, label: str, task: str = "arithmetic") -> str | None:
    sweep_file = out / f"table1_{key}.json"
    seeds_file = out / (f"table1_{key}_seeds.json" if task == "arithmetic" else f"table1_{task}_{key}_seeds.json")
    if not sweep_file.is_file() or (task != "arithmetic" and not seeds_file.is_file()):
        return None
    sweep = sorted(json.loads(sweep_file.read_text())["results"], key=lambda c: float(rate(c)))
    rates = ", ".join(f"{rate(c)}: {100 * c['summary']['best_validation']:.0f}%" for c in sweep)
    best = chosen(sweep)
    if task != "arithmetic":
        rates = "the first task's"
    runs = (json.loads(seeds_file.read_text())["results"][0]["runs"] if seeds_file.is_file() else best["runs"])
    gains = [100 * r["gain"] for r in runs]
    mean = statistics.mean(gains)
    half = t95(len(gains) - 1) * statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else math.nan
    interval = "-" if math.isnan(half) else f"[{mean - half:+.1f}, {mean + half:+.1f}]"
    per_seed = " / ".join(f"{g:+.1f}" for g in gains)
    return (f"| {label} | {rates} | {rate(best)} | {len(runs)} | **{mean:+.1f}** | {min(gains):+.1f} | "
            f"{interval} | {per_seed} | {runs[0]['trainable_parameters']:,} | "
            f"{statistics.mean(r['steps'] for r in runs):.0f} | {statistics.mean(r['step_s'] for r in runs):.1f} | "
            f"{max(r['peak_rss_mib'] for r in runs):,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", nargs="+", choices=list(POLICIES), default=[], help="policies to sweep and seed")
    parser.add_argument("--dry-run", action="store_true", help="print the next command for each, run nothing")
    parser.add_argument("--task", choices=list(TASKS), default="arithmetic",
                        help="arithmetic (the embedded default: sweeps) or another task (the first task's rates)")
    parser.add_argument("--out", default="benchmarks/learning", help="where benchmarks/learning.py's runs are")
    args = parser.parse_args()
    out = Path(args.out)
    for key in args.run:
        run(out, key, args.dry_run, args.task)
    print("| policy | lr swept (best validation, seed 0) | chosen | seeds | mean gain | min | 95% interval | "
          "per seed | trainable | steps | step s | peak MiB |")
    print("|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|")
    for key, (label, _, _) in POLICIES.items():
        line = row(out, key, label, args.task)
        if line:
            print(line)


if __name__ == "__main__":
    main()
