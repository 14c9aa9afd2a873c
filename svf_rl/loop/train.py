"""The RL loop: sample, roll out, score, advantages, REINFORCE + KL, step, sync. Reads top to bottom; what it
trains is the policy's business (svf_rl.policies)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object, set_seed

from svf_rl.base_model import load_base_model, resolve_dtype, resolve_model_path
from svf_rl.config import TrainConfig, config_dict
from svf_rl.engines.hf import Sampling, chat_ids
from svf_rl.inference.export import read_run_info, write_run_info
from svf_rl.loop.logprobs import (
    checkpoint_layers,
    completion_features,
    make_token_batch,
    plan_forward,
    token_stats,
    update_tokens,
)
from svf_rl.loop.memory import estimate_memory, memory_report
from svf_rl.loop.objective import advantages, aggregate, kl_penalty, policy_loss
from svf_rl.loop.update import check_precision, make_update, whole_matrices, zero_settings
from svf_rl.policies import make_policy
from svf_rl.rewards import as_completion, reward_name, score_completions
from svf_rl.run_files import (
    append_metrics,
    checkpoint_dirs,
    clear_run,
    plot_curve,
    publish_checkpoint,
    read_metrics,
    truncate_metrics,
    write_atomic,
)
from svf_rl.svd import model_fingerprint, weight_fingerprints
from svf_rl.task import check_reward_columns, load_reward, load_task, unique_rows

log = logging.getLogger("svf_rl")


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why in one line."""


class RunState:
    """What a checkpoint holds besides optimiser, scheduler and RNG: the policy's trainable state, the step, the
    best validation score, the base model's test scores (measured at step 0, reported at the end), and the seconds
    the steps have taken so far (what `max_train_minutes` counts, across resumes)."""

    def __init__(self, policy):
        self.policy, self.step, self.best_accuracy, self.base_test = policy, 0, -1.0, {}
        self.train_seconds = 0.0

    def state_dict(self) -> dict:
        return {self.policy.checkpoint_key: self.policy.state_dict(), "step": self.step,
                "best_accuracy": self.best_accuracy, "base_test": self.base_test,
                "train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict) -> None:
        if self.policy.checkpoint_key not in state:
            raise TrainingError(f"the checkpoint holds no {self.policy.checkpoint_key!r} state: it is not a "
                                f"{self.policy.name} run")
        self.policy.load_state_dict(state[self.policy.checkpoint_key])
        self.step, self.best_accuracy = state["step"], state["best_accuracy"]
        self.base_test = state.get("base_test", {})
        self.train_seconds = state.get("train_seconds", 0.0)


@torch.no_grad()
def evaluate(task, rows: list[dict], tokenizer, engine, config: TrainConfig, accelerator: Accelerator,
             max_new_tokens: int | None = None) -> dict:
    """Greedy held-out accuracy with its 95% interval; each rank scores its share of the rows."""
    from svf_rl.inference.evaluate import greedy_accuracy

    result = greedy_accuracy(task, rows, tokenizer, engine, max_new_tokens or config.max_new_tokens,
                             config.eval_batch_size, accelerator)
    result.pop("greedy")  # the completions themselves are not logged
    return result


@dataclass
class Run:
    """Everything the loop works with, built by `setup`."""

    config: TrainConfig
    accelerator: Accelerator
    task: object
    reward_funcs: list
    weights: list
    train_rows: list[dict]
    validation_rows: list[dict]
    test_rows: list[dict]
    model: torch.nn.Module
    tokenizer: object
    policy: object  # what trains (svf_rl.policies)
    update: object  # how its gradient becomes a step (svf_rl.loop.update)
    forward: object  # how the update runs its forwards (svf_rl.loop.logprobs.plan_forward)
    engine: object  # the rollout engine (svf_rl.engines.hf)
    state: RunState
    record: dict  # base model, fingerprint, targets, task, config: what an artefact records
    output_dir: Path
    update_tokens: int = 0  # token positions the last update's forwards ran over

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            append_metrics(self.output_dir / "metrics.jsonl", record)
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                                 step=record["step"])

    def artefact(self, best: bool = False) -> Path:
        name = self.policy.artefact
        if best:
            stem, dot, suffix = name.partition(".")
            name = f"{stem}_best{dot}{suffix}"
        return self.output_dir / name


