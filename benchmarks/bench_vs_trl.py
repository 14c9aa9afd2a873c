"""svf-rl end-to-end RL step vs TRL GRPOTrainer with PEFT LoRA (r=16), same model, batch and engine.

Both use HF `generate` for rollouts, P prompts × G completions × T new tokens, the same reward, and
the same MLP matrices as targets. Each side runs in its own process, one after the other (never in
parallel: two torch processes on 2 cores distort both), and reports its median step time after a
warm-up step and its peak RSS.

    python benchmarks/bench_vs_trl.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

P, G, T = 8, 4, 12


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gib() -> float:
    """Resident memory now: taken after the imports, before the model loads, so that the peak above it counts
    what each trainer allocates and not the libraries each imports."""
    status = Path("/proc/self/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1]) / 2**20


def run_svf(steps: int) -> dict:
    from svf_rl.config import load_config
    from svf_rl.loop.train import train
    from svf_rl.run_files import read_metrics

    out = tempfile.mkdtemp()
    start = rss_gib()
    config = load_config(None, [f"output_dir={out}", f"steps={steps}", f"prompts_per_step={P}",
                                f"generations_per_prompt={G}", f"max_new_tokens={T}", "eval_every=1000",
                                "eval_size=1", "test_size=1", "log_with=[]", "progress=false", "save_every=1000"])
    train(config)
    steps_logged = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "reward" in r]
    times = [r["rollout_s"] + r["update_s"] + r["sync_s"] for r in steps_logged[1:]]
    return {"step_s": statistics.median(times), "peak_rss_gib": peak_rss_gib(), "start_gib": start,
            "update_s": statistics.median(r["update_s"] for r in steps_logged[1:])}


def run_trl(steps: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from svf_rl.base_model import EMBEDDED_MODEL, load_base_model
    from tasks.arithmetic import Arithmetic

    task = Arithmetic()
    start = rss_gib()
    model, tokenizer = load_base_model(EMBEDDED_MODEL)
    rows = task.rows("train", P * (steps + 1), 0)
    dataset = Dataset.from_list([{"prompt": task.prompt(r), "entry": r["entry"]} for r in rows])

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            stamps.append(time.perf_counter())

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=P * G, num_generations=G,
        max_completion_length=T, temperature=1.0, top_p=1.0, top_k=0, learning_rate=2e-3, beta=0.0,
        max_steps=steps, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        gradient_accumulation_steps=1, dataloader_num_workers=0, disable_tqdm=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=list(task.reward_funcs), args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    stamps.append(time.perf_counter())
    trainer.train()
    times = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    return {"step_s": statistics.median(times), "peak_rss_gib": peak_rss_gib(), "start_gib": start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--side", choices=["svf", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = run_svf(args.steps) if args.side == "svf" else run_trl(args.steps)
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for side in ("svf", "trl"):
        proc = subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(args.steps)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{side} side failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(line[7:])
    svf, trl = results["svf"], results["trl"]
    print(f"SmolLM2-135M-Instruct, {P} prompts x {G} completions x {T} new tokens, HF generate, CPU, "
          f"median step after warm-up of {args.steps} steps")
    print(f"{'':14}{'step s':>8}{'steps/s':>9}{'peak RSS GiB':>14}{'above start GiB':>17}")
    for name, r in (("svf-rl (SVF)", svf), ("TRL GRPO+LoRA", trl)):
        print(f"{name:14}{r['step_s']:>8.2f}{1 / r['step_s']:>9.3f}{r['peak_rss_gib']:>14.2f}"
              f"{r['peak_rss_gib'] - r['start_gib']:>17.2f}")
    print(f"svf-rl steps/s ÷ TRL steps/s = {trl['step_s'] / svf['step_s']:.2f}; svf-rl update {svf['update_s']:.2f} s")


if __name__ == "__main__":
    main()
