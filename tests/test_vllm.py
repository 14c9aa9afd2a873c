"""vLLM colocated: after a training step its log-probs are the trainer's at the new z."""

import importlib.util

import pytest
import torch

from svf_rl.base_model import cache_root, load_base_model
from svf_rl.engine import Sampling
from svf_rl.logprobs import completion_logits, make_token_batch, of_tokens
from svf_rl.svf import apply_svf, policy_step, svf_layers
from svf_rl.train import chat_ids, pad_logprobs

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")]


def trainer_logprobs(model, completions, pad_id, grad=False):
    batch = make_token_batch([c.prompt_ids for c in completions], [c.ids for c in completions], pad_id)
    with torch.set_grad_enabled(grad):
        logp = of_tokens(torch.log_softmax(completion_logits(model, batch), -1), batch.completion_ids)
    return logp, batch.completion_mask


def test_weights_pushed_after_a_step_match_the_trainer(smollm2_path):
    from svf_rl.vllm_engine import VLLMEngine

    model, tokenizer = load_base_model(smollm2_path)
    apply_svf(model, "mlp", "auto", cache_root() / "svd", progress=False)
    engine = VLLMEngine(model, tokenizer, smollm2_path, seed=0)
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in ("What is 7 * 8?", "Name a colour.")]
    sampling = Sampling(n=4, temperature=1.0, max_new_tokens=12, seeds=[1, 2])
    before = engine.generate(prompts, sampling)
    base_logp, mask = trainer_logprobs(model, before, tokenizer.pad_token_id)

    # One REINFORCE step with a large learning rate, then push.
    optimizer = torch.optim.Adam([layer.z for layer in svf_layers(model).values()], lr=0.02)
    advantage = torch.tensor([1.0, -1.0] * 4)
    with policy_step(model, tokens=int(mask.numel())):
        logp, mask = trainer_logprobs(model, before, tokenizer.pad_token_id, grad=True)
        (-(advantage[:, None] * logp * mask).sum() / mask.sum()).backward()
    optimizer.step()
    engine.update_weights()

    after = engine.generate(prompts, sampling)
    new_logp, new_mask = trainer_logprobs(model, after, tokenizer.pad_token_id)
    engine_logp = pad_logprobs([c.logprobs for c in after], new_logp.shape[1])
    gap = ((engine_logp - new_logp).abs() * new_mask).max().item()
    assert gap < 1e-3, f"vLLM and trainer disagree by {gap} after the push"
    stale, _ = trainer_logprobs(load_base_model(smollm2_path)[0], after, tokenizer.pad_token_id)
    assert ((engine_logp - stale).abs() * new_mask).max().item() > 1e-2  # the push changed vLLM's weights
