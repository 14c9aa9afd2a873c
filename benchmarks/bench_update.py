"""SVF policy-update step vs a frozen-weights forward+backward of the same model and tokens.

Also compose vs factored forward strategies at several token counts. Prints ratios measured side by
side in one process; run with nothing else busy on the machine:

    python benchmarks/bench_update.py
"""

from __future__ import annotations

import argparse
import time

import torch

from svf_rl.base_model import EMBEDDED_MODEL, load_base_model
from svf_rl.policies.svf_layer import apply_svf, policy_step, svf_layers


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--batches", default="4,16,32,64", help="sequences per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    frozen, _ = load_base_model(args.model)
    frozen.requires_grad_(False)
    svf, _ = load_base_model(args.model)
    apply_svf(svf, "mlp", progress=False)
    layers = list(svf_layers(svf).values())
    vocab = frozen.config.vocab_size

    def frozen_step(ids):
        embeds = frozen.get_input_embeddings()(ids).detach().requires_grad_()  # backward through every layer
        frozen(inputs_embeds=embeds, logits_to_keep=16).logits.float().logsumexp(-1).mean().backward()

    def svf_step(ids, strategy):
        for layer in layers:
            layer.strategy = strategy
        with policy_step(svf, tokens=ids.numel()):
            svf(input_ids=ids, logits_to_keep=16).logits.float().logsumexp(-1).mean().backward()
        for layer in layers:
            layer.z.grad = None

    print(f"model {args.model}, {len(layers)} SVF matrices (mlp), sequence length {args.seq_len}, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'seqs':>5} {'tokens':>7} {'frozen s':>9} {'auto s':>8} {'compose s':>10} {'factored s':>11} "
          f"{'auto/frozen':>12} {'factored/compose':>17}")
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(0, vocab, (batch, args.seq_len))
        base = seconds(lambda ids=ids: frozen_step(ids), args.repeats)
        auto = seconds(lambda ids=ids: svf_step(ids, "auto"), args.repeats)
        compose = seconds(lambda ids=ids: svf_step(ids, "compose"), args.repeats)
        factored = seconds(lambda ids=ids: svf_step(ids, "factored"), args.repeats)
        print(f"{batch:>5} {ids.numel():>7} {base:>9.2f} {auto:>8.2f} {compose:>10.2f} {factored:>11.2f} "
              f"{auto / base:>12.2f} {factored / compose:>17.2f}")


if __name__ == "__main__":
    main()
