"""The RL loop: sample, score, compute advantages, REINFORCE + KL on z, step. Reads top to bottom."""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object, set_seed

from .base_model import cache_root, load_base_model, resolve_dtype, resolve_model_path
from .config import TrainConfig, config_dict
from .engine import HFEngine, Sampling, chat_ids
from .expert import Expert, load_expert, save_expert
from .export import read_run_info, write_run_info
from .logprobs import checkpoint_layers, completion_features, make_token_batch, plan_forward, token_stats, update_tokens
from .memory import estimate_memory, memory_report
from .objective import advantages, aggregate, kl_penalty, policy_loss
from .rewards import as_completion, reward_name, score_completions
from .run_files import (
    append_metrics,
    checkpoint_dirs,
    clear_run,
    plot_curve,
    publish_checkpoint,
    read_metrics,
    truncate_metrics,
    wilson_interval,
    write_atomic,
)
from .svd import model_fingerprint, weight_fingerprints
from .svf import (
    apply_expert,
    apply_svf,
    load_z,
    policy_step,
    reference_mode,
    set_weight_cache,
    svf_layers,
    z_vectors,
)
from .task import check_reward_columns, load_task, safe_score, unique_rows
from .update import check_precision, make_update, whole_matrices, zero_settings

log = logging.getLogger("svf_rl")


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why in one line."""


class RunState:
    """What a checkpoint holds besides optimiser, scheduler and RNG: z, the step, the best validation score,
    and the base model's test scores (measured at step 0, reported with the final expert)."""

    def __init__(self, model):
        self.model, self.step, self.best_accuracy, self.base_test = model, 0, -1.0, {}

    def state_dict(self) -> dict:
        return {"z": z_vectors(self.model), "step": self.step, "best_accuracy": self.best_accuracy,
                "base_test": self.base_test}

    def load_state_dict(self, state: dict) -> None:
        load_z(self.model, state["z"])
        self.step, self.best_accuracy = state["step"], state["best_accuracy"]
        self.base_test = state.get("base_test", {})


