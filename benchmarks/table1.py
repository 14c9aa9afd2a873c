"""The Table-1 analogue: SVF against the LoRA family, like for like, from benchmarks/learning.py's runs.

Each policy's learning rate is swept on seed 0 (`table1_<policy>`, one configuration per rate) and the rate with
the best validation accuracy is run on more seeds (`table1_<policy>_seeds`); every run has the same wall-clock
budget for its steps (`max_train_minutes`), the same recipe, and the same validation and test problems. This
prints one row per policy: the rates swept and their best validations, the chosen rate, then over its seeds
the test gain (mean, minimum, 95% interval), trainable parameters, steps, step time and peak memory.

    python benchmarks/table1.py
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from learning import t95  # noqa: E402

POLICIES = {"svf": "SVF", "lora16": "LoRA r 16", "lora1": "LoRA r 1", "dora": "DoRA r 16", "tinylora": "TinyLoRA",
            "vera": "VeRA", "pissa": "PiSSA r 16"}


def row(out: Path, key: str, label: str) -> str | None:
    sweep_file, seeds_file = out / f"table1_{key}.json", out / f"table1_{key}_seeds.json"
    if not sweep_file.is_file():
        return None
    sweep = json.loads(sweep_file.read_text())["results"]
    rates = ", ".join(f"{c['label'].split('=')[1]}: {100 * c['summary']['best_validation']:.0f}%" for c in sweep)
    best = max(sweep, key=lambda c: c["summary"]["best_validation"])
    runs = (json.loads(seeds_file.read_text())["results"][0]["runs"] if seeds_file.is_file() else best["runs"])
    gains = [100 * r["gain"] for r in runs]
    mean = statistics.mean(gains)
    half = t95(len(gains) - 1) * statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else math.nan
    interval = "-" if math.isnan(half) else f"[{mean - half:+.1f}, {mean + half:+.1f}]"
    per_seed = " / ".join(f"{g:+.1f}" for g in gains)
    chosen = best["label"].split("=")[1]
    return (f"| {label} | {rates} | {chosen} | {len(runs)} | **{mean:+.1f}** | {min(gains):+.1f} | "
            f"{interval} | {per_seed} | {runs[0]['trainable_parameters']:,} | "
            f"{statistics.mean(r['steps'] for r in runs):.0f} | {statistics.mean(r['step_s'] for r in runs):.1f} | "
            f"{max(r['peak_rss_mib'] for r in runs):,} |")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/learning")
    print("| policy | lr swept (best validation, seed 0) | chosen | seeds | mean gain | min | 95% interval | "
          "per seed | trainable | steps | step s | peak MiB |")
    print("|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|")
    for key, label in POLICIES.items():
        line = row(out, key, label)
        if line:
            print(line)


if __name__ == "__main__":
    main()
