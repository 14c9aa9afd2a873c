"""Command line: svf-rl train | memory | eval | compose | merge | adapt | export-lora | import-sakana | export |
inspect | tasks."""

from __future__ import annotations

import argparse
import logging
import os
import sys


class UsageError(Exception):
    """A command line that argparse refuses."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line like every other error (usage: --help), and main returns 2
        raise UsageError(f"{self.prog}: error: {message}")


MIXING_HELP = "sum: z' = Σ α_k z_k (Transformer²); anchored: z' = 1 + Σ α_k (z_k − 1), the base model at α = 0"


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="svf-rl", description="Train SVF expert vectors with REINFORCE + KL.")
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
    memory.add_argument("--processes", type=int, default=1, help="training processes (GPUs) sharing each step")
    memory.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="DeepSpeed's ZeRO stage, if launched so")
    memory.add_argument("overrides", nargs="*", metavar="key=value")
    evaluate = commands.add_parser("eval", help="score the base model, an expert or a composition on a task")
    evaluate.add_argument("experts", nargs="*", help="expert files (none: the base model; several: composed), or "
                                                     "one PEFT adapter directory")
    evaluate.add_argument("--task", help="task name, module:Name or path/to/file.py:Name (default: the expert's own)")
    evaluate.add_argument("--task-args", help="the task's arguments as JSON (default: the expert's own)")
    evaluate.add_argument("--model", default=None, help="base model (default: the experts' own, or the embedded one)")
    evaluate.add_argument("--alpha", type=float, nargs="+", help="one weight per expert (default: equal)")
    evaluate.add_argument("--mixing", choices=["sum", "anchored"], default="sum",
                          help=MIXING_HELP)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--size", type=int, default=200, help="problems drawn (each distinct one counted once)")
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--samples", type=int, default=0, help="samples per problem for pass@k (0: greedy only)")
    evaluate.add_argument("--temperature", type=float, default=1.0)
    evaluate.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    evaluate.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--output", "-o", help="JSON file for the result (default: eval_<task>_<split>.json)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing output file (never an input)")
    mix = commands.add_parser("compose", help="mix experts into one: z' = Σ α_k z_k")
    mix.add_argument("experts", nargs="+", help="expert files")
    mix.add_argument("--alpha", type=float, nargs="+", help="one weight per expert (default: equal)")
    mix.add_argument("--alpha-file", help="JSON {module: [one weight per expert]} for per-module mixing")
    mix.add_argument("--mixing", choices=["sum", "anchored"], default="sum",
                     help=MIXING_HELP)
    mix.add_argument("--output", "-o", required=True, help="expert file to write")
    mix.add_argument("--overwrite", action="store_true", help="replace an existing output file (never an input)")
    adapt = commands.add_parser("adapt", help="Transformer² two-pass inference over experts, on their tasks' mixture")
    adapt.add_argument("experts", nargs="+", help="expert files, or NAME=PATH (default name: the run directory)")
    adapt.add_argument("--strategy", required=True,
                       help="prompt | classifier | few-shot | router | oracle | base | a name")
    adapt.add_argument("--classifier", help="classifier expert (strategy classifier)")
    adapt.add_argument("--router", help="strategy router: a mixture file trained with policy_args.routing=sequence "
                                        "over these experts; its router is the first pass")
    adapt.add_argument("--describe", nargs="+", default=[], metavar="NAME=TEXT",
                       help="prompt strategy: what each category means, for the classification prompt")
    adapt.add_argument("--task", nargs="+", default=[], metavar="NAME=TASK",
                       help="the task of an expert that records none, or another (e.g. an import or composition)")
    adapt.add_argument("--task-args", nargs="+", default=[], metavar="NAME=JSON", help="that task's arguments")
    adapt.add_argument("--model", help="base model (default: the experts' own)")
    adapt.add_argument("--split", default="test")
    adapt.add_argument("--size", type=int, default=100, help="problems of each expert's task")
    adapt.add_argument("--shots", type=int, default=16, help="few-shot: problems per task scored by the search")
    adapt.add_argument("--shot-split", default="validation", help="few-shot: where shots come from")
    adapt.add_argument("--mixture-shots", action="store_true", help="few-shot: one α for the whole mixture")
    adapt.add_argument("--population", type=int, default=32)
    adapt.add_argument("--elite-fraction", type=float, default=0.2)
    adapt.add_argument("--iterations", type=int, default=10)
    adapt.add_argument("--per-layer", action="store_true", help="few-shot: one α per expert and matrix")
    adapt.add_argument("--mixing", choices=["sum", "anchored"], default="sum",
                       help=MIXING_HELP)
    adapt.add_argument("--first-pass", choices=["score", "generate"], default="score",
                       help="prompt and classifier: score each category's log-prob in one forward, or generate")
    adapt.add_argument("--first-pass-tokens", type=int, default=256, help="the first pass reads this much of a prompt")
    adapt.add_argument("--save-experts", metavar="DIR",
                       help="few-shot: write each α found as an expert file and as compose's --alpha-file JSON")
    adapt.add_argument("--prompts", metavar="FILE.jsonl",
                       help="answer your own prompts ({\"prompt\": text} or {\"messages\": [...]} per line) instead "
                            "of the experts' test problems; writes JSON lines")
    adapt.add_argument("--max-new-tokens", type=int, help="default: the largest of the experts' training budgets")
    adapt.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    adapt.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    adapt.add_argument("--seed", type=int, default=0)
    adapt.add_argument("--output", "-o", help="JSON file for the result (default: adapt_<strategy>.json)")
    adapt.add_argument("--overwrite", action="store_true", help="replace an existing output file (never an input)")
    merge = commands.add_parser("merge", help="bake an expert or adapter into a plain Hugging Face model directory")
    merge.add_argument("expert", help="expert file, or a PEFT adapter directory")
    merge.add_argument("output_dir", help="new (or empty) directory for the merged model")
    merge.add_argument("--model", help="base model (default: the expert's or adapter's own)")
    lora = commands.add_parser("export-lora", help="write an expert as a PEFT LoRA adapter of a given rank (servable "
                                                   "per request by vLLM --enable-lora)")
    lora.add_argument("expert", help="expert file")
    lora.add_argument("output_dir", help="new (or empty) directory for the adapter")
    lora.add_argument("--rank", type=int, required=True, help="LoRA rank: the largest |s_i (z_i - 1)| terms kept")
    lora.add_argument("--model", help="base model (default: the expert's own)")
    sakana = commands.add_parser("import-sakana", help="convert Sakana's Transformer² policy_params.pt")
    sakana.add_argument("file", help="policy_params.pt: learnable_params_module_list.{i}, raw pre-sigmoid p")
    sakana.add_argument("--model", required=True, help="the base model it was trained on")
    sakana.add_argument("--task", default="", help="the task it was trained for (eval and adapt use its problems)")
    sakana.add_argument("--task-args", help="that task's arguments as JSON")
    sakana.add_argument("--as-z", action="store_true", help="store z (composable) instead of their exact p")
    sakana.add_argument("--output", "-o", required=True, help="expert file to write")
    sakana.add_argument("--overwrite", action="store_true", help="replace an existing output file (never an input)")
    export = commands.add_parser("export", help="write the expert file of a checkpoint")
    export.add_argument("checkpoint", help="a run directory or one of its checkpoints/step_* directories")
    export.add_argument("output", help="expert file to write (.safetensors)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file (never an input)")
    inspect = commands.add_parser("inspect", help="summarise an expert file")
    inspect.add_argument("file")
    commands.add_parser("tasks", help="list built-in and installed tasks")
    from svf_rl.inputs import one_line

    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named after the command, as its other errors are
            raise UsageError(f"svf-rl {args.command}: error: unrecognized arguments: {' '.join(extra)}")
    except UsageError as err:
        print(one_line(str(err)), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file is noise
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from svf_rl.config import ConfigError, load_config
    from svf_rl.engines.vllm_engine import VLLMServerError
    from svf_rl.inference.expert import ExpertError
    from svf_rl.loop.train import TrainingError
    from svf_rl.policies import PolicyError

    try:
        if args.command == "train":
            from svf_rl.loop.train import train as run_training

            overrides = args.overrides + ([f"task={args.task}"] if args.task else [])
            run_training(load_config(args.config, overrides))
        elif args.command == "memory":
            from svf_rl.loop.memory import predict_run

            if args.processes < 1:
                raise ValueError(f"--processes must be at least 1, got {args.processes}")
            print(predict_run(load_config(args.config, args.overrides), args.model_config, args.prompt_tokens,
                              args.gpu_gib, args.dtype, args.processes, args.zero_stage))
        elif args.command == "eval":
            import json

            from svf_rl.inference.evaluate import default_output, eval_target
            from svf_rl.inference.evaluate import evaluate as run_eval
            from svf_rl.task import parse_task_args

            model, task, task_args = eval_target(args.experts, args.model, args.task, parse_task_args(args.task_args))
            output = args.output or default_output(task, args.split)
            result = run_eval(model, task, args.experts, args.alpha, task_args, split=args.split, size=args.size,
                              seed=args.seed, max_new_tokens=args.max_new_tokens, samples=args.samples,
                              temperature=args.temperature, engine=args.engine, dtype=args.dtype, output=output,
                              overwrite=args.overwrite, mixing=args.mixing)
            print(json.dumps(result, indent=2))
            print(f"result written to {output}")
        elif args.command == "compose":
            from svf_rl.inference.compose import compose_files

            written = compose_files(args.experts, args.output, args.alpha, args.alpha_file, args.overwrite,
                                    args.mixing)
            print(f"composed expert written to {written}")
        elif args.command == "adapt":
            from svf_rl.inference.adapt import CEM, parse_named, run_adaptation, summary_line
            from svf_rl.task import parse_task_args

            cem = CEM(args.population, args.elite_fraction, args.iterations, args.per_layer, seed=args.seed)
            output = args.output or ("answers.jsonl" if args.prompts else f"adapt_{args.strategy}.json")
            result = run_adaptation(args.experts, args.strategy, args.model, args.classifier, args.split, args.size,
                                    args.seed, args.shots, args.shot_split, args.mixture_shots, cem,
                                    args.max_new_tokens, args.engine, args.dtype, output,
                                    parse_named(args.describe), args.overwrite,
                                    parse_named(args.task, "--task", "TASK"),
                                    {name: parse_task_args(text) for name, text in
                                     parse_named(args.task_args, "--task-args", "JSON").items()},
                                    args.mixing, args.save_experts, args.prompts, args.first_pass,
                                    args.first_pass_tokens, args.router)
            if args.prompts:
                print(f"{result['n']} answers; routes: {result['routes']}")
            else:
                print(summary_line(result))
                print(f"per task: {result['per_task']}")
            if args.save_experts:
                print(f"the α found written to {args.save_experts}")
            print(f"result written to {output}")
        elif args.command == "merge":
            from svf_rl.inference.adapters import is_adapter_dir, merge_adapter
            from svf_rl.inference.merge import merge_expert

            merge = merge_adapter if is_adapter_dir(args.expert) else merge_expert
            print(f"merged model written to {merge(args.expert, args.output_dir, args.model)}")
        elif args.command == "export-lora":
            from svf_rl.inference.export_lora import export_lora

            report = export_lora(args.expert, args.output_dir, args.rank, args.model)
            print(f"rank-{report['rank']} LoRA adapter written to {args.output_dir}: {report['layers']} layers keep "
                  f"{100 * report['kept_min']:.1f}% (least) to {100 * max(report['kept'].values()):.1f}% of "
                  f"‖ΔW‖ (mean {100 * report['kept_mean']:.1f}%)")
        elif args.command == "import-sakana":
            from svf_rl.inference.sakana import import_file
            from svf_rl.task import parse_task_args

            expert, written = import_file(args.file, args.model, args.output, args.task, args.as_z, args.overwrite,
                                          parse_task_args(args.task_args))
            print(f"expert ({expert.parametrisation}) written to {written}")
        elif args.command == "export":
            from svf_rl.inference.export import export_checkpoint

            print(f"expert written to {export_checkpoint(args.checkpoint, args.output, args.overwrite)}")
        elif args.command == "inspect":
            from svf_rl.inference.expert import describe_expert, load_expert

            print(describe_expert(load_expert(args.file)))
        elif args.command == "tasks":
            from svf_rl.task import available_tasks, describe_task

            for name, target in sorted(available_tasks().items()):
                print(f"{name:20s} {describe_task(name)}  [{target}]")
    except (ConfigError, ExpertError, PolicyError, TrainingError, VLLMServerError, FileNotFoundError,
            FileExistsError, ValueError) as err:
        print(f"svf-rl {args.command}: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    return 0
