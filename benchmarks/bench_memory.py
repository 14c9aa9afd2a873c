"""Measured peak memory of training steps against the memory model's prediction (svf_rl/loop/memory.py).

Each configuration runs `svf_rl.loop.train.train` for one step (SVD, base-model evaluation, rollout, update,
sync, validation, test) in its own process, one after the other. The model is the embedded SmolLM2-135M or a
randomly initialised one built from a real config (no hub is reachable; memory does not depend on the
weights' values), with SmolLM2's tokenizer and its 49,152-token vocabulary, saved once and loaded from disk
as any model is. Measured: the process's peak
resident memory (VmHWM) minus its resident memory just before the model is built, with glibc returning
every freed block of 64 KiB or more to the system (MALLOC_MMAP_THRESHOLD_), so that the peak counts live
tensors and not a heap that kept freed memory.

    python benchmarks/bench_memory.py [--only NAME]

The DeepSpeed rows run `accelerate launch` with 2 CPU processes (gloo), one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VOCAB = 49152
LLAMA_1B = dict(model_type="llama", vocab_size=VOCAB, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                max_position_embeddings=4096, tie_word_embeddings=True)  # Llama-3.2-1B's shapes
QWEN_05B = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                max_position_embeddings=4096, tie_word_embeddings=True)  # Qwen2.5-0.5B's shapes

SMALL_RUN = ["steps=1", "eval_every=1", "eval_size=8", "test_size=8", "eval_batch_size=8", "base_eval_max_new_tokens=0",
             "save_every=1000", "log_with=[]", "progress=false", "train_size=64"]
# Configurations launched with DeepSpeed on 2 CPU processes: name -> accelerate config. Each process measures
# its own peak; the row shows the larger.
DEEPSPEED = {
    "smollm2-135m bf16, compose, ZeRO-2, 2 processes": "zero2.yaml",
    "smollm2-135m fp32, ZeRO-3, 2 processes": "zero3.yaml",
}
CONFIGS = {
    "smollm2-135m default (fp32)": (None, []),
    "smollm2-135m default, policy=lora (fp32)": (None, ["policy=lora"]),
    "smollm2-135m, KL full, no kept W', checkpointing": (None, ["kl_coef=0.05", "kl_estimator=full",
                                                               "weight_cache=none", "gradient_checkpointing=true",
                                                               "logit_chunk_tokens=128"]),
    "qwen2.5-0.5b-shaped, KL k3, compose": (QWEN_05B, ["kl_coef=0.05", "forward_strategy=compose",
                                                       "prompts_per_step=4", "generations_per_prompt=4",
                                                       "max_new_tokens=16", "micro_batch_size=8"]),
    "llama-3.2-1b-shaped (1.07B), fp32": (LLAMA_1B, ["prompts_per_step=2", "generations_per_prompt=4",
                                                     "max_new_tokens=8", "micro_batch_size=8"]),
    "smollm2-135m bf16, compose, ZeRO-2, 2 processes": (None, ["dtype=bfloat16", "forward_strategy=compose",
                                                               "prompts_per_step=4", "kl_coef=0.05"]),
    "smollm2-135m fp32, ZeRO-3, 2 processes": (None, ["prompts_per_step=4", "kl_coef=0.05"]),
}


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def saved_random_model(name: str, architecture: dict) -> str:
    """A randomly initialised model of that architecture with SmolLM2's tokenizer, saved once under the cache
    and then loaded from disk as any model is (on CPU its weights are views of the mapped file)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from svf_rl.base_model import EMBEDDED_MODEL, cache_root, load_base_model

    target = cache_root() / "bench_models" / name.split(" ")[0]
    if not (target / "config.json").exists():
        _, tokenizer = load_base_model(EMBEDDED_MODEL)
        torch.manual_seed(0)
        spec = dict(architecture)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return str(target)


def run_one(name: str) -> dict:
    import svf_rl.loop.train as trainer
    from svf_rl.base_model import EMBEDDED_MODEL, load_base_model
    from svf_rl.config import load_config

    architecture, overrides = CONFIGS[name]
    model_dir = EMBEDDED_MODEL if architecture is None else saved_random_model(name, architecture)
    config = load_config(None, SMALL_RUN + overrides + [f"output_dir={tempfile.mkdtemp()}", f"model={model_dir}"])
    marks: dict = {}
    predicted: dict = {}

    def build(model_name, dtype):
        marks["before"] = rss_bytes("VmRSS")
        model, tokenizer = load_base_model(model_name, dtype)
        Path("/proc/self/clear_refs").write_text("5")  # peak := now; the loader's own transients aside
        return model, tokenizer

    original_estimate = trainer.estimate_memory

    def keep_estimate(*args, **kwargs):
        estimate = original_estimate(*args, **kwargs)
        predicted.update(peak=estimate.peak, phase=estimate.peak_phase,
                         phases={p: estimate.phase_peak(p) for p in estimate.phases})
        return estimate

    trainer.load_base_model, trainer.estimate_memory = build, keep_estimate
    trainer.train(config)
    measured = rss_bytes("VmHWM") - marks["before"]
    return {"name": name, "measured": measured, **predicted}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="run one configuration (its name)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    rows = []
    for name in [args.only] if args.only else CONFIGS:
        command = [sys.executable, __file__, "--child", name]
        if name in DEEPSPEED:
            launch = Path(__file__).resolve().parents[1] / "launch" / "accelerate" / DEEPSPEED[name]
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
                       "--num_processes", "2", *command[1:]]
            env_run = {**env, "OMP_NUM_THREADS": "1"}
        else:
            env_run = env
        proc = subprocess.run(command, capture_output=True, text=True, env=env_run)
        results = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not results:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        # The main process predicts; every process measures its own peak.
        row = next(r for r in results if "peak" in r)
        rows.append({**row, "measured": max(r["measured"] for r in results)})
    print(f"{'configuration':<52}{'predicted GiB':>14}{'measured GiB':>13}{'error':>8}  peak phase")
    for r in rows:
        error = (r["peak"] - r["measured"]) / r["measured"]
        print(f"{r['name']:<52}{r['peak'] / 2**30:>14.2f}{r['measured'] / 2**30:>13.2f}{error:>+8.1%}  {r['phase']}")


if __name__ == "__main__":
    main()
