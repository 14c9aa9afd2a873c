"""The policy update with and without shared prompts, at G = 4, 8, 16 completions per prompt.

The update the training loop runs (completion_features + token_stats + backward into z, W' composed once per
step where that is cheaper), on the embedded SmolLM2-135M, with prompts of the default task (reasoning-gym
arithmetic in SmolLM2's chat template, about 36 tokens) and 12-token completions: the default's shapes.
Both variants run side by side in one process, alternating, median of the repeats.

    python benchmarks/bench_prefix.py
"""

from __future__ import annotations

import argparse
import time

import torch

from svf_rl.base_model import EMBEDDED_MODEL, cache_root, load_base_model
from svf_rl.engines.hf import chat_ids
from svf_rl.loop.logprobs import completion_features, make_token_batch, plan_forward, token_stats, update_tokens
from svf_rl.policies.svf_layer import apply_svf, policy_step, svf_layers
from tasks.arithmetic import Arithmetic


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", default="4,8,16")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_base_model(EMBEDDED_MODEL)
    apply_svf(model, "mlp", "auto", cache_root() / "svd", progress=False)
    plan = plan_forward(model)
    task = Arithmetic()
    prompts = [chat_ids(tokenizer, task.prompt(row)) for row in task.rows("train", args.prompts, 0)]

    def update(batch, group):
        with policy_step(model, update_tokens(batch, group)):
            features = completion_features(model, model, batch, group, plan.hidden)
            logp, _ = token_stats(features, batch.completion_ids, 1.0, plan.head, 1024)
            (-(logp * batch.completion_mask).sum() / batch.completion_mask.sum()).backward()
        for layer in svf_layers(model).values():
            layer.z.grad = None

    print(f"SmolLM2-135M, SVF on the MLPs, {args.prompts} prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'G':>3} {'tokens whole':>13} {'tokens shared':>14} {'whole s':>8} {'shared s':>9} {'speed-up':>9}")
    for group in [int(g) for g in args.groups.split(",")]:
        completions = [torch.randint(0, len(tokenizer), (args.new_tokens,)).tolist()
                       for _ in range(args.prompts * group)]
        batch = make_token_batch([p for p in prompts for _ in range(group)], completions, tokenizer.pad_token_id)
        times = {1: [], group: []}
        update(batch, group)  # warm-up
        for _ in range(args.repeats):
            for g in (1, group):
                start = time.perf_counter()
                update(batch, g)
                times[g].append(time.perf_counter() - start)
        whole, shared = (sorted(times[g])[len(times[g]) // 2] for g in (1, group))
        print(f"{group:>3} {update_tokens(batch, 1):>13} {update_tokens(batch, group):>14} {whole:>8.2f} "
              f"{shared:>9.2f} {whole / shared:>8.2f}x")


if __name__ == "__main__":
    main()
