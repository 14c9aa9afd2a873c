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


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str,
                 logprobs_full: torch.Tensor | None = None, ref_logprobs_full: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """KL(π‖π_ref) per completion token.

    k1 = log π − log π_ref and k3 = r − log r − 1 with r = π_ref/π are estimates from the sampled token
    (k3 is unbiased and never negative); "full" sums over the whole vocabulary, exact at each position.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = ref_logp - logp
        return torch.exp(log_ratio) - log_ratio - 1
    if estimator == "full":
        return (logprobs_full.exp() * (logprobs_full - ref_logprobs_full)).sum(-1)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k3 or full")


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
