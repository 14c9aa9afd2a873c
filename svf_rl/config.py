"""Training configuration: one dataclass, loadable from YAML and overridable with key=value."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from svf_rl.base_model import EMBEDDED_MODEL
from svf_rl.policies import POLICIES

GROUP_BASELINES = ("rloo", "grpo")  # advantages within each prompt's group: equal rewards give zero


@dataclass
class TrainConfig:
    # Base model and what trains in it
    model: str = EMBEDDED_MODEL  # HF id or directory; the default is SmolLM2-135M-Instruct, shipped offline
    policy: str = "svf"  # svf | lora | dora | loraplus | lorafa | vera | adalora | tinylora | ia3 | delta_lora |
    #                      lora_drop (docs/policies.md)
    policy_args: dict = field(default_factory=dict)  # the policy's own arguments (docs/policies.md)
    targets: str = "mlp"  # the matrices every policy adapts: mlp | attn | all | a regex over module names
    forward_strategy: str = "auto"  # svf: auto | compose | factored
    dtype: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | bfloat16 | float16 | float32; z stays fp32
    # Task
    task: str = "arithmetic"  # a registered task name, module:Name or path/to/file.py:Name
    task_args: dict = field(default_factory=dict)
    rewards: list = field(default_factory=list)  # trained on instead of the task's: module:function or file.py:function
    #                                              (reward_fns.control:coin_flip is the random-reward control);
    #                                              held-out scores stay the task's own
    reward_weights: list = field(default_factory=list)  # one per reward function; empty = the task's own
    train_size: int = 5000  # training problems drawn from the task
    # Rollouts
    engine: str = "hf"  # hf | vllm (colocated in the trainer process) | vllm_server (launch/vllm_server.sh)
    engine_ratio_cap: float = 0.0  # > 0: weight tokens by min(π_trainer/π_engine, cap) for the sampler's numerics
    vllm_gpu_memory_utilization: float = 0.3  # share of GPU memory for vLLM's weights and KV cache
    vllm_max_model_len: int = 2048  # longest prompt + completion vLLM accepts; its KV cache is sized for it
    vllm_server_urls: list = field(default_factory=lambda: ["http://localhost:8000"])  # engine=vllm_server
    vllm_server_timeout: float = 300.0  # seconds to wait for the servers to answer at start-up
    prompts_per_step: int = 8
    generations_per_prompt: int = 4
    max_new_tokens: int = 12
    temperature: float = 1.0
    top_p: float = 1.0
    max_sampling_rounds: int = 1  # > 1: dynamic sampling (DAPO): groups whose rewards all agree are dropped and more
    #                               prompts rolled out, up to this many rollouts a step, until prompts_per_step differ
    seeded_rollouts: bool = False  # a seed per prompt: the same samples whatever the number of processes
    # Objective
    baseline: str = "rloo"  # none | mean | rloo | grpo
    kl_coef: float = 0.0
    kl_estimator: str = "k3"  # k1 | k3 | full
    loss_aggregation: str = "token_mean"  # token_mean | sequence_mean | sequence_sum
    # Optimisation
    steps: int = 45
    lr: float = 0.0  # unset: the policy's own (svf 2e-3; each policy's in docs/policies.md)
    lr_schedule: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 3  # unset: 3, or the whole run when it is shorter
    optimizer: str = "adamw"  # adamw | sgd (with momentum; its step is linear in the gradient)
    momentum: float = 0.9  # optimizer=sgd only
    weight_decay: float = 0.0  # decoupled, towards z = 1 (the base model), not towards 0
    max_grad_norm: float = 1e-3
    micro_batch_size: int = 64  # sequences per forward/backward (whole prompt groups); gradients accumulate
    # Memory levers (docs/training.md, Memory): each trades compute for memory.
    shared_prefix: bool = True  # a prompt's G completions run on one forward of it (same gradient, fewer tokens)
    weight_cache: str = "all"  # svf: composed W' kept for no-grad forwards: all (W'(z), W'(1)) | policy | none
    gradient_checkpointing: bool = False  # decoder layers keep only their inputs; recomputed in backward
    logit_chunk_tokens: int = 1024  # fp32 vocabulary rows alive at once in the update; 0 = the whole micro-batch
    # Evaluation
    eval_every: int = 5
    eval_size: int = 100  # validation problems scored every eval_every steps to keep the best expert
    test_size: int = 200  # test problems scored for the base model and the final expert
    eval_batch_size: int = 100  # prompts per greedy generate() call in evaluation
    base_eval_max_new_tokens: int = 64  # the base model is also scored with this budget (0 or ≤ max_new_tokens: not)
    # Run
    output_dir: str = "runs/default"
    save_every: int = 10
    resume: bool = True  # continue from the latest checkpoint in output_dir, if any
    max_bad_steps: int = 5  # consecutive non-finite losses tolerated (each is skipped) before stopping
    max_train_minutes: float = 0.0  # stop after the step that uses this much time (validations included); 0: none
    seed: int = 0  # the training prompts drawn and the sampling; validation and test problems are fixed
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default (one per physical core)
    log_with: list = field(default_factory=lambda: ["tensorboard"])
    progress: bool = True

    def __post_init__(self):
        if self.lr == 0 and isinstance(self.policy, str):
            from svf_rl.policies import POLICIES, default_lr

            if self.policy in POLICIES:
                self.lr = default_lr(self.policy)


CHOICES = {
    "policy": tuple(POLICIES),
    "forward_strategy": ("auto", "compose", "factored"),
    "dtype": ("auto", "bfloat16", "float16", "float32"),
    "weight_cache": ("all", "policy", "none"),
    "engine": ("hf", "vllm", "vllm_server"),
    "baseline": ("none", "mean", "rloo", "grpo"),
    "kl_estimator": ("k1", "k3", "full"),
    "loss_aggregation": ("token_mean", "sequence_mean", "sequence_sum"),
    "lr_schedule": ("constant", "linear", "cosine"),
    "optimizer": ("adamw", "sgd"),
}


# Numeric keys with a range beyond their type: the test, and what would be right.
RANGES = {
    "temperature": (lambda v: v > 0, "> 0 (training samples; only evaluation decodes greedily)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "kl_coef": (lambda v: v >= 0, ">= 0 (0 turns the KL penalty off)"),
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0 (decays z towards 1, the base model)"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_grad_norm": (lambda v: v > 0, "> 0"),
    "engine_ratio_cap": (lambda v: v >= 0, ">= 0 (0 turns the importance ratio off)"),
    "vllm_gpu_memory_utilization": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "vllm_server_timeout": (lambda v: v > 0, "> 0 seconds"),
    "threads": (lambda v: v >= 0, ">= 0 (0 keeps torch's default)"),
    "logit_chunk_tokens": (lambda v: v >= 0, ">= 0 (0 builds the whole micro-batch's logits at once)"),
    "base_eval_max_new_tokens": (lambda v: v >= 0, ">= 0 (0 skips the base model's long-budget score)"),
    "max_train_minutes": (lambda v: v >= 0, ">= 0 (0: no limit; the run ends at `steps`)"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32) (numpy's seed range)"),
}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what would be right."""


