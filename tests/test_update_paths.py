"""Every way of running the update computes the same thing: shared prompts, chunked head, checkpointed layers,
no kept W', every forward strategy, micro-batching; and bf16 stays within its rounding of fp32."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from svf_rl.loop.logprobs import (
    checkpoint_layers,
    completion_features,
    head_is_plain,
    make_token_batch,
    plan_forward,
    token_stats,
    update_tokens,
)
from svf_rl.loop.objective import kl_penalty
from svf_rl.policies.svf_layer import apply_svf, policy_step, reference_mode, set_weight_cache, svf_layers

G = 4
# fp32 sums of the same terms in another order differ by about n·ε ≈ 1e-5 relative here; a wrong path (a token
# scored at the wrong position, a prompt not shared right, a chunk's gradient lost) moves it by O(1).
RTOL = 1e-4


def small_model(dtype=torch.float32, strategy="auto", seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    apply_svf(model, "all", strategy, progress=False)
    with torch.no_grad():  # a policy away from the reference, so that the KL has a gradient
        for layer in svf_layers(model).values():
            layer.z.add_(0.05 * torch.randn_like(layer.z))
    return model.to(dtype)


def grouped_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 97, (n,), generator=generator).tolist() for n in (7, 12, 4)]
    lengths = [5, 9, 1, 9, 3, 9, 6, 2, 9, 4, 7, 8]
    completions = [torch.randint(1, 97, (n,), generator=generator).tolist() for n in lengths]
    return make_token_batch([p for p in prompts for _ in range(G)], completions, 0)


def z_gradient(model, batch, group=1, rows=None, chunk=0, hidden=False, kl="", compose_once=True):
    """∂/∂z of a REINFORCE-like loss with fixed per-token weights, plus a KL penalty; as the training loop runs it."""
    head = model.get_output_embeddings() if hidden else None
    weights = torch.linspace(-1, 1, batch.completion_ids.numel()).view_as(batch.completion_mask)
    rows = rows or len(batch)
    for layer in svf_layers(model).values():
        layer.z.grad = None
    with policy_step(model, update_tokens(batch, group), compose_once):
        for first in range(0, len(batch), rows):
            micro = batch[first:first + rows]
            mask = micro.completion_mask
            features = completion_features(model, model, micro, group, hidden)
            reference = None
            if kl:
                with torch.no_grad(), reference_mode(model):
                    reference = completion_features(model, model, micro, group, hidden)
            logp, _, *full_kl = token_stats(features, micro.completion_ids, 0.7, head, chunk,
                                            reference if kl == "full" else None)
            loss = (logp * weights[first:first + rows] * mask).sum()
            if kl:
                with torch.no_grad():
                    ref_logp, _ = token_stats(reference, micro.completion_ids, 0.7, head, chunk)
                loss = loss + kl_penalty(logp, ref_logp, mask, kl, *full_kl)[1].sum()
            loss.backward()
    return torch.cat([layer.z.grad.flatten() for layer in svf_layers(model).values()])


def assert_close(got, want, rtol=RTOL):
    scale = want.abs().max()
    assert scale > 1e-3  # a gradient worth comparing
    assert (got - want).abs().max() <= rtol * scale, ((got - want).abs().max() / scale).item()


@pytest.mark.parametrize("strategy", ["auto", "compose", "factored"])
@pytest.mark.parametrize("rows", [None, G])
@pytest.mark.parametrize("kl", ["", "k3", "full"])
def test_a_shared_prompt_gives_the_gradient_of_whole_sequences(strategy, rows, kl):
    model, batch = small_model(strategy=strategy), grouped_batch()
    want = z_gradient(model, batch, kl=kl)
    assert_close(z_gradient(model, batch, group=G, rows=rows, kl=kl), want)
    assert_close(z_gradient(model, batch, group=G, rows=rows, kl=kl, compose_once=False), want)


def test_a_shared_prompt_runs_fewer_tokens():
    batch = grouped_batch()
    P, C = batch.prompt_width, batch.completion_ids.shape[1]
    assert update_tokens(batch, 1) == 12 * (P + C)
    assert update_tokens(batch, G) == 3 * P + 12 * (C - 1)
    # Without padding: every prompt and completion token; shared, each prompt once and no completion's token in
    # the widest one's last column (it predicts nothing)
    assert update_tokens(batch, 1, padding=False) == 4 * (7 + 12 + 4) + 72
    assert update_tokens(batch, G, padding=False) == (7 + 12 + 4) + 72 - 4


def test_rows_that_are_not_groups_of_one_prompt_are_refused():
    batch = grouped_batch()
    with pytest.raises(ValueError, match="groups of 4"):
        completion_features(small_model(), small_model(), batch[1:9], G)


@pytest.mark.parametrize("kl", ["", "full"])
def test_the_chunked_head_gives_the_same_values_and_gradient(kl):
    model, batch = small_model(), grouped_batch()
    want = z_gradient(model, batch, kl=kl)
    assert_close(z_gradient(model, batch, chunk=5, hidden=True, kl=kl), want)
    assert_close(z_gradient(model, batch, group=G, chunk=7, hidden=True, kl=kl), want)
    features = completion_features(model, model, batch, 1, hidden=True)
    whole = token_stats(features, batch.completion_ids, 0.7, model.get_output_embeddings(), 0, features + 0.1)
    chunked = token_stats(features, batch.completion_ids, 0.7, model.get_output_embeddings(), 5, features + 0.1)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradient():
    model, batch = small_model(), grouped_batch()
    want = z_gradient(model, batch, group=G, kl="k3")
    assert checkpoint_layers(model) == 3
    assert_close(z_gradient(model, batch, group=G, kl="k3"), want)
    assert_close(z_gradient(model, batch, kl="k3"), want)


@pytest.mark.parametrize("cache", ["policy", "none"])
def test_without_kept_weights_forwards_and_gradients_are_the_same(cache):
    model, batch = small_model(), grouped_batch()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits
        with reference_mode(model):
            ref_logits = model(input_ids=batch.input_ids).logits
    want = z_gradient(model, batch, group=G, kl="k3")
    set_weight_cache(model, cache)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch.input_ids).logits, logits, rtol=1e-4, atol=1e-5)
        with reference_mode(model):
            torch.testing.assert_close(model(input_ids=batch.input_ids).logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert_close(z_gradient(model, batch, group=G, kl="k3"), want)
    layers = svf_layers(model).values()
    assert all(layer._reference_weight is None for layer in layers)
    assert all(layer._policy_weight is None for layer in layers) == (cache == "none")


def test_a_model_that_changes_its_logits_after_the_head_keeps_whole_logits():
    model = small_model()
    assert head_is_plain(model) and plan_forward(model).hidden
    forward = model.forward

    def capped(*args, **kwargs):  # soft-capping after the head, as Gemma 2 does
        out = forward(*args, **kwargs)
        out.logits = 30 * torch.tanh(out.logits / 30)
        return out

    model.forward = capped
    assert not head_is_plain(model) and not plan_forward(model).hidden


# bf16 keeps 8 bits of mantissa: unit roundoff u = 2^-9. The gradient passes through about 10 roundings per
# layer (norms, projections, attention, MLP) and 3 layers; relative errors of that many roundings add up to
# about √30 · u ≈ 1% when independent. The bound allows 4x that; a gradient left in bf16 where fp32 is promised
# (z's sum over tokens, the composition) or a lost term would exceed it.
BF16_RTOL = 4 * 30 ** 0.5 * 2.0 ** -9


@pytest.mark.parametrize("strategy", ["compose", "factored"])
def test_bf16_gradient_agrees_with_fp32_within_its_rounding(strategy):
    model32, batch = small_model(strategy=strategy), grouped_batch()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    with torch.no_grad():  # the same base: the fp32 model's weights rounded to bf16
        for p32, p16 in zip(model32.parameters(), model16.parameters(), strict=True):
            if p16.dtype == torch.bfloat16:
                p32.copy_(p16.float())
        for layer16, layer32 in zip(svf_layers(model16).values(), svf_layers(model32).values(), strict=True):
            assert layer16.z.dtype == torch.float32
            layer16.z.copy_(layer32.z)
    want = z_gradient(model32, batch, group=G, kl="k3")
    got = z_gradient(model16, batch, group=G, kl="k3")
    relative = ((got - want).norm() / want.norm()).item()
    assert relative <= BF16_RTOL, relative
