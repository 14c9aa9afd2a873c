"""How a step's loss becomes an update of the policy's parameters: plain torch (any number of ranks), or
DeepSpeed ZeRO 1-3.

Both give every rank the gradient of the whole step's loss (the loop normalises the loss by the step's
global counts, so the ranks' gradients add up), clip it to `max_grad_norm`, skip the update when it is
not finite, and step AdamW and the learning-rate schedule.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from svf_rl.config import TrainConfig
from svf_rl.loop.memory import ZERO3_LIVE_PARAMETERS


class UpdateError(ValueError):
    """The distributed set-up cannot train the policy; the message says why in one line."""


def lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        if config.lr_schedule == "linear":
            return max(0.0, 1 - progress)
        if config.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def make_update(accelerator: Accelerator, model, policy, config: TrainConfig):
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedUpdate(accelerator, model, policy, config)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise UpdateError(f"launched with DeepSpeed, but accelerate chose {accelerator.distributed_type.value} "
                          f"(ACCELERATE_USE_CPU=1 or --cpu turns DeepSpeed off; leave them out, it runs on CPU)")
    return TorchUpdate(accelerator, model, policy, config)


@contextlib.contextmanager
def whole_matrices(accelerator: Accelerator):
    """Load the base model unsharded: the SVD needs whole matrices; ZeRO-3 shards the factors at prepare."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # from_pretrained would otherwise partition each weight as it loads
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()  # generate() then keeps ZeRO-3 ranks in step


