"""REINFORCE with a baseline and a KL penalty towards the base model: advantages, KL, loss."""

from __future__ import annotations

import torch


def advantages(rewards: torch.Tensor, group_size: int, baseline: str) -> torch.Tensor:
    """Advantage per completion; completions of one prompt are `group_size` consecutive entries."""
    if baseline == "none":  # plain REINFORCE, as in the paper
        return rewards.clone()
    if baseline == "mean":
        return rewards - rewards.mean()
    groups = rewards.view(-1, group_size)
    if baseline == "rloo":  # leave-one-out mean of the other completions of the same prompt
        others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
        return (groups - others).reshape(-1)
    if baseline == "grpo":
        std = groups.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        return ((groups - groups.mean(1, keepdim=True)) / (std + 1e-4)).reshape(-1)
    raise ValueError(f"unknown baseline {baseline!r}; choose none, mean, rloo or grpo")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str,
               full_kl: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(π‖π_ref) per completion token, and a per-token surrogate whose expected gradient is the KL's.

    The estimate k_t at token t is k1 = log π − log π_ref or k3 = r − 1 − log r with r = π_ref/π (both
    unbiased given the prefix), or "full", exact over the vocabulary. Differentiating k_t alone is not ∇KL:
    E[∇k1] = 0 and E[∇k3] = ∇KL(π_ref‖π). Over a completion y ~ π, ∇E[Σ_t k_t] also has the score-function
    part, so the surrogate is k_t + sg(Σ_{t' ≥ t} k_t') · log π_t (t' > t for "full", which does not depend
    on y_t), and E[∇ Σ_t surrogate_t] = ∇KL(π‖π_ref) of whole completions. "full" takes the exact per-position
    KL Σ_v π(v) (log π(v) − log π_ref(v)), differentiable (`full_kl`, from logprobs.token_stats). Returns
    (estimate, surrogate), both zero where `mask` is.
    """
    if estimator == "k1":
        kl = logp - ref_logp
    elif estimator == "k3":
        log_ratio = ref_logp - logp
        kl = torch.exp(log_ratio) - log_ratio - 1
    elif estimator == "full":
        kl = full_kl
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k3 or full")
    kl = kl * mask
    to_go = kl.detach().flip(-1).cumsum(-1).flip(-1)  # Σ_{t' ≥ t} k_t'
    if estimator == "full":
        to_go = to_go - kl.detach()
    return kl, kl + to_go * logp * mask


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, total_tokens: int, total_sequences: int
              ) -> torch.Tensor:
    """Reduce a per-token loss over a micro-batch so that summing micro-batches gives the batch loss."""
    if how == "token_mean":
        return (per_token * mask).sum() / total_tokens
    lengths = mask.sum(1).clamp(min=1)
    per_sequence = (per_token * mask).sum(1)
    if how == "sequence_mean":
        per_sequence = per_sequence / lengths
    elif how != "sequence_sum":
        raise ValueError(f"unknown loss aggregation {how!r}")
    return per_sequence.sum() / total_sequences


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """−A · π/π_old per token. With π_old = π detached this is exactly REINFORCE's −A · log π gradient."""
    return -advantage[:, None] * torch.exp(logp - old_logp)
