"""What each policy costs on the embedded default, side by side: trainable parameters, step, update and sync
time, what a sync moves, and peak memory.

Each policy runs the embedded default's configuration for a few steps (`svf_rl.loop.train.train`, the same
prompts, rollouts and seeds) in its own process, one after the other, with a colocated vLLM engine by
default, so that the sync column is the weights pushed after each step. Times are the mean over the steps
after the first. "sent to a server" is what `engine=vllm_server` sends after each step (the tensors that
changed: the trainable ones), "pushed colocated" the adapted layers' weights. Peak memory is the process's
peak resident memory (VmHWM) minus its resident memory before the model is built, as in bench_memory.py.

    python benchmarks/bench_policies.py [--engine vllm|hf] [--steps 4] [--only lora,svf]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

POLICIES = ["svf", "lora", "dora", "loraplus", "lorafa", "vera", "adalora", "tinylora", "ia3", "delta_lora"]


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def run_one(policy: str, engine: str, steps: int) -> dict:
    import svf_rl.loop.train as trainer
    from svf_rl.base_model import load_base_model
    from svf_rl.config import load_config
    from svf_rl.policies import make_policy

    output = tempfile.mkdtemp()
    config = load_config(None, [f"policy={policy}", f"engine={engine}", f"steps={steps}", f"eval_every={steps}",
                                "eval_size=8", "test_size=8", "base_eval_max_new_tokens=0", f"save_every={steps}",
                                "log_with=[]", "progress=false", f"output_dir={output}"])
    marks = {}

    def build(model_name, dtype):
        marks["before"] = rss_bytes("VmRSS")
        model, tokenizer = load_base_model(model_name, dtype)
        Path("/proc/self/clear_refs").write_text("5")
        return model, tokenizer

    trainer.load_base_model = build
    trainer.train(config)
    peak = rss_bytes("VmHWM") - marks["before"]
    records = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "reward" in r][1:]
    mean = {k: sum(r[k] for r in steps_) / len(steps_) for k in ("rollout_s", "update_s", "sync_s")}
    model, _ = load_base_model(config.model, "auto")
    attached = make_policy(config)
    attached.attach(model, [[1, 2, 3]])
    import torch

    attached.optimizer(torch.optim.AdamW, config.lr, 0.0)  # LoRA-FA's freezes A
    attached.server_setup()  # the servers get the whole state once; then, after a step, what changed
    with torch.no_grad():
        for p in attached.parameters():
            p.add_(1e-3)
    sent = sum(t.numel() * 4 for t in attached.server_update().values())
    pushed = sum(w.numel() * w.element_size() for _, w in attached.engine_weights())
    return {"policy": policy, "lr": config.lr, "trainable": sum(p.numel() for p in attached.parameters()),
            "peak": peak, "sent": sent, "pushed": pushed, **mean}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", help="comma-separated policies")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args.engine, args.steps)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "VLLM_CPU_KVCACHE_SPACE": "1"}
    rows = []
    for policy in args.only.split(",") if args.only else POLICIES:
        proc = subprocess.run([sys.executable, __file__, "--child", policy, "--engine", args.engine,
                               "--steps", str(args.steps)], capture_output=True, text=True, env=env)
        found = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not found:
            sys.exit(f"{policy} failed:\n{proc.stderr[-3000:]}")
        rows.append(found[0])
        print(json.dumps(found[0]), flush=True)
    print("\n| policy | lr | trainable | step s | update s | sync s | pushed colocated | sent to a server "
          "| peak GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        step = r["rollout_s"] + r["update_s"] + r["sync_s"]
        print(f"| {r['policy']} | {r['lr']:g} | {r['trainable']:,} | {step:.2f} | {r['update_s']:.2f} | "
              f"{r['sync_s']:.3f} | {r['pushed'] / 2**20:.1f} MiB | {r['sent'] / 2**10:,.0f} KiB | "
              f"{r['peak'] / 2**30:.2f} |")


if __name__ == "__main__":
    main()
