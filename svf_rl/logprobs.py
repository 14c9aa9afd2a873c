"""Per-token log-probabilities of completions under the policy (or the reference, z = 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import left_pad


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, P + C]: left-padded prompts, then right-padded completions
    attention_mask: torch.Tensor
    position_ids: torch.Tensor  # as generate() assigns them, so scores match the rollout
    completion_ids: torch.Tensor  # [B, C]
    completion_mask: torch.Tensor  # [B, C] float

    def to(self, device) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in vars(self).values()))

    def __getitem__(self, rows: slice) -> TokenBatch:
        return TokenBatch(*(t[rows] for t in vars(self).values()))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def make_token_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> TokenBatch:
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    width = max(1, max(len(c) for c in completions))
    completion_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(completions), width))
    for row, tokens in enumerate(completions):
        completion_ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        completion_mask[row, :len(tokens)] = 1
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    return TokenBatch(input_ids, attention_mask, position_ids, completion_ids, completion_mask)


def completion_logits(model, batch: TokenBatch) -> torch.Tensor:
    """Logits that predict each completion token, [B, C, V]; the prompt positions' logits are never built."""
    width = batch.completion_ids.shape[1]
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=width + 1, use_cache=False)
    return out.logits[:, :-1].float()


def of_tokens(logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Pick each position's sampled-token log-prob out of the full [B, C, V] log-probs."""
    return logprobs.gather(-1, tokens[..., None]).squeeze(-1)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    return -(logprobs.exp() * logprobs).sum(-1)