def _check_type(name: str, value, annotation: str):
    kind = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}[annotation]
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads 1e-3 (no dot) as a string
        except ValueError:
            pass
    if kind is list and isinstance(value, (str, int, float)):
        return [value]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config key {name!r} must be {annotation}, got {value!r}")
    return value


def make_config(values: dict) -> TrainConfig:
    """Build a TrainConfig from a flat dict, rejecting unknown keys, wrong types and unknown choices."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = {name: typing.get_type_hints(TrainConfig)[name].__name__ for name in fields}
    for key in values:
        if key not in fields:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(fields)}")
    checked = {key: _check_type(key, value, hints[key]) for key, value in values.items()}
    for key, allowed in CHOICES.items():
        if key in checked and checked[key] not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {allowed}, got {checked[key]!r}")
    if "lr" in checked and not checked["lr"] > 0:  # unset (0), it is the policy's own; given, it must be usable
        raise ConfigError(f"config key 'lr' must be > 0, got {checked['lr']}")
    if "warmup_steps" not in checked:  # the default's warmup, never longer than the run
        checked["warmup_steps"] = min(TrainConfig.warmup_steps, checked.get("steps", TrainConfig.steps))
    config = TrainConfig(**checked)
    check_ranges(config)
    return config


def check_ranges(config: TrainConfig) -> None:
    """Raise ConfigError, naming the key, for a value of the right type that cannot run."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {f.name!r} must be a finite number, got {value}")
    positive = ("prompts_per_step", "generations_per_prompt", "max_new_tokens", "steps", "micro_batch_size",
                "eval_size", "test_size", "eval_batch_size", "save_every", "train_size", "eval_every",
                "max_bad_steps", "vllm_max_model_len", "max_sampling_rounds")
    for key in positive:
        if getattr(config, key) < 1:
            raise ConfigError(f"config key {key!r} must be at least 1, got {getattr(config, key)}")
    for key, (valid, right) in RANGES.items():
        if not valid(getattr(config, key)):
            raise ConfigError(f"config key {key!r} must be {right}, got {getattr(config, key)}")
    if not 0 <= config.warmup_steps <= config.steps:
        raise ConfigError(f"config key 'warmup_steps' must be between 0 and steps={config.steps}, "
                          f"got {config.warmup_steps}")
    weights = config.reward_weights
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ConfigError(f"config key 'reward_weights' must be a list of finite numbers, got {weights!r}")
    if config.baseline in GROUP_BASELINES and config.generations_per_prompt < 2:
        raise ConfigError(f"config key 'generations_per_prompt' must be at least 2 with baseline "
                          f"{config.baseline!r}, whose advantage is 0 for a lone completion; or use baseline=mean")
    if not all(isinstance(r, str) and r for r in config.rewards):
        raise ConfigError(f"config key 'rewards' must list module:function or file.py:function references, "
                          f"got {config.rewards!r}")
    if config.max_sampling_rounds > 1 and config.baseline not in GROUP_BASELINES:
        raise ConfigError(f"config key 'max_sampling_rounds' > 1 drops groups whose rewards all agree, which carry no "
                          f"signal only under a group baseline: use baseline rloo or grpo, not {config.baseline!r}")
    svf_only = {"forward_strategy": "auto", "weight_cache": "all"}
    for key, default in svf_only.items():
        if config.policy != "svf" and getattr(config, key) != default:
            raise ConfigError(f"config key {key!r} is SVF's; policy {config.policy!r} has no {key}")
    from svf_rl.policies import PolicyError, make_policy

    try:
        make_policy(config)  # its arguments, checked before anything loads
    except PolicyError as err:
        raise ConfigError(str(err)) from None
    if config.engine == "vllm_server" and not config.vllm_server_urls:
        raise ConfigError("config key 'vllm_server_urls' must list at least one server with engine 'vllm_server'")


def parse_override(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value")
    return key.strip().lstrip("-").replace("-", "_"), yaml.safe_load(raw) if raw else ""


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (optional) first, then key=value overrides; the result is validated as a whole."""
    values: dict = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        values.update(loaded)
    for text in overrides:
        key, value = parse_override(text)
        if "." in key:  # task_args.size=500 sets one entry of a dict-valued key
            head, _, sub = key.partition(".")
            values.setdefault(head, {})
            if not isinstance(values[head], dict):
                raise ConfigError(f"config key {head!r} is not a mapping, so {key!r} cannot be set")
            values[head] = {**values[head], sub: value}
        else:
            values[key] = value
    return make_config(values)


def config_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