class DecayTowardsBase:
    """Decoupled weight decay towards the base model, not towards 0: each group's parameters are pulled towards
    its `centre` (SVF's z towards 1, which decaying to 0 would shrink every singular value; LoRA's A and B towards
    0), p ← c + (p − c)(1 − lr·weight_decay) before each step, as AdamW does towards 0. It acts on the
    optimiser's own parameter groups, so it also reaches DeepSpeed's flat fp32 partitions."""

    def __init__(self, params, weight_decay: float = 0.0, centre: float = 0.0, **kwargs):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        for group in groups:
            group["decay_towards_base"] = group.pop("weight_decay", weight_decay)
            group.setdefault("centre", centre)
        super().__init__(groups, weight_decay=0.0, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            rate = group["lr"] * group["decay_towards_base"]
            if rate:
                for p in group["params"]:
                    p.sub_(p - group["centre"], alpha=rate)
        return super().step(closure)


class AdamWTowardsBase(DecayTowardsBase, torch.optim.AdamW):
    pass


class SGDTowardsBase(DecayTowardsBase, torch.optim.SGD):
    pass


def zero_settings(accelerator: Accelerator) -> tuple[int | None, int]:
    """DeepSpeed's ZeRO stage (None without DeepSpeed) and its stage3_max_live_parameters, for the memory model."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None, ZERO3_LIVE_PARAMETERS
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    live = zero.get("stage3_max_live_parameters", ZERO3_LIVE_PARAMETERS)  # or "auto"
    return int(zero.get("stage", 0)), int(live) if str(live).isdigit() else ZERO3_LIVE_PARAMETERS


def _optimizer(policy, config: TrainConfig):
    """The optimiser on the policy's parameters, and its lr schedule. The schedule is not given to accelerate: its
    wrapper steps it once per process per step (it assumes each process saw a share of a larger batch), so with 2
    processes a 10-step linear decay would end at step 5. The loop steps it once per applied update; it is
    checkpointed as a custom object (`scheduler`)."""
    if config.optimizer == "sgd":  # its step is linear in the gradient: the equality tests' bound rests on that
        optimizer = policy.optimizer(SGDTowardsBase, config.lr, config.weight_decay, momentum=config.momentum)
    else:
        optimizer = policy.optimizer(AdamWTowardsBase, config.lr, config.weight_decay)
    return policy.parameters(), optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))


INITIAL_LOSS_SCALE = 2.0 ** 12


def check_precision(accelerator: Accelerator) -> None:
    """accelerate's own fp16 scaler multiplies the loss by 2¹⁶ before svf-rl clips z's gradient, so the clip
    would act on the scaled gradient and every step would shrink by the scale, silently."""
    if accelerator.mixed_precision == "fp16" and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise UpdateError("accelerate mixed_precision fp16 would scale the loss before z's gradient is clipped; "
                          "use mixed_precision: no with dtype=float16 (svf-rl scales the loss itself)")


class TorchUpdate:
    """The trainable parameters' gradient is summed over ranks in one flat all-reduce (kilobytes to megabytes),
    clipped, and the optimiser steps.

    No DDP wrapper: a policy may deliver its gradient at the end of the step (SVF composes W' once per step and
    ∂L/∂W' reaches z when the step's scope closes), which DDP's gradient hooks would not see.
    """

    gradients_at_step_end = True

    def __init__(self, accelerator: Accelerator, model, policy, config: TrainConfig):
        self.accelerator, self.max_grad_norm, self.module = accelerator, config.max_grad_norm, model
        self.checkpoint_kwargs, self.load_kwargs = {}, {}
        self.after_step = policy.after_step
        self.params, optimizer, self.scheduler = _optimizer(policy, config)
        self.optimizer = accelerator.prepare(optimizer)
        # fp16 activations: their gradients underflow unless the loss is scaled (dynamically: halved on overflow).
        fp16 = any(p.dtype == torch.float16 for p in model.parameters())
        self.scaler = torch.amp.GradScaler(accelerator.device.type, init_scale=INITIAL_LOSS_SCALE) if fp16 else None
        self.checkpointed = [self.scheduler] + ([self.scaler] if fp16 else [])  # state that resumes with z
        self.overflowed = False

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.accelerator.backward(loss if self.scaler is None else self.scaler.scale(loss))

    def step(self, loss_finite: bool = True) -> float:
        """Apply the accumulated gradient; return its norm before clipping (not finite: nothing was applied).

        A non-finite loss is a bad step and leaves the loss scale alone. A non-finite fp16 gradient is an
        overflow (`overflowed`; the scale halves) while the scale is above 1; at 1 the gradient is not finite
        unscaled either, so it is a bad step too, and the scale stays at 1."""
        self.overflowed = False
        if not loss_finite:
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        if self.accelerator.num_processes > 1:
            for p in self.params:  # a parameter this rank's forwards did not reach still takes part
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = self.accelerator.reduce(torch.cat([p.grad.flatten() for p in self.params]), "sum")
            for p, grad in zip(self.params, flat.split([p.numel() for p in self.params]), strict=True):
                p.grad.copy_(grad.view_as(p))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm).item()
        if self.scaler is not None:
            self.overflowed = not math.isfinite(norm) and self.scaler.get_scale() > 1
            self.scaler.step(self.optimizer)  # skipped when the unscaled gradient is not finite
            self.scaler.update()
            if self.scaler.get_scale() < 1:
                self.scaler.update(1.0)
        elif math.isfinite(norm):
            self.optimizer.step()
        if math.isfinite(norm):
            self.scheduler.step()
            self.after_step(self.scheduler.last_epoch)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def scale(self) -> float:
        """The loss scale the next step uses (1 without fp16)."""
        return self.scaler.get_scale() if self.scaler is not None else 1.0

    @property
    def loss_multiplier(self) -> float:
        """What backward multiplies the loss by, as the gradient reaches the parameters: the loss scale."""
        return self.scale


class DeepSpeedUpdate:
    """DeepSpeed's engine owns the trainable parameters' gradient: it reduces and partitions it (ZeRO-1/2),
    clips and steps.

    ZeRO-3 also shards the frozen weights (SVF's U, s, Vᵀ are parameters for that reason) and gathers them
    layer by layer inside forwards; SVF layers then compute W' in each forward instead of caching it. The
    trainable parameters stay whole on every rank (below the persistence threshold), so reading and logging
    them needs no gather.
    """

    gradients_at_step_end = False  # the gradient must arrive inside the engine's backward

    def __init__(self, accelerator: Accelerator, model, policy, config: TrainConfig):
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        for precision in ("bf16", "fp16"):
            if ds_config.get(precision, {}).get("enabled") in (True, "true"):
                raise UpdateError(f"DeepSpeed {precision} would store z in 16 bits, where its updates (about "
                                  f"1e-3) round away; use mixed_precision: no (the factors keep the model's dtype)")
        if getattr(policy, "whole_gradients", False):
            raise UpdateError(f"policy {policy.name} reads each parameter's whole gradient after the step, which "
                              f"DeepSpeed's ZeRO partitions; train it without DeepSpeed (one process or DDP)")
        params, optimizer, self.scheduler = _optimizer(policy, config)
        # The loop accumulates micro-batches itself and marks the last one; DeepSpeed must not rescale.
        # torch's AdamW/SGD with decay towards the base (a subclass, which DeepSpeed calls untested): its flat
        # fp32 partitions hold only the trainable parameters.
        ds_config.update(train_micro_batch_size_per_gpu=config.micro_batch_size, gradient_accumulation_steps=1,
                         gradient_clipping=config.max_grad_norm, zero_allow_untested_optimizer=True)
        zero = ds_config.setdefault("zero_optimization", {})
        stage3 = int(zero.get("stage", 0)) == 3
        if stage3:
            zero["stage3_param_persistence_threshold"] = max(p.numel() for p in params)
            policy.shard()
        self.engine, self.optimizer = accelerator.prepare(model, optimizer)
        self.checkpointed = [self.scheduler]
        self.module = self.engine  # training forwards go through the engine: it counts micro-batches there
        if stage3 and accelerator.is_main_process:
            params = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
            held = sum(p.ds_tensor.numel() for p in params) / max(1, sum(p.ds_numel for p in params))
            print(f"ZeRO-3: each rank holds {100 * held:.0f}% of the model's parameters (factors included)")
        self.world = accelerator.num_processes
        self.overflowed, self.scale = False, 1.0
        # Only the trainable parameters are saved: the frozen ones are the base model's, rebuilt on resume.
        self.checkpoint_kwargs = {"exclude_frozen_parameters": True}
        self.load_kwargs = {"load_module_strict": False}

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        # DeepSpeed averages gradients over ranks; the loss is normalised by the whole step's counts already.
        self.engine.backward(loss * self.world)

    @property
    def loss_multiplier(self) -> float:
        """What backward multiplies the loss by before DeepSpeed averages the ranks' gradients."""
        return float(self.world)

    def step(self, loss_finite: bool = True) -> float:
        self.engine.step()  # skips the update, and reports an infinite norm, when the gradient is not finite
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None or not loss_finite else float(norm)
        if math.isfinite(norm):
            self.scheduler.step()
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]