def train(config: TrainConfig) -> Path:
    """Train the configured policy with REINFORCE + KL; return the path of what it saved (the best on validation,
    scored on the test split)."""
    run = setup(config)
    state, accelerator = run.state, run.accelerator
    if state.step == 0:  # the policy is the base model still
        score_base_model(run)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.description}"), disable=not (config.progress and accelerator.is_main_process))
    failures = {"bad_steps": 0, "failing_rewards": 0}
    with bar:
        job = bar.add_task("", total=config.steps, completed=state.step)
        # A resumed run may have used its budget (every rank read the same count); later, `last` decides for all.
        used = bool(config.max_train_minutes) and state.train_seconds >= 60 * config.max_train_minutes
        while state.step < config.steps and not used:
            step, started = state.step + 1, time.perf_counter()
            rows, conversations = sample_prompts(run, step)  # 1. this rank's share of the step's prompts
            completions, rollout_time = roll_out(run, rows, conversations, step)  # 2. G completions each
            rewards, advantage, per_func = score(run, rows, conversations, completions, step, failures)  # 3.
            sampling = {"rollout_s": rollout_time, "sampled_tokens": sum(len(c.ids) for c in completions)}
            if config.max_sampling_rounds > 1:  # 3b. keep groups with signal, draw more (dynamic sampling)
                completions, advantage = informative_groups(run, step, completions, rewards, failures, sampling)
            sums, sampler_gap, grad_norm, update_time = update_policy(run, completions, advantage)  # 4. loss, step
            check_step(run, step, grad_norm, failures)
            start = time.perf_counter()
            run.engine.update_weights()  # 5. the engine samples from the updated policy
            sync_time = time.perf_counter() - start
            state.step = step

            record = step_record(run, step, rewards, per_func, sums, grad_norm, sampler_gap, completions,
                                 {**sampling, "update_s": update_time, "sync_s": sync_time})
            run.log(record)
            bar.update(job, advance=1, description=f"reward {record['reward']:.3f}  kl {record['kl']:.2e}  "
                                                   f"{run.policy.progress(record)}")
            last = step == config.steps or out_of_time(run, state.train_seconds + time.perf_counter() - started)
            if step % config.eval_every == 0 or last:
                validate(run, step, bar.console)
            state.train_seconds += time.perf_counter() - started
            if step % config.save_every == 0 or last:
                save_checkpoint(accelerator, run.output_dir, step, run.update.checkpoint_kwargs)
            if last:
                break
    return finish(run)


def out_of_time(run: Run, seconds: float) -> bool:
    """Whether the steps (with their validations) have used `max_train_minutes`; the slowest rank's count decides,
    so every rank stops at the same step."""
    if not run.config.max_train_minutes:
        return False
    spent = run.accelerator.reduce(torch.tensor(seconds, device=run.accelerator.device), "max").item()
    if spent < 60 * run.config.max_train_minutes:
        return False
    log.info("step %d: %.1f minutes of max_train_minutes=%g used; training ends here", run.state.step, spent / 60,
             run.config.max_train_minutes)
    return True


