"""Rollout engines side by side on the embedded default: HF `generate`, vLLM colocated, and a vLLM server.

One trainer process, one model with SVF on the MLPs. For each engine: median over `--repeats` of sampling P
prompts × G completions (temperature 1) after a warm-up, as generated tokens/s. For the vLLM engines also: the
time to push the new weights after a z change (W' composed in the trainer and reloaded for colocated; z sent
and W' composed by the server's workers for the server), its share of a full step (rollout + SVF update +
sync), and rollout tokens/s with the sync included vs without.

    python benchmarks/bench_engines.py                      # HF and colocated vLLM
    launch/vllm_server.sh ~/.cache/svf_rl/models/smollm2-135m-instruct 8000 &
    python benchmarks/bench_engines.py --server http://localhost:8000   # adds the server
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--tokens", type=str, default="12,64", help="max new tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server", help="URL of a vLLM server started with launch/vllm_server.sh")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from svf_rl.base_model import EMBEDDED_MODEL, cache_root, load_base_model, resolve_model_path
    from svf_rl.engines.hf import HFEngine, Sampling, chat_ids
    from svf_rl.engines.vllm_engine import VLLMEngine, VLLMServerEngine
    from svf_rl.loop.logprobs import completion_logprobs, make_token_batch
    from svf_rl.policies.svf_layer import apply_svf, policy_step, svf_layers
    from svf_rl.svd import weight_fingerprints
    from svf_rl.task import load_task

    path = resolve_model_path(EMBEDDED_MODEL)
    model, tokenizer = load_base_model(path)
    fingerprints = weight_fingerprints(model)
    apply_svf(model, "mlp", "auto", cache_root() / "svd", progress=False)
    task = load_task("arithmetic")
    prompts = [chat_ids(tokenizer, task.prompt(r)) for r in task.rows("train", args.prompts, 0)]
    engines = {"hf": HFEngine(model, tokenizer), "vllm": VLLMEngine(model, tokenizer, path)}
    if args.server:
        engines["vllm_server"] = VLLMServerEngine(model, tokenizer, [args.server], fingerprints=fingerprints)

    print("| max new tokens | engine | rollout s | tokens/s |\n|---:|---|---:|---:|")
    speeds = {}
    for tokens in map(int, args.tokens.split(",")):
        sampling = Sampling(args.generations, 1.0, 1.0, tokens)
        for name, engine in engines.items():
            engine.generate(prompts, sampling)  # warm-up
            seconds, completions = timed(lambda e=engine, s=sampling: e.generate(prompts, s), args.repeats)
            generated = sum(len(c.ids) for c in completions)
            speeds[tokens, name] = generated / seconds
            print(f"| {tokens} | {name} | {seconds:.2f} | {generated / seconds:.0f} |")
    for tokens in map(int, args.tokens.split(",")):
        for name in engines:
            if name != "hf":
                print(f"{name} / hf tokens/s at {tokens} new tokens: {speeds[tokens, name] / speeds[tokens, 'hf']:.2f}")

    # A full step on each vLLM engine: rollout, SVF update, weight push.
    z_params = [layer.z for layer in svf_layers(model).values()]
    optimizer = torch.optim.AdamW(z_params, lr=1e-3)
    sampling = Sampling(args.generations, 1.0, 1.0, int(args.tokens.split(",")[0]))
    for name in [n for n in engines if n != "hf"]:
        engine, rollout, update, sync = engines[name], [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            completions = engine.generate(prompts, sampling)
            rollout.append(time.perf_counter() - start)
            start = time.perf_counter()
            batch = make_token_batch([c.prompt_ids for c in completions], [c.ids for c in completions],
                                     tokenizer.pad_token_id)
            with policy_step(model, tokens=int(batch.attention_mask.sum())):
                logp = completion_logprobs(model, batch)
                (-(logp * batch.completion_mask).sum() / batch.completion_mask.sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
            update.append(time.perf_counter() - start)
            start = time.perf_counter()
            engine.update_weights()
            sync.append(time.perf_counter() - start)
        r, u, s = (statistics.median(x) for x in (rollout, update, sync))
        sent = sum(z.numel() * 4 for z in z_params) if name == "vllm_server" else sum(
            layer.U.shape[0] * layer.Vh.shape[1] * layer.U.element_size() for layer in svf_layers(model).values())
        print(f"\nstep on {name}: rollout {r:.2f} s, update {u:.2f} s, sync {s:.2f} s "
              f"({len(z_params)} matrices, compose included; {sent / 1e6:.2f} MB handed over)")
        print(f"{name} sync share of step: {s / (r + u + s):.1%}")
        print(f"{name} rollout tokens/s with sync / without: {r / (r + s):.2f}")


if __name__ == "__main__":
    main()
