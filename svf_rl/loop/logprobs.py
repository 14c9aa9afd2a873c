"""Per-token log-probabilities of completions under the policy (or the reference, z = 1).

Two things keep the update small:
- The G completions of a prompt share it: the prompt runs once, its keys and values (with their graph) are
  repeated over the group, and the completions run on them ("Prefix Grouper", 2025). Same gradient, fewer tokens.
- The vocabulary is never held in fp32 for the whole batch: the model returns its final hidden states, and
  the head, softmax and picks run on chunks of tokens, recomputed in the backward pass.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from svf_rl.engines.hf import left_pad, prompt_rows

log = logging.getLogger(__name__)


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

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.completion_ids.shape[1]


def make_token_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, width: int = 1
                     ) -> TokenBatch:
    """`width`: the least completion width (padding); ranks give the same one where their forwards are collective."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    width = max(width, max(len(c) for c in completions))
    completion_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(completions), width))
    for row, tokens in enumerate(completions):
        completion_ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        completion_mask[row, :len(tokens)] = 1
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    return TokenBatch(input_ids, attention_mask, position_ids, completion_ids, completion_mask)


class PrefixLayer(DynamicLayer):
    """One layer's keys and values for a shared prompt.

    The prompt pass stores its own (replacing, not appending, so a recomputation under gradient checkpointing
    stores the same again). The completion pass repeats the stored prefix for its `group` completions inside
    the layer and stores nothing: only one layer's repeated prefix exists at a time, a checkpoint keeps the
    unrepeated one, and the pass can be recomputed. Gradients flow through both.
    """

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None, group: int = 1):
        super().__init__()
        self.prefix, self.group = prefix, group
        if prefix is not None:
            self.lazy_initialization(*prefix)
            self.keys, self.values = prefix

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.prefix is None:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        keys, values = (part.repeat_interleave(self.group, 0) for part in self.prefix)
        return torch.cat([keys, key_states], -2), torch.cat([values, value_states], -2)


class SharedPrefixCache(DynamicCache):
    def __init__(self, layers: list[PrefixLayer] | None = None):
        Cache.__init__(self, layers=layers, layer_class_to_replicate=None if layers else PrefixLayer)

    def repeated(self, group: int) -> SharedPrefixCache:
        """The prompts' keys and values for their `group` completions each, repeated layer by layer as the
        completions reach it (differentiably)."""
        return SharedPrefixCache([PrefixLayer((layer.keys, layer.values), group) for layer in self.layers])


def shares_prefix(model) -> bool:
    """Whether every attention layer keeps a plain growing cache (no sliding window, no recurrent state): then
    a prompt's cached keys and values give the completions exactly what a full forward would."""
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a config the cache cannot read: be safe
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def head_of(model) -> nn.Module:
    return model.get_output_embeddings()


@contextlib.contextmanager
def hidden_states_out(model) -> Iterator[nn.Module]:
    """Within the block the model returns its final hidden states where it would return logits; yields the head.

    Only valid for models whose logits are head(hidden) and nothing more (see `head_is_plain`).
    """
    head = head_of(model)
    owner, attribute = next((module, name) for module in model.modules()
                            for name, child in module.named_children() if child is head)
    setattr(owner, attribute, nn.Identity())
    try:
        yield head
    finally:
        setattr(owner, attribute, head)


@torch.no_grad()
def head_is_plain(model) -> bool:
    """Whether the model's logits are its head applied to its final hidden states (no soft-capping or scaling
    after the head), checked on a few tokens once: the chunked head then gives the model's own numbers."""
    head = head_of(model)
    if head is None or not isinstance(head, nn.Linear):
        return False
    ids = torch.arange(1, 6, device=head.weight.device)[None] % head.out_features
    with prompt_rows(model, ids, torch.ones_like(ids)):
        logits = model(input_ids=ids, use_cache=False).logits
        with hidden_states_out(model):
            rebuilt = head(model(input_ids=ids, use_cache=False).logits)
    return logits.shape == rebuilt.shape and torch.equal(logits, rebuilt)


@dataclass
class ForwardPlan:
    """How the update runs its forwards on this model: shared prompts, and the head in chunks."""

    shared_prefix: bool
    hidden: bool  # the model returns hidden states and `head` runs in chunks; otherwise it returns logits
    head: nn.Module | None


def plan_forward(model, shared_prefix: bool = True) -> ForwardPlan:
    shared = shared_prefix and shares_prefix(model)
    if shared_prefix and not shared:
        log.warning("%s keeps no plain key/value cache in every layer (sliding windows or recurrent state); "
                    "each completion runs with its whole prompt", type(model).__name__)
    hidden = head_is_plain(model)
    if not hidden:
        log.warning("%s changes its logits after the head; the update builds them for whole micro-batches",
                    type(model).__name__)
    return ForwardPlan(shared, hidden, head_of(model) if hidden else None)