def setup(config: TrainConfig) -> Run:
    """Check everything that can be checked before the model loads, then load it, attach the policy, and build the
    update and the engine; resume from the latest checkpoint if there is one."""
    if config.threads:
        torch.set_num_threads(config.threads)
    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(config, output_dir)
    check_precision(accelerator)
    set_seed(config.seed)
    main, world = accelerator.is_main_process, accelerator.num_processes
    if config.prompts_per_step % world:
        raise TrainingError(f"prompts_per_step={config.prompts_per_step} must be a multiple of the "
                            f"{world} processes, which share each step's prompts")

    # Task first, so that bad data fails before the model loads.
    task = load_task(config.task, config.task_args)
    # Trained on the task's rewards or those given; held-out scores stay the task's own.
    reward_funcs = [load_reward(r) for r in config.rewards] or list(task.reward_funcs)
    own_weights = None if config.rewards else task.reward_weights
    weights = config.reward_weights or list(own_weights or [1.0] * len(reward_funcs))
    if len(weights) != len(reward_funcs):
        raise TrainingError(f"reward_weights has {len(weights)} entries; task {task.name!r} has "
                            f"{len(reward_funcs)} reward functions: {[reward_name(f) for f in reward_funcs]}")
    train_rows = task.rows("train", config.train_size, config.seed)
    # The held-out problems do not depend on the seed: runs that differ in seed are scored on the same ones.
    validation_rows = unique_rows(task, task.rows("validation", config.eval_size, HELDOUT_SEED), "validation")
    test_rows = unique_rows(task, task.rows("test", config.test_size, HELDOUT_SEED), "test")
    check_reward_columns(task, train_rows[0], reward_funcs)
    policy = make_policy(config)
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
    base_weights = weight_fingerprints(model)  # every base weight, before the policy adapts any
    fingerprint = model_fingerprint(model, base_weights)
    if previous.get("base_fingerprint", fingerprint) != fingerprint:
        raise TrainingError(f"{output_dir} holds a run on other base weights (fingerprint "
                            f"{previous['base_fingerprint']}, this model's is {fingerprint}); give another "
                            f"output_dir, or resume=false to start afresh there")
    sample = random.Random(config.seed).sample(train_rows, min(len(train_rows), CALIBRATION_PROMPTS))
    policy.attach(model, [chat_ids(tokenizer, task.prompt(row)) for row in sample], progress=config.progress and main)
    if config.gradient_checkpointing:
        checkpoint_layers(model)
    model.to(accelerator.device)
    update = make_update(accelerator, model, policy, config)  # AdamW; DeepSpeed's engine when launched with it
    forward = plan_forward(model, config.shared_prefix)
    state = RunState(policy)
    accelerator.register_for_checkpointing(state, *update.checkpointed)  # custom_checkpoint_0 is the run state

    if checkpoints:
        accelerator.load_state(str(checkpoints[-1]), **update.load_kwargs)
        if main:
            log.info("resumed from %s (step %d)", checkpoints[-1], state.step)
            truncate_metrics(output_dir / "metrics.jsonl", state.step)
    # After resuming: the engine's first weights are the restored policy's.
    engine = make_engine(config, model, tokenizer, policy, accelerator, base_weights)
    accelerator.init_trackers("svf_rl", config={k: str(v) for k, v in config_dict(config).items()})
    if main:
        write_run_info(output_dir, config.model, fingerprint, config.targets, task.name, config.task_args,
                       config.policy, config.policy_args)
    record = {"model": config.model, "fingerprint": fingerprint, "targets": config.targets, "task": task.name,
              "config": config_dict(config)}
    return Run(config, accelerator, task, reward_funcs, weights, train_rows, validation_rows, test_rows, model,
               tokenizer, policy, update, forward, engine, state, record, output_dir)


HELDOUT_SEED = 0  # validation and test problems are drawn with it, whatever the run's seed
CALIBRATION_PROMPTS = 64  # training prompts a policy may look at when it attaches (LoRA-drop's layer choice)


def score_base_model(run: Run) -> None:
    """π_ref's test score: the base model, also for a policy that does not start at it (a mixture of experts)."""
    with contextlib.nullcontext() if run.policy.starts_at_base else run.policy.reference():
        base_scores(run)


def base_scores(run: Run) -> None:
    config, state = run.config, run.state
    state.base_test = evaluate(run.task, run.test_rows, run.tokenizer, run.engine, config, run.accelerator)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in run.policy.parameters())  # ZeRO-3: whole
    run.log({"step": 0, **{f"base_test/{k}": v for k, v in state.base_test.items()}, "trainable_parameters": trainable})
    report(run.accelerator, "base model, test", state.base_test)
    if config.base_eval_max_new_tokens > config.max_new_tokens:  # how much is skill, not brevity
        generous = evaluate(run.task, run.test_rows, run.tokenizer, run.engine, config, run.accelerator,
                            config.base_eval_max_new_tokens)
        state.base_test["accuracy_generous"] = generous["accuracy"]
        run.log({"step": 0, **{f"base_test_{config.base_eval_max_new_tokens}_tokens/{k}": v
                               for k, v in generous.items()}})
        report(run.accelerator, f"base model, test, {config.base_eval_max_new_tokens} new tokens", generous)


def sample_prompts(run: Run, step: int, round: int = 1) -> tuple[list[dict], list[list[dict]]]:
    """The step's prompts (for its `round`-th rollout), the same on every rank; each rank keeps its share."""
    config, rank, world = run.config, run.accelerator.process_index, run.accelerator.num_processes
    draw = random.Random(config.seed * 1_000_003 + step if round == 1 else f"{config.seed}/{step}/{round}")
    rows = draw.sample(run.train_rows, config.prompts_per_step)[rank::world]
    return rows, [run.task.prompt(row) for row in rows]


