"""Command line: svf-rl train | memory | export | inspect | tasks."""

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
