"""The HF engine samples from exactly the configured distribution, and reports its log-probs."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from svf_rl.engines.hf import HFEngine, RolloutDistribution, Sampling
from svf_rl.loop.logprobs import completion_logprobs, make_token_batch


@pytest.fixture
def model_and_tokenizer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def trainer_logprobs(model, completions, pad_id, temperature):
    batch = make_token_batch([c.prompt_ids for c in completions], [c.ids for c in completions], pad_id)
    with torch.no_grad():
        logp = completion_logprobs(model, batch, temperature)
    return logp, batch.completion_mask


def test_rollouts_ignore_the_checkpoints_generation_options(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # What a checkpoint's generation_config.json may hold (Qwen sets repetition_penalty and top_k, for instance).
    model.generation_config.update(top_k=1, repetition_penalty=3.0, min_new_tokens=6, no_repeat_ngram_size=1)
    engine = HFEngine(model, tokenizer)
    torch.manual_seed(0)
    prompt = tokenizer("What is 2 + 3?")["input_ids"]
    completions = engine.generate([prompt], Sampling(n=32, temperature=0.7, max_new_tokens=6))
    assert len({tuple(c.ids[:1]) for c in completions}) > 1  # top_k = 1 would make every sample the same
    logp, mask = trainer_logprobs(model, completions, tokenizer.pad_token_id, 0.7)
    engine_logp = torch.zeros_like(logp)
    for row, c in enumerate(completions):
        engine_logp[row, :len(c.logprobs)] = torch.tensor(c.logprobs)
    # The sampler's log-probs are the policy's, token for token: no penalty or filter reshaped them.
    assert ((engine_logp - logp).abs() * mask).max().item() < 1e-4
    assert model.generation_config.top_k == 1  # the model's own options are left as they were


def test_top_p_keeps_the_smallest_set_of_tokens_that_reaches_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    distribution = RolloutDistribution(temperature=1.0, top_p=0.7)
    kept = distribution(torch.zeros(1, 1, dtype=torch.long), probs.log()).exp()
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    distribution = RolloutDistribution(temperature=0.5, top_p=1.0)
    tempered = distribution(torch.zeros(1, 1, dtype=torch.long), probs.log()).exp()
    torch.testing.assert_close(tempered, probs**2 / (probs**2).sum())


def test_sampled_log_probs_follow_the_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = HFEngine(model, tokenizer)
    torch.manual_seed(1)
    prompts = [tokenizer("Hello")["input_ids"], tokenizer("Name three colours please")["input_ids"]]
    completions = engine.generate(prompts, Sampling(n=3, temperature=1.0, top_p=0.9, max_new_tokens=5))
    assert all(len(c.logprobs) == len(c.ids) and all(lp <= 0 for lp in c.logprobs) for c in completions)
    logp, mask = trainer_logprobs(model, completions, tokenizer.pad_token_id, 1.0)
    engine_logp = torch.zeros_like(logp)
    for row, c in enumerate(completions):
        engine_logp[row, :len(c.logprobs)] = torch.tensor(c.logprobs)
    # top-p renormalises over the nucleus: the sampler's log-prob is never below the full softmax's.
    assert (((engine_logp - logp) * mask) >= -1e-4).all()


def test_a_prompts_completions_share_one_prefill_and_sample_the_policy_exactly(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = HFEngine(model, tokenizer)
    widths = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    torch.manual_seed(2)
    prompts = [tokenizer("Hi")["input_ids"], tokenizer("Count from one to ten, slowly and clearly")["input_ids"]]
    try:
        completions = engine.generate(prompts, Sampling(n=4, temperature=1.0, max_new_tokens=6))
    finally:
        hook.remove()
    longest = max(map(len, prompts))
    assert widths[0] == (2, longest - 1)  # the left-padded prompts run once, not once per completion
    assert all(rows == 8 and width == 1 for rows, width in widths[1:])  # then one token per completion
    assert [c.prompt_ids for c in completions] == [prompts[0]] * 4 + [prompts[1]] * 4
    logp, mask = trainer_logprobs(model, completions, tokenizer.pad_token_id, 1.0)
    engine_logp = torch.zeros_like(logp)
    for row, c in enumerate(completions):
        engine_logp[row, :len(c.logprobs)] = torch.tensor(c.logprobs)
    # Positions and padding of the shared cache are the full forward's: the sampler's log-probs are the policy's.
    assert ((engine_logp - logp).abs() * mask).max().item() < 1e-4