def roll_out(run: Run, rows: list[dict], conversations: list[list[dict]], step: int, round: int = 1
             ) -> tuple[list, float]:
    config, rank, world = run.config, run.accelerator.process_index, run.accelerator.num_processes
    prompts = [chat_ids(run.tokenizer, messages) for messages in conversations]
    start = time.perf_counter()
    key = (config.seed, step) if round == 1 else (config.seed, step, round)
    seeds = [hash((*key, i)) % 2**31 for i in range(config.prompts_per_step)][rank::world]
    completions = run.engine.generate(prompts, Sampling(config.generations_per_prompt, config.temperature,
                                                        config.top_p, config.max_new_tokens,
                                                        seeds if config.seeded_rollouts else None))
    for i, completion in enumerate(completions):  # for the policy's statistics per source task
        completion.source = run.task.source(rows[i // config.generations_per_prompt])
    return completions, time.perf_counter() - start


def score(run: Run, rows: list[dict], conversations: list[list[dict]], completions: list, step: int,
          failures: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Every rank's rewards (whole groups per rank), and this rank's advantages."""
    config, accelerator, task = run.config, run.accelerator, run.task
    group = config.generations_per_prompt
    repeated = [row for row in rows for _ in range(group)]
    columns = {key: [row[key] for row in repeated] for key in rows[0] if key != "prompt"}
    messages = [m for m in conversations for _ in range(group)]
    texts = [as_completion(m, c.text) for m, c in zip(messages, completions, strict=True)]
    rewards, per_func, reward_errors = score_completions(
        run.reward_funcs, run.weights, messages, texts, {**columns, "completion_ids": [c.ids for c in completions]},
        task.name)
    failures["failing_rewards"] = failures["failing_rewards"] + 1 if reward_errors else 0
    if failures["failing_rewards"] >= config.max_bad_steps:
        name, error = next(iter(reward_errors.items()))
        raise TrainingError(f"task {task.name!r}: reward function {name} raised on {failures['failing_rewards']} "
                            f"consecutive steps ({error}); stopped at step {step}")
    all_rewards = accelerator.gather(rewards.to(accelerator.device)).cpu()
    advantage = advantages(all_rewards, group, config.baseline).view(accelerator.num_processes, -1)
    return all_rewards, advantage[accelerator.process_index], per_func


def informative_groups(run: Run, step: int, completions: list, rewards: torch.Tensor, failures: dict,
                       sampling: dict) -> tuple[list, torch.Tensor]:
    """Dynamic sampling (DAPO): a group whose rewards all agree has zero advantage and no policy gradient, so it is
    dropped, and further prompts are rolled out (up to max_sampling_rounds rollouts in the step) until
    prompts_per_step groups differ. Chosen in the prompts' order from every rank's groups, so the same whatever the
    number of processes, and dealt out as whole groups, as many on every rank. With none, the first groups stay,
    as without it. Returns this rank's completions and advantages."""
    config, rank, world = run.config, run.accelerator.process_index, run.accelerator.num_processes
    first = groups = all_groups(run, completions, rewards)
    kept, sampled, round = [], 0, 1
    while True:
        kept += [(group, r) for group, r in groups if r.max() > r.min()]
        sampled += len(groups)
        if len(kept) >= config.prompts_per_step or round == config.max_sampling_rounds:
            break
        round += 1
        rows, conversations = sample_prompts(run, step, round)
        completions, seconds = roll_out(run, rows, conversations, step, round)
        rewards, _, _ = score(run, rows, conversations, completions, step, failures)
        groups = all_groups(run, completions, rewards)
        sampling["rollout_s"] += seconds
        sampling["sampled_tokens"] += sum(len(c.ids) for c in completions)
    sampling.update(sampling_rounds=round, informative_groups=len(kept) / sampled)
    kept = kept[:config.prompts_per_step]
    kept = kept[:len(kept) // world * world] or first
    advantage = advantages(torch.cat([r for _, r in kept]), config.generations_per_prompt, config.baseline)
    mine = range(rank, len(kept), world)
    return [c for i in mine for c in kept[i][0]], advantage.view(len(kept), -1)[rank::world].reshape(-1)


def all_groups(run: Run, completions: list, rewards: torch.Tensor) -> list[tuple[list, torch.Tensor]]:
    """Every rank's (completions, rewards) per prompt, in the order the prompts were drawn: rank r holds prompts
    r, r + world, ... (`sample_prompts`), and `rewards` are gathered rank by rank."""
    group, world = run.config.generations_per_prompt, run.accelerator.num_processes
    per_rank = [[part[i:i + group] for i in range(0, len(part), group)] for part in gather_object([completions])]
    per_rank_rewards = rewards.view(world, -1, group)
    return [(per_rank[p % world][p // world], per_rank_rewards[p % world][p // world])
            for p in range(sum(map(len, per_rank)))]


def update_policy(run: Run, completions: list, advantage: torch.Tensor) -> tuple[dict, float | None, float, float]:
    """REINFORCE + β·KL on the policy's parameters, in micro-batches of whole groups; each group's prompt runs once
    (shared prefix). Returns the step's loss, KL and entropy, the sampler gap, the gradient norm and the time."""
    config, accelerator, policy, forward = run.config, run.accelerator, run.policy, run.forward
    start = time.perf_counter()
    group = config.generations_per_prompt
    # One completion width on every rank: ZeRO-3 gathers weights in each forward and head chunk, so the ranks must
    # run as many.
    width = accelerator.reduce(torch.tensor(max(len(c.ids) for c in completions), device=accelerator.device),
                               "max").item()
    batch = make_token_batch([c.prompt_ids for c in completions], [c.ids for c in completions],
                             run.tokenizer.pad_token_id, width).to(accelerator.device)
    shared = group if forward.shared_prefix else 1
    # Normalised by the whole step's counts, so the ranks' gradients add up to the single-process one.
    total_tokens = max(1, int(accelerator.reduce(batch.completion_mask.sum(), "sum")))
    sequences = int(accelerator.reduce(torch.tensor(len(batch), device=accelerator.device), "sum"))
    engine_logp = pad_logprobs([c.logprobs for c in completions], batch.completion_ids.shape[1])
    sums = torch.zeros(3, device=accelerator.device)  # loss, kl, entropy
    sampler_gap = torch.zeros(1, device=accelerator.device)  # max |log π_trainer − log π_engine|
    rows_per_micro = max(shared, config.micro_batch_size // shared * shared)
    run.update_tokens = update_tokens(batch, shared)
    with policy.step(run.update_tokens, run.update.gradients_at_step_end, run.update.loss_multiplier, len(batch),
                     update_tokens(batch, shared, padding=False)):
        for first in range(0, len(batch), rows_per_micro):
            micro = batch[first:first + rows_per_micro]
            micro_adv = advantage[first:first + rows_per_micro].to(accelerator.device)
            mask = micro.completion_mask
            with policy.sequences(completions[first:first + rows_per_micro]):
                features = completion_features(run.update.module, run.model, micro, shared, forward.hidden)
            reference = None
            if config.kl_coef > 0:  # the same forward as π_ref
                with torch.no_grad(), policy.reference():
                    reference = completion_features(run.update.module, run.model, micro, shared, forward.hidden)
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
            last = first + rows_per_micro >= len(batch)
            penalty = policy.regulariser() if last else None
            if penalty is not None:  # once per step: each rank adds its share, as the ranks' gradients are summed
                loss = loss + penalty / accelerator.num_processes
            run.update.backward(loss, last=last)
            with torch.no_grad():
                sums += torch.stack([loss.detach(), kl.sum() / total_tokens,
                                     (token_entropy * mask).sum() / total_tokens])
    sums = dict(zip(("loss", "kl", "entropy"), accelerator.reduce(sums, "sum").tolist(), strict=True))
    gap = accelerator.gather(sampler_gap).max().item() if engine_logp is not None else None
    # All ranks' gradient, clipped; not applied when it or the loss is not finite.
    grad_norm = run.update.step(loss_finite=math.isfinite(sums["loss"]))
    return sums, gap, grad_norm, time.perf_counter() - start


def check_step(run: Run, step: int, grad_norm: float, failures: dict) -> None:
    """A skipped fp16 overflow is logged; too many non-finite steps in a row stop the run."""
    if run.update.overflowed:  # fp16: the loss scale was too high for this step's gradient
        log.info("step %d: fp16 gradient overflow; update skipped, loss scale now %g", step, run.update.scale)
    elif not math.isfinite(grad_norm):
        failures["bad_steps"] += 1
        log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, failures["bad_steps"])
        if failures["bad_steps"] >= run.config.max_bad_steps:
            raise TrainingError(f"{failures['bad_steps']} consecutive non-finite losses or gradients; stopped at "
                                f"step {step}, last checkpoint kept in {run.output_dir / 'checkpoints'}")
    else:
        failures["bad_steps"] = 0


def step_record(run: Run, step: int, rewards: torch.Tensor, per_func: dict, sums: dict, grad_norm: float,
                sampler_gap: float | None, completions: list, times: dict) -> dict:
    accelerator = run.accelerator
    params = run.policy.parameters()
    checksum = accelerator.gather(torch.cat([p.detach().double().flatten() for p in params]).sum()[None])
    generated = sum(len(c.ids) for c in completions)
    sampled = times.pop("sampled_tokens", generated)  # every rollout's tokens, with dynamic sampling's extra
    all_per_func = {name: sum((part[name] for part in gather_object([per_func])), []) for name in per_func}
    return {
        "step": step, "reward": rewards.mean().item(), "reward_std": rewards.std().item(),
        **{f"reward/{name}": mean_of(values) for name, values in all_per_func.items()},
        **sums, "grad_norm": grad_norm, **run.policy.metrics(),
        "completion_len": generated / len(completions), "lr": run.update.lr(), "loss_scale": run.update.scale,
        "update_tokens": accelerator.reduce(torch.tensor(run.update_tokens, device=accelerator.device),
                                            "sum").item(),
        **times, "rollout_tok_s": sampled / max(times["rollout_s"], 1e-9),
        "param_rank_spread": (checksum.max() - checksum.min()).item(),  # 0 unless the ranks' parameters diverged
        **({} if sampler_gap is None else {"sampler_logp_gap": sampler_gap}),
    }


def validate(run: Run, step: int, console) -> None:
    """Score the validation split; keep the best policy's artefact."""
    result = evaluate(run.task, run.validation_rows, run.tokenizer, run.engine, run.config, run.accelerator)
    run.log({"step": step, **{f"eval/{k}": v for k, v in result.items()}})
    main = run.accelerator.is_main_process
    if main:
        console.print(f"step {step}: validation accuracy {format_accuracy(result)}")
    if result["accuracy"] > run.state.best_accuracy:
        run.state.best_accuracy = result["accuracy"]
        if main:
            run.policy.save(run.artefact(best=True), run.record, {"validation_accuracy": result["accuracy"]})
    if main:
        plot_curve(read_metrics(run.output_dir / "metrics.jsonl"), run.output_dir / "curve.png")


def finish(run: Run) -> Path:
    """The best policy on validation, scored on the test split and saved beside the base model's score."""
    accelerator, state = run.accelerator, run.state
    accelerator.wait_for_everyone()
    best = run.artefact(best=True)
    if best.exists():
        run.policy.load(best, run.record["fingerprint"])
        run.engine.update_weights()
    final_test = evaluate(run.task, run.test_rows, run.tokenizer, run.engine, run.config, accelerator)
    run.log({"step": state.step, **{f"test/{k}": v for k, v in final_test.items()}})
    scores = {"validation_accuracy": state.best_accuracy, "test_accuracy": final_test["accuracy"],
              "test_n": final_test["n"]}
    if state.base_test:
        scores["base_test_accuracy"] = state.base_test["accuracy"]
        if "accuracy_generous" in state.base_test:
            generous = f"base_test_accuracy_{run.config.base_eval_max_new_tokens}_tokens"
            scores[generous] = state.base_test["accuracy_generous"]
    path = run.artefact()
    if accelerator.is_main_process:
        run.policy.save(path, run.record, scores)
        plot_curve(read_metrics(run.output_dir / "metrics.jsonl"), run.output_dir / "curve.png")
    if state.base_test:
        report(accelerator, "base model, test", state.base_test)
    report(accelerator, f"{path.stem}, test", final_test)
    accelerator.print(f"{path.stem} written to {path}")
    accelerator.end_training()
    return path


def check_resumable(previous: dict, config: TrainConfig, task_name: str, output_dir: Path) -> None:
    """Refuse to continue checkpoints of another run (base model, targets, task or policy), before the model loads."""
    if not previous:
        return
    mine = {"base_model": config.model, "targets": config.targets, "task": task_name, "task_args": config.task_args,
            "policy": config.policy, "policy_args": config.policy_args}
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


def make_engine(config: TrainConfig, model, tokenizer, policy, accelerator: Accelerator,
                fingerprints: dict[str, str]):
    from svf_rl.engines.hf import make_engine as engine_for

    if config.engine == "vllm" and policy.sharded:
        raise TrainingError("engine=vllm is not supported with DeepSpeed ZeRO-3 yet (it would gather every adapted "
                            "layer to build its weight); use ZeRO-2, DDP or engine=hf")
    return engine_for(config.engine, model, tokenizer, policy, model_path=resolve_model_path(config.model),
                      seed=config.seed, gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                      max_model_len=config.vllm_max_model_len, urls=config.vllm_server_urls,
                      timeout=config.vllm_server_timeout, accelerator=accelerator, fingerprints=fingerprints)


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
