"""fp16 loss scaling fails loudly and resumes exactly; weight decay pulls z towards the base model."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from svf_rl.loop import train as train_module
from svf_rl.loop import update as update_module
from svf_rl.loop.train import TrainingError, train
from svf_rl.loop.update import AdamWTowardsBase, SGDTowardsBase, UpdateError, check_precision
from svf_rl.run_files import read_metrics
from tests.same_z import EQUALITY, assert_same_z
from tests.test_distributed import z_at
from tests.test_train import tiny_config


def step_records(config) -> list[dict]:
    return [r for r in read_metrics(Path(config.output_dir) / "metrics.jsonl") if "reward" in r]


@pytest.mark.parametrize("optimizer", [AdamWTowardsBase, SGDTowardsBase])
def test_weight_decay_pulls_z_towards_one_not_zero(optimizer):
    z = torch.nn.Parameter(torch.tensor([1.5, 0.5, 1.0, 2.0]))
    z.grad = torch.zeros_like(z)  # no gradient: only the decay moves z
    optimizer([z], lr=0.1, weight_decay=0.5, centre=1.0).step()
    assert torch.allclose(z.detach(), 1 + torch.tensor([0.5, -0.5, 0.0, 1.0]) * (1 - 0.1 * 0.5))


def test_weight_decay_follows_the_lr_schedule_and_zero_decay_is_the_plain_optimiser():
    torch.manual_seed(0)
    grads = [torch.randn(6) for _ in range(3)]
    plain, ours = (torch.nn.Parameter(torch.linspace(0.5, 1.5, 6)) for _ in range(2))
    adam, decayed = torch.optim.AdamW([plain], lr=0.01, weight_decay=0.0), AdamWTowardsBase([ours], lr=0.01, centre=1.0)
    for grad in grads:
        plain.grad, ours.grad = grad.clone(), grad.clone()
        adam.step()
        decayed.step()
    assert torch.equal(plain, ours)
    z = torch.nn.Parameter(torch.full((2,), 3.0))
    optimizer = SGDTowardsBase([z], lr=1.0, momentum=0.0, weight_decay=0.5, centre=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    z.grad = torch.zeros(2)
    optimizer.step()
    schedule.step()
    assert torch.allclose(z.detach(), torch.full((2,), 1 + 2 * (1 - 0.5 * 0.5)))


def test_a_run_with_weight_decay_only_keeps_z_at_one(tiny_model_dir, tmp_path, monkeypatch):
    # With every advantage zero (and no KL term) the gradient is 0: decay towards 0 would still shrink
    # every singular value by lr·weight_decay a step.
    monkeypatch.setattr(train_module, "advantages", lambda rewards, *_: torch.zeros_like(rewards))
    config = tiny_config(tiny_model_dir, tmp_path, steps=2, eval_every=2, weight_decay=0.5, lr=0.1, kl_coef=0.0)
    train(config)
    assert max((z - 1).abs().max().item() for z in z_at(Path(config.output_dir), 2).values()) < 1e-5


def test_accelerates_own_fp16_scaler_is_refused_outside_deepspeed():
    # accelerate has no fp16 mixed precision on CPU, so the guard is called with what it reads.
    with pytest.raises(UpdateError, match="mixed_precision fp16 would scale the loss"):
        check_precision(SimpleNamespace(mixed_precision="fp16", distributed_type=DistributedType.MULTI_GPU))
    check_precision(SimpleNamespace(mixed_precision="no", distributed_type=DistributedType.MULTI_GPU))
    check_precision(SimpleNamespace(mixed_precision="fp16", distributed_type=DistributedType.DEEPSPEED))


def fp16_config(tiny_model_dir, run_dir, **overrides):
    return tiny_config(tiny_model_dir, run_dir, dtype="float16", eval_every=100, **overrides)


def test_a_non_finite_fp16_loss_is_a_bad_step_and_stops_the_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "policy_loss", lambda logp, *_: logp * math.nan)
    config = fp16_config(tiny_model_dir, tmp_path, steps=8, max_bad_steps=2)
    with pytest.raises(TrainingError, match="2 consecutive non-finite losses or gradients; stopped at step 2"):
        train(config)
    assert not (Path(config.output_dir) / "expert.safetensors").exists()
    assert [r["loss_scale"] for r in step_records(config)] == [2.0**12]  # not an overflow: the scale stays


def test_fp16_overflow_skips_are_capped_by_the_scale_reaching_one(tiny_model_dir, tmp_path, monkeypatch):
    # A gradient too large for fp16 at any scale: each skip halves the scale, and at 1 it is a bad step.
    monkeypatch.setattr(update_module, "INITIAL_LOSS_SCALE", 8.0)
    huge = lambda logp, old, adv: -adv[:, None] * torch.exp(logp - old) * 1e30  # noqa: E731
    monkeypatch.setattr(train_module, "policy_loss", huge)
    config = fp16_config(tiny_model_dir, tmp_path, steps=20, max_bad_steps=2, baseline="none")
    with pytest.raises(TrainingError, match="2 consecutive non-finite losses or gradients; stopped at step 5"):
        train(config)
    records = step_records(config)
    assert [r["loss_scale"] for r in records] == [4.0, 2.0, 1.0, 1.0]  # step 5 stopped the run before its record
    assert all(not math.isfinite(r["grad_norm"]) for r in records)


def test_a_resumed_fp16_run_keeps_its_loss_scale_and_continues_as_an_uninterrupted_one(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    # A scale so high that the first steps overflow: the scale the run settles at must survive the resume.
    monkeypatch.setattr(update_module, "INITIAL_LOSS_SCALE", 2.0**26)
    settings = dict(EQUALITY, lr=10.0, steps=12, save_every=1)
    whole = fp16_config(tiny_model_dir, tmp_path / "whole", **settings)
    train(whole)
    scales = [r["loss_scale"] for r in step_records(whole)]
    settled = next(i for i, r in enumerate(step_records(whole)) if math.isfinite(r["grad_norm"]))
    assert settled >= 2 and scales[-1] < 2.0**26  # a resume that forgot the scale would overflow again
    train(fp16_config(tiny_model_dir, tmp_path / "resumed", **{**settings, "steps": settled + 2}))
    resumed = fp16_config(tiny_model_dir, tmp_path / "resumed", **settings)
    train(resumed)
    assert [r["loss_scale"] for r in step_records(resumed)] == scales
    assert_same_z(z_at(Path(resumed.output_dir), 12), z_at(Path(whole.output_dir), 12), step_records(whole), whole)
