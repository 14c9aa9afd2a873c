"""Command line: svf-rl train | memory | eval | compose | export | inspect | tasks."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="svf-rl", description="Train SVF expert vectors with REINFORCE + KL.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train an expert (no arguments: the embedded CPU default)")
    train.add_argument("--config", help="YAML file of TrainConfig keys")
    train.add_argument("--task", help="task name, module:Name or path/to/file.py:Name (same as task=...)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. lr=1e-3")
    memory = commands.add_parser("memory", help="predict a training run's peak memory without loading the model")
    memory.add_argument("--config", help="YAML file of TrainConfig keys")
    memory.add_argument("--model-config", help="the model's config.json, if `model` is not a local directory")
    memory.add_argument("--prompt-tokens", type=int, default=256, help="the longest prompt, in tokens")
    memory.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory, for vLLM's share and the fit")
    memory.add_argument("--dtype", default="bfloat16", help="what dtype=auto means on that GPU")
    memory.add_argument("overrides", nargs="*", metavar="key=value")
    evaluate = commands.add_parser("eval", help="score the base model, an expert or a composition on a task")
    evaluate.add_argument("experts", nargs="*", help="expert files (none: the base model; several: composed)")
    evaluate.add_argument("--task", required=True, help="task name, module:Name or path/to/file.py:Name")
    evaluate.add_argument("--model", default=None, help="base model (default: the experts' own, or the embedded one)")
    evaluate.add_argument("--alpha", type=float, nargs="+", help="one weight per expert (default: equal)")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--size", type=int, default=200, help="problems drawn (each distinct one counted once)")
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--samples", type=int, default=0, help="samples per problem for pass@k (0: greedy only)")
    evaluate.add_argument("--temperature", type=float, default=1.0)
    evaluate.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    evaluate.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--output", help="JSON file for the result (default: eval_<task>_<split>.json)")
    mix = commands.add_parser("compose", help="mix experts into one: z' = Σ α_k z_k")
    mix.add_argument("experts", nargs="+", help="expert files")
    mix.add_argument("--alpha", type=float, nargs="+", help="one weight per expert (default: equal)")
    mix.add_argument("--alpha-file", help="JSON {module: [one weight per expert]} for per-module mixing")
    mix.add_argument("--output", "-o", required=True, help="expert file to write")
    export = commands.add_parser("export", help="write the expert file of a checkpoint")
    export.add_argument("checkpoint", help="a run directory or one of its checkpoints/step_* directories")
    export.add_argument("output", help="expert file to write (.safetensors)")
    inspect = commands.add_parser("inspect", help="summarise an expert file")
    inspect.add_argument("file")
    commands.add_parser("tasks", help="list built-in and installed tasks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file is noise
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from .config import ConfigError, load_config
    from .expert import ExpertError
    from .train import TrainingError
    from .vllm_engine import VLLMServerError

    try:
        if args.command == "train":
            from .train import train as run_training

            overrides = args.overrides + ([f"task={args.task}"] if args.task else [])
            run_training(load_config(args.config, overrides))
        elif args.command == "memory":
            from .memory import predict_run

            print(predict_run(load_config(args.config, args.overrides), args.model_config, args.prompt_tokens,
                              args.gpu_gib, args.dtype))
        elif args.command == "eval":
            import json

            from .base_model import EMBEDDED_MODEL
            from .evaluate import evaluate as run_eval
            from .expert import load_expert

            model = args.model or (load_expert(args.experts[0]).base_model if args.experts else EMBEDDED_MODEL)
            output = args.output or f"eval_{args.task.replace('/', '_').replace(':', '_')}_{args.split}.json"
            result = run_eval(model, args.task, args.experts, args.alpha, split=args.split, size=args.size,
                              seed=args.seed, max_new_tokens=args.max_new_tokens, samples=args.samples,
                              temperature=args.temperature, engine=args.engine, dtype=args.dtype, output=output)
            print(json.dumps(result, indent=2))
            print(f"result written to {output}")
        elif args.command == "compose":
            import json

            from .compose import compose
            from .expert import load_expert, save_expert

            experts = [load_expert(path) for path in args.experts]
            if args.alpha_file:
                try:
                    alpha = json.loads(open(args.alpha_file).read())
                except (OSError, ValueError) as err:
                    raise ValueError(f"--alpha-file {args.alpha_file}: {err}") from None
            else:
                alpha = args.alpha or [1.0 / len(experts)] * len(experts)
            save_expert(compose(experts, alpha, args.experts), args.output)
            print(f"composed expert written to {args.output}")
        elif args.command == "export":
            from .export import export_checkpoint

            print(f"expert written to {export_checkpoint(args.checkpoint, args.output)}")
        elif args.command == "inspect":
            from .expert import describe_expert, load_expert

            print(describe_expert(load_expert(args.file)))
        elif args.command == "tasks":
            from .task import available_tasks, describe_task

            for name, target in sorted(available_tasks().items()):
                print(f"{name:20s} {describe_task(name)}  [{target}]")
    except (ConfigError, ExpertError, TrainingError, VLLMServerError, FileNotFoundError, ValueError) as err:
        print(f"svf-rl {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