@torch.no_grad()
def evaluate(task, rows: list[dict], tokenizer, engine, config: TrainConfig, accelerator: Accelerator,
             max_new_tokens: int | None = None) -> dict:
    """Greedy held-out accuracy with its 95% interval; each rank scores its share of the rows."""
    mine = rows[accelerator.process_index::accelerator.num_processes]
    # Every rank generates for as many rows (ZeRO-3 forwards are collective); the padding is not scored.
    share = -(-len(rows) // accelerator.num_processes)
    padded = mine + rows[:share - len(mine)]
    prompts = [chat_ids(tokenizer, task.prompt(row)) for row in padded]
    sampling = Sampling(n=1, temperature=0.0, max_new_tokens=max_new_tokens or config.max_new_tokens)
    completions = []
    for first in range(0, len(prompts), config.eval_batch_size):
        completions += engine.generate(prompts[first:first + config.eval_batch_size], sampling)
    completions = completions[:len(mine)]
    correct = sum(safe_score(task, c.text, row) for c, row in zip(completions, mine, strict=True))
    correct = accelerator.reduce(torch.tensor(float(correct), device=accelerator.device), "sum").item()
    low, high = wilson_interval(correct, len(rows))
    return {"accuracy": correct / len(rows), "accuracy_low": low, "accuracy_high": high, "n": len(rows)}


def train(config: TrainConfig) -> Path:
    """Train an expert vector; return the path of the expert file (the best on validation)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(config, output_dir)
    check_precision(accelerator)
    set_seed(config.seed)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if config.prompts_per_step % world:
        raise TrainingError(f"prompts_per_step={config.prompts_per_step} must be a multiple of the "
                            f"{world} processes, which share each step's prompts")

    # Task first, so that bad data fails before the model loads; then the model and its SVF parametrisation.
    task = load_task(config.task, config.task_args)
    reward_funcs = list(task.reward_funcs)
    weights = config.reward_weights or list(task.reward_weights or [1.0] * len(reward_funcs))
    if len(weights) != len(reward_funcs):
        raise TrainingError(f"reward_weights has {len(weights)} entries; task {task.name!r} has "
                            f"{len(reward_funcs)} reward functions: {[reward_name(f) for f in reward_funcs]}")
    train_rows = task.rows("train", config.train_size, config.seed)
    validation_rows = unique_rows(task, task.rows("validation", config.eval_size, config.seed), "validation")
    test_rows = unique_rows(task, task.rows("test", config.test_size, config.seed), "test")
    check_reward_columns(task, train_rows[0])
    # The run directory, once the configuration and the task have passed their checks: bad input loses nothing.
    checkpoints = checkpoint_dirs(output_dir) if config.resume else []
    previous = read_run_info(output_dir) if checkpoints else {}
    check_resumable(previous, config, task.name, output_dir)
    accelerator.wait_for_everyone()
    if main:
        if not config.resume and clear_run(output_dir):
            log.info("resume=false: removed the previous run's checkpoints, experts and metrics in %s", output_dir)
        if not checkpoints:
            (output_dir / "metrics.jsonl").unlink(missing_ok=True)  # of a run killed before its first checkpoint
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(output_dir / "config.yaml", yaml.safe_dump(config_dict(config), sort_keys=False))
    accelerator.wait_for_everyone()
    dtype = resolve_dtype(config.dtype, accelerator.device)
    if dtype == torch.float16 and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise TrainingError("dtype=float16 needs loss scaling, which svf-rl does only without DeepSpeed; "
                            "use dtype=bfloat16 (or float32) with DeepSpeed")
    with whole_matrices(accelerator):  # also keeps ZeRO-3 out of the memory model's meta-device copy
        model, tokenizer = load_base_model(config.model, dtype)
        if main:
            longest = max(len(chat_ids(tokenizer, task.prompt(row))) for row in train_rows[:256] + test_rows[:256])
            stage, live = zero_settings(accelerator)
            accelerator.print(memory_report(estimate_memory(config, model.config, dtype, accelerator.device, longest,
                                                            world, zero_stage=stage, zero3_live_parameters=live)))
    base_weights = weight_fingerprints(model)  # every base weight, before apply_svf replaces the targets
    fingerprint = model_fingerprint(model, base_weights)
    if previous.get("base_fingerprint", fingerprint) != fingerprint:
        raise TrainingError(f"{output_dir} holds a run on other base weights (fingerprint "
                            f"{previous['base_fingerprint']}, this model's is {fingerprint}); give another "
                            f"output_dir, or resume=false to start afresh there")
    apply_svf(model, config.targets, config.forward_strategy, cache_root() / "svd", progress=config.progress and main)
    set_weight_cache(model, config.weight_cache)
    if config.gradient_checkpointing:
        checkpoint_layers(model)
    model.to(accelerator.device)
    update = make_update(accelerator, model, config)  # AdamW on z; DeepSpeed's engine when launched with it
    policy = update.module  # what training forwards call: the model, or the DeepSpeed engine around it
    forward = plan_forward(model, config.shared_prefix)
    z_params = [layer.z for layer in svf_layers(model).values()]
    state = RunState(model)
    accelerator.register_for_checkpointing(state, *update.checkpointed)  # custom_checkpoint_0 is the run state

    metrics_path, best_path = output_dir / "metrics.jsonl", output_dir / "expert_best.safetensors"
    if checkpoints:
        accelerator.load_state(str(checkpoints[-1]), **update.load_kwargs)
        if main:
            log.info("resumed from %s (step %d)", checkpoints[-1], state.step)
            truncate_metrics(metrics_path, state.step)
    # After resuming: the engine's first weights are the restored z.
    engine = make_engine(config, model, tokenizer, accelerator, base_weights)
    accelerator.init_trackers("svf_rl", config={k: str(v) for k, v in config_dict(config).items()})

    def make_expert(scores: dict) -> Expert:
        return Expert(z_vectors(model), config.model, fingerprint, config.targets, task.name,
                      config_dict(config), scores)

    if main:
        write_run_info(output_dir, config.model, fingerprint, config.targets, task.name, config.task_args)

    def log_metrics(record: dict) -> None:
        if main:
            append_metrics(metrics_path, record)
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    if state.step == 0:  # z = 1 still: the policy is the base model
        state.base_test = evaluate(task, test_rows, tokenizer, engine, config, accelerator)
        log_metrics({"step": 0, **{f"base_test/{k}": v for k, v in state.base_test.items()}})
        report(accelerator, "base model, test", state.base_test)
        if config.base_eval_max_new_tokens > config.max_new_tokens:  # how much is skill, not brevity
            generous = evaluate(task, test_rows, tokenizer, engine, config, accelerator,
                                config.base_eval_max_new_tokens)
            state.base_test["accuracy_generous"] = generous["accuracy"]
            log_metrics({"step": 0, **{f"base_test_{config.base_eval_max_new_tokens}_tokens/{k}": v
                                       for k, v in generous.items()}})
            report(accelerator, f"base model, test, {config.base_eval_max_new_tokens} new tokens", generous)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.description}"), disable=not (config.progress and main))
    bad_steps = failing_rewards = 0
    with bar:
        job = bar.add_task("", total=config.steps, completed=state.step)
        while state.step < config.steps:
            step = state.step + 1
            # 1. Sample the step's prompts (the same on every rank); each rank rolls out G completions of its share.
            rows = random.Random(config.seed * 1_000_003 + step).sample(train_rows, config.prompts_per_step)
            rows = rows[rank::world]
            conversations = [task.prompt(row) for row in rows]
            prompts = [chat_ids(tokenizer, messages) for messages in conversations]
            start = time.perf_counter()
            seeds = [hash((config.seed, step, i)) % 2**31 for i in range(config.prompts_per_step)][rank::world]
            completions = engine.generate(prompts, Sampling(config.generations_per_prompt, config.temperature,
                                                            config.top_p, config.max_new_tokens,
                                                            seeds if config.seeded_rollouts else None))
            rollout_time = time.perf_counter() - start

            # 2. Score them and turn rewards into advantages.
            group = config.generations_per_prompt
            repeated = [row for row in rows for _ in range(group)]
            columns = {key: [row[key] for row in repeated] for key in rows[0] if key != "prompt"}
            messages = [m for m in conversations for _ in range(group)]
            texts = [as_completion(m, c.text) for m, c in zip(messages, completions, strict=True)]
            rewards, per_func, reward_errors = score_completions(
                reward_funcs, weights, messages, texts, {**columns, "completion_ids": [c.ids for c in completions]},
                task.name)
            failing_rewards = failing_rewards + 1 if reward_errors else 0
            if failing_rewards >= config.max_bad_steps:
                name, error = next(iter(reward_errors.items()))
                raise TrainingError(f"task {task.name!r}: reward function {name} raised on {failing_rewards} "
                                    f"consecutive steps ({error}); stopped at step {step}")
            all_rewards = accelerator.gather(rewards.to(accelerator.device)).cpu()  # whole groups per rank
            advantage = advantages(all_rewards, group, config.baseline).view(world, -1)[rank]

            # 3. REINFORCE + KL on z, in micro-batches of whole groups; each group's prompt runs once (shared
            # prefix), and composing layers share the rollouts' W' for the whole step.
            start = time.perf_counter()
            # One completion width on every rank: ZeRO-3 gathers weights in each forward and head chunk, so the
            # ranks must run as many.
            width = accelerator.reduce(torch.tensor(max(len(c.ids) for c in completions), device=accelerator.device),
                                       "max").item()
            batch = make_token_batch([c.prompt_ids for c in completions], [c.ids for c in completions],
                                     tokenizer.pad_token_id, width).to(accelerator.device)
            shared = group if forward.shared_prefix else 1
            # Normalised by the whole step's counts, so the ranks' gradients add up to the single-process one.
            total_tokens = max(1, int(accelerator.reduce(batch.completion_mask.sum(), "sum")))
            sequences = config.prompts_per_step * group
            engine_logp = pad_logprobs([c.logprobs for c in completions], batch.completion_ids.shape[1])
            sums = torch.zeros(3, device=accelerator.device)  # loss, kl, entropy
            sampler_gap = torch.zeros(1, device=accelerator.device)  # max |log π_trainer − log π_engine|
            rows_per_micro = max(shared, config.micro_batch_size // shared * shared)
            with policy_step(model, update_tokens(batch, shared), update.compose_once_per_step):
                for first in range(0, len(batch), rows_per_micro):
                    micro = batch[first:first + rows_per_micro]
                    micro_adv = advantage[first:first + rows_per_micro].to(accelerator.device)
                    mask = micro.completion_mask
                    features = completion_features(policy, model, micro, shared, forward.hidden)
                    reference = None
                    if config.kl_coef > 0:  # the same forward at z = 1
                        with torch.no_grad(), reference_mode(model):
                            reference = completion_features(policy, model, micro, shared, forward.hidden)
                    full = reference if config.kl_estimator == "full" else None
                    logp, token_entropy, *full_kl = token_stats(features, micro.completion_ids, config.temperature,
                                                                forward.head, config.logit_chunk_tokens, full)
                    per_token = policy_loss(logp, logp.detach(), micro_adv)
                    if engine_logp is not None:  # the sampler's own log-probs: a stale or wrong engine shows here
                        sampled = engine_logp[first:first + rows_per_micro].to(accelerator.device)
                        sampler_gap = torch.maximum(sampler_gap, ((logp.detach() - sampled).abs() * mask).max())
                        if config.engine_ratio_cap > 0:  # off-policy samples: top-p truncation, sampler numerics
                            ratio = torch.exp(logp.detach() - sampled).clamp(max=config.engine_ratio_cap)
                            per_token = per_token * ratio
                    loss = aggregate(per_token, mask, config.loss_aggregation, total_tokens, sequences)
                    kl = torch.zeros_like(logp)
                    if config.kl_coef > 0:  # β · KL(π‖π_ref) of the step's completions, per completion token
                        with torch.no_grad():
                            ref_logp, _ = token_stats(reference, micro.completion_ids, config.temperature,
                                                      forward.head, config.logit_chunk_tokens)
                        kl, surrogate = kl_penalty(logp, ref_logp, mask, config.kl_estimator, *full_kl)
                        loss = loss + config.kl_coef * surrogate.sum() / total_tokens
                    update.backward(loss, last=first + rows_per_micro >= len(batch))
                    with torch.no_grad():
                        sums += torch.stack([loss.detach(), kl.sum() / total_tokens,
                                             (token_entropy * mask).sum() / total_tokens])
            sums = dict(zip(("loss", "kl", "entropy"), accelerator.reduce(sums, "sum").tolist(), strict=True))
            sampler_gap = accelerator.gather(sampler_gap).max().item() if engine_logp is not None else None
            # All ranks' gradient, clipped; not applied when it or the loss is not finite.
            grad_norm = update.step(loss_finite=math.isfinite(sums["loss"]))
            if update.overflowed:  # fp16: the loss scale was too high for this step's gradient
                log.info("step %d: fp16 gradient overflow; update skipped, loss scale now %g", step, update.scale)
            elif not math.isfinite(grad_norm):
                bad_steps += 1
                log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, bad_steps)
                if bad_steps >= config.max_bad_steps:
                    raise TrainingError(f"{bad_steps} consecutive non-finite losses or gradients; stopped at step "
                                        f"{step}, last checkpoint kept in {output_dir / 'checkpoints'}")
            else:
                bad_steps = 0
            update_time = time.perf_counter() - start
            start = time.perf_counter()
            engine.update_weights()
            sync_time = time.perf_counter() - start
            state.step = step

            # 4. Log what happened.
            deviation = torch.cat([(z.detach() - 1).abs() for z in z_params])
            checksum = accelerator.gather(torch.cat([z.detach().double().flatten() for z in z_params]).sum()[None])
            generated = sum(len(c.ids) for c in completions)
            all_per_func = {name: sum((part[name] for part in gather_object([per_func])), []) for name in per_func}
            record = {
                "step": step, "reward": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
                **{f"reward/{name}": mean_of(values) for name, values in all_per_func.items()},
                **{k: v for k, v in sums.items()}, "grad_norm": grad_norm,
                "z_dev_mean": deviation.mean().item(), "z_dev_max": deviation.max().item(),
                "completion_len": generated / len(completions), "lr": update.lr(), "loss_scale": update.scale,
                "update_tokens": accelerator.reduce(torch.tensor(update_tokens(batch, shared),
                                                                 device=accelerator.device), "sum").item(),
                "rollout_s": rollout_time, "update_s": update_time, "sync_s": sync_time,
                "rollout_tok_s": generated / max(rollout_time, 1e-9),
                "z_rank_spread": (checksum.max() - checksum.min()).item(),  # 0 unless the ranks' z diverged
                **({} if sampler_gap is None else {"sampler_logp_gap": sampler_gap}),
            }
            log_metrics(record)
            bar.update(job, advance=1, description=f"reward {record['reward']:.3f}  kl {record['kl']:.2e}  "
                                                   f"|z-1| {record['z_dev_mean']:.1e}")

            # 5. Evaluate, keep the best expert, checkpoint.
            if step % config.eval_every == 0 or step == config.steps:
                result = evaluate(task, validation_rows, tokenizer, engine, config, accelerator)
                log_metrics({"step": step, **{f"eval/{k}": v for k, v in result.items()}})
                if main:
                    bar.console.print(f"step {step}: validation accuracy {format_accuracy(result)}")
                if result["accuracy"] > state.best_accuracy:
                    state.best_accuracy = result["accuracy"]
                    if main:
                        save_expert(make_expert({"validation_accuracy": result["accuracy"]}), best_path)
                if main:
                    plot_curve(read_metrics(metrics_path), output_dir / "curve.png")
            if step % config.save_every == 0 or step == config.steps:
                save_checkpoint(accelerator, output_dir, step, update.checkpoint_kwargs)

    # Final: the best expert on validation, scored on the test split.
    accelerator.wait_for_everyone()
    if best_path.exists():
        apply_expert(model, load_expert(best_path), fingerprint)
        engine.update_weights()
    final_test = evaluate(task, test_rows, tokenizer, engine, config, accelerator)
    log_metrics({"step": state.step, **{f"test/{k}": v for k, v in final_test.items()}})
    scores = {"validation_accuracy": state.best_accuracy, "test_accuracy": final_test["accuracy"],
              "test_n": final_test["n"]}
    if state.base_test:
        scores["base_test_accuracy"] = state.base_test["accuracy"]
        if "accuracy_generous" in state.base_test:
            generous = f"base_test_accuracy_{config.base_eval_max_new_tokens}_tokens"
            scores[generous] = state.base_test["accuracy_generous"]
    expert_path = output_dir / "expert.safetensors"
    if main:
        save_expert(make_expert(scores), expert_path)
        plot_curve(read_metrics(metrics_path), output_dir / "curve.png")
    if state.base_test:
        report(accelerator, "base model, test", state.base_test)
    report(accelerator, "expert, test", final_test)
    accelerator.print(f"expert written to {expert_path}")
    accelerator.end_training()
    return expert_path


def check_resumable(previous: dict, config: TrainConfig, task_name: str, output_dir: Path) -> None:
    """Refuse to continue checkpoints of another run (base model, targets or task), before the model loads."""
    if not previous:
        return
    mine = {"base_model": config.model, "targets": config.targets, "task": task_name, "task_args": config.task_args}
    for key, value in mine.items():
        if key in previous and previous[key] != value:
            raise TrainingError(f"{output_dir} holds checkpoints of a run with {key}={previous[key]!r}, not "
                                f"{value!r}; give another output_dir, or resume=false to start afresh there")


def make_accelerator(config: TrainConfig, output_dir: Path) -> Accelerator:
    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available():
        # DeepSpeed on CPU needs gloo named explicitly, and would spend a minute compiling its shared-memory op.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(log_with=available_trackers(config.log_with) or None, project_dir=str(output_dir),
                       kwargs_handlers=handlers)


def make_engine(config: TrainConfig, model, tokenizer, accelerator: Accelerator, fingerprints: dict[str, str]):
    if config.engine == "vllm":
        if any(layer.sharded for layer in svf_layers(model).values()):
            raise TrainingError("engine=vllm is not supported with DeepSpeed ZeRO-3 yet (it would gather every "
                                "layer to compose W'); use ZeRO-2, DDP or engine=hf")
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model, tokenizer, resolve_model_path(config.model), seed=config.seed,
                          gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                          max_model_len=config.vllm_max_model_len)
    if config.engine == "vllm_server":
        from .vllm_engine import VLLMServerEngine

        return VLLMServerEngine(model, tokenizer, config.vllm_server_urls, config.vllm_server_timeout,
                                main=accelerator.is_main_process, wait=accelerator.wait_for_everyone,
                                fingerprints=fingerprints)
    return HFEngine(model, tokenizer)


def pad_logprobs(logprobs: list[list[float] | None], width: int) -> torch.Tensor | None:
    """The engine's sampled-token log-probs as [B, width], or None when the engine gives none."""
    if any(lp is None for lp in logprobs):
        return None
    padded = torch.zeros(len(logprobs), width)
    for row, values in enumerate(logprobs):
        padded[row, :len(values)] = torch.tensor(values)
    return padded


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, kwargs: dict) -> None:
    """accelerate state (z, optimiser, scheduler, RNG) written to a staging dir, then renamed in one step."""
    staging = output_dir / "checkpoints" / f".staging_{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), **kwargs)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_checkpoint(staging, output_dir, step)


def available_trackers(names: list[str]) -> list[str]:
    import importlib.util

    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
    return [n for n in names if importlib.util.find_spec(modules.get(n, n)) is not None]


def mean_of(values: list) -> float:
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else float("nan")


def format_accuracy(result: dict) -> str:
    return (f"{100 * result['accuracy']:.1f}% (95% CI {100 * result['accuracy_low']:.1f}-"
            f"{100 * result['accuracy_high']:.1f}, n={result['n']})")


def report(accelerator: Accelerator, label: str, result: dict) -> None:
    accelerator.print(f"{label}: {format_accuracy(result)}")