def update_tokens(batch: TokenBatch, group: int = 1, padding: bool = True) -> int:
    """Token positions that the update's forwards run over, padding included unless `padding` is False."""
    if not padding:
        mask, prompt = batch.attention_mask, batch.prompt_width
        if group == 1:
            return int(mask.sum())
        return int(mask[::group, :prompt].sum() + mask[:, prompt:-1].sum())
    if group == 1:
        return batch.input_ids.numel()
    return len(batch) // group * batch.prompt_width + len(batch) * (batch.completion_ids.shape[1] - 1)


def completion_features(policy, model, batch: TokenBatch, group: int = 1, hidden: bool = False) -> torch.Tensor:
    """What predicts each completion token, [B, C, ·]: the final hidden states (`hidden`, for the chunked head)
    or the logits. `group` > 1: rows come in groups of that many completions of one prompt, and the prompt
    runs once per group. `policy` is what forwards call (the model or its DeepSpeed engine)."""
    context = hidden_states_out(model) if hidden else contextlib.nullcontext()
    width, prompt, first = batch.completion_ids.shape[1], batch.prompt_width, slice(0, len(batch), group)
    with prompt_rows(model, batch.input_ids[first, :prompt], batch.attention_mask[first, :prompt], group), context:
        if group == 1:
            out = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, logits_to_keep=width + 1, use_cache=False)
            return out.logits[:, :-1]
        check_groups(batch, group)
        cache = SharedPrefixCache()
        head = policy(input_ids=batch.input_ids[first, :prompt], attention_mask=batch.attention_mask[first, :prompt],
                      position_ids=batch.position_ids[first, :prompt], past_key_values=cache, use_cache=True,
                      logits_to_keep=1).logits.repeat_interleave(group, 0)  # predicts each first completion token
        if width == 1:
            return head
        # The completions' own tokens, but the last: its output predicts nothing that is scored.
        rest = policy(input_ids=batch.completion_ids[:, :-1], attention_mask=batch.attention_mask[:, :-1],
                      position_ids=batch.position_ids[:, prompt:-1], past_key_values=cache.repeated(group),
                      use_cache=True).logits
        return torch.cat([head, rest], 1)


def check_groups(batch: TokenBatch, group: int) -> None:
    """Shared-prefix forwards need each run of `group` rows to hold one prompt."""
    prompts = batch.input_ids[:, :batch.prompt_width].view(-1, group, batch.prompt_width)
    if len(batch) % group or not torch.equal(prompts, prompts[:, :1].expand_as(prompts)):
        raise ValueError(f"rows are not groups of {group} completions of one prompt each")


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_stats(head: nn.Module, temperature: float, features: torch.Tensor, tokens: torch.Tensor,
                 ref_features: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    logprobs = torch.log_softmax(_upcast(head(features)) / temperature, -1)
    logp = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    if ref_features is None:
        return logp, entropy
    with torch.no_grad():
        ref_logprobs = torch.log_softmax(_upcast(head(ref_features)) / temperature, -1)
    full_kl = (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)
    return logp, entropy, full_kl


def token_stats(features: torch.Tensor, tokens: torch.Tensor, temperature: float, head: nn.Module | None = None,
                chunk: int = 0, ref_features: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """log π(token) and the entropy at each completion position, [B, C] each; with `ref_features`, also the exact
    KL(π‖π_ref) over the vocabulary. π = softmax(head(features) / T).

    `chunk` > 0: at most that many positions have fp32 vocabulary rows at once; when there are several chunks the
    backward pass recomputes them one by one (one more head matmul) instead of keeping [B, C, V] in fp32 for it.
    """
    head = head if head is not None else nn.Identity()
    shape = tokens.shape
    flat, flat_tokens = features.reshape(-1, features.shape[-1]), tokens.reshape(-1)
    flat_ref = None if ref_features is None else ref_features.reshape(-1, ref_features.shape[-1])
    step = chunk if chunk > 0 else max(1, len(flat))
    compute = functools.partial(_chunk_stats, head, temperature)
    parts = []
    for start in range(0, len(flat), step):
        rows = slice(start, start + step)
        args = (flat[rows], flat_tokens[rows], None if flat_ref is None else flat_ref[rows])
        if len(flat) > step and torch.is_grad_enabled() and flat.requires_grad:  # one chunk: nothing to save
            # No metadata check on the recomputation: under ZeRO-3 it sees the head's sharded weight released
            # (shape [0]); the backward still gets it whole, as DeepSpeed gathers it before the head's backward.
            parts.append(checkpoint(compute, *args, use_reentrant=False, determinism_check="none"))
        else:
            parts.append(compute(*args))
    return tuple(torch.cat(column).view(shape) for column in zip(*parts, strict=True))


def checkpoint_layers(model) -> int:
    """Gradient checkpointing of every decoder layer, in eval mode too (transformers' own switch needs train
    mode, which would also turn dropout on): a layer keeps only its input and recomputes the rest in backward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        if getattr(layer, "_svf_checkpointed", False):
            continue
        forward = layer.forward

        @functools.wraps(forward)
        def checkpointed(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward, layer._svf_checkpointed = checkpointed, True
    return len(layers)


def completion_logprobs(model, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
    """log π(token) of every completion token, [B, C], with whole-prompt forwards and full logits."""
    logp, _ = token_stats(completion_features(model, model, batch), batch.completion_ids, temperature)
    return logp
