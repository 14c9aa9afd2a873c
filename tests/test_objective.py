import itertools

import pytest
import torch

from svf_rl.loop.logprobs import token_stats
from svf_rl.loop.objective import advantages, aggregate, kl_penalty, policy_loss


def test_no_baseline_is_plain_reinforce():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    assert torch.equal(advantages(rewards, 2, "none"), rewards)


def test_mean_baseline_subtracts_the_batch_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(advantages(rewards, 2, "mean"), torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_rloo_subtracts_the_mean_of_the_other_completions_of_the_same_prompt():
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 3.0, 0.0])
    expected = torch.tensor([1.0, -0.5, -0.5, 1.5, 1.5, -3.0])
    assert torch.allclose(advantages(rewards, 3, "rloo"), expected)


def test_grpo_normalises_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 5.0, 5.0])
    adv = advantages(rewards, 2, "grpo")
    assert adv[0] > 0 > adv[1]
    assert torch.allclose(adv[:2], torch.tensor([1, -1]) / (2**0.5 / 2 * 2**0.5 + 1e-4) * (2**0.5 / 2), atol=1e-3)
    assert torch.equal(adv[2:], torch.zeros(2))  # a group with equal rewards teaches nothing


def test_unknown_baseline_is_rejected():
    with pytest.raises(ValueError, match="rloo"):
        advantages(torch.zeros(4), 2, "ppo")


def test_kl_estimators_are_zero_at_the_reference():
    logits = torch.randn(1, 2, 7)
    logp, _, full_kl = token_stats(logits, torch.tensor([[3, 5]]), 1.0, ref_features=logits)
    for estimator in ("k1", "k3", "full"):
        kl, _ = kl_penalty(logp, logp, torch.ones(1, 2), estimator, full_kl)
        assert torch.allclose(kl, torch.zeros(1, 2), atol=1e-7)


def test_k3_is_never_negative_and_unbiased():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(5), torch.randn(5)
    p, q = torch.softmax(p_logits, 0), torch.softmax(q_logits, 0)
    exact = (p * (p.log() - q.log())).sum()
    samples = torch.multinomial(p, 200_000, replacement=True)
    k3, _ = kl_penalty(p.log()[samples], q.log()[samples], torch.ones(len(samples)), "k3")
    assert (k3 >= 0).all()
    assert torch.isclose(k3.mean(), exact, rtol=0.03)
    _, _, full_kl = token_stats(p_logits[None], torch.tensor([0]), 1.0, ref_features=q_logits[None])
    full, _ = kl_penalty(torch.zeros(1), None, torch.ones(1), "full", full_kl)
    assert torch.isclose(full[0], exact, rtol=1e-5)


@pytest.mark.parametrize("how", ["token_mean", "sequence_mean", "sequence_sum"])
def test_micro_batch_losses_add_up_to_the_batch_loss(how):
    per_token = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    tokens = int(mask.sum())
    whole = aggregate(per_token, mask, how, tokens, 6)
    parts = aggregate(per_token[:2], mask[:2], how, tokens, 6) + aggregate(per_token[2:], mask[2:], how, tokens, 6)
    assert torch.isclose(whole, parts)


def test_policy_loss_gradient_is_minus_advantage_times_grad_log_prob():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss = policy_loss(logp, logp.detach(), torch.tensor([0.5])).sum()
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -0.5]]))


EOS, VOCAB = 0, 3


def completions():
    """Every completion of a two-token policy over 3 tokens; token 0 ends it early."""
    return [(EOS,)] + [(a, b) for a, b in itertools.product(range(1, VOCAB), range(VOCAB))]


def token_logprobs(first: torch.Tensor, second: torch.Tensor, y: tuple) -> torch.Tensor:
    """[2, V] log-probs at both positions of completion y (the second is padding when y has one token)."""
    return torch.stack([torch.log_softmax(first, -1), torch.log_softmax(second[y[0]], -1)])


def exact_kl(theta, ref) -> torch.Tensor:
    """KL(π‖π_ref) of whole completions, by enumeration."""
    total = 0
    for y in completions():
        logp, ref_logp = token_logprobs(*theta, y), token_logprobs(*ref, y)
        lp = sum(logp[t, token] for t, token in enumerate(y))
        total = total + lp.exp() * (lp - sum(ref_logp[t, token] for t, token in enumerate(y)))
    return total


def expected_surrogate_gradient(theta, ref, estimator: str, surrogate) -> list[torch.Tensor]:
    """E_{y ~ π}[∇ Σ_t surrogate_t(y)], summing over every completion weighted by its probability."""
    grads = [torch.zeros_like(p) for p in theta]
    for y in completions():
        logprobs, ref_logprobs = token_logprobs(*theta, y)[None], token_logprobs(*ref, y)[None]
        tokens = torch.tensor([list(y) + [EOS] * (2 - len(y))])
        mask = torch.tensor([[1.0] * len(y) + [0.0] * (2 - len(y))])
        # The trainer's own per-token statistics (log_softmax of log-probs is themselves).
        logp, _, full_kl = token_stats(logprobs, tokens, 1.0, ref_features=ref_logprobs.detach())
        ref_logp = ref_logprobs.gather(-1, tokens[..., None]).squeeze(-1)
        value = surrogate(logp, ref_logp, mask, estimator, full_kl).sum()
        probability = (logp * mask).sum().exp().detach()
        for grad, part in zip(grads, torch.autograd.grad(value, theta), strict=True):
            grad += probability * part
    return grads


def penalty_surrogate(*args):
    return kl_penalty(*args)[1]


@pytest.mark.parametrize("estimator", ["k1", "k3", "full"])
def test_kl_penalty_gradient_is_the_gradient_of_the_kl_in_expectation(estimator):
    torch.manual_seed(0)
    theta = [torch.randn(VOCAB, dtype=torch.float64, requires_grad=True),
             torch.randn(VOCAB, VOCAB, dtype=torch.float64, requires_grad=True)]
    ref = [torch.randn(VOCAB, dtype=torch.float64), torch.randn(VOCAB, VOCAB, dtype=torch.float64)]
    want = torch.autograd.grad(exact_kl(theta, ref), theta)
    got = expected_surrogate_gradient(theta, ref, estimator, penalty_surrogate)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert max(w.abs().max().item() for w in want) > 0.05  # a gradient worth checking


def test_differentiating_k3_itself_follows_the_reverse_kl():
    """Why the surrogate exists: ∇k3 averages to ∇KL(π_ref‖π), and ∇k1 to nothing."""
    torch.manual_seed(1)
    theta = [torch.randn(VOCAB, dtype=torch.float64, requires_grad=True),
             torch.randn(VOCAB, VOCAB, dtype=torch.float64, requires_grad=True)]
    ref = [torch.randn(VOCAB, dtype=torch.float64), torch.randn(VOCAB, VOCAB, dtype=torch.float64)]
    want = torch.autograd.grad(exact_kl(theta, ref), theta)
    k3_alone = expected_surrogate_gradient(theta, ref, "k3", lambda *a: kl_penalty(*a)[0])
    k1_alone = expected_surrogate_gradient(theta, ref, "k1", lambda *a: kl_penalty(*a)[0])
    assert not torch.allclose(k3_alone[0], want[0], atol=1e-3)
    assert all(torch.allclose(g, torch.zeros_like(g), atol=1e-12) for g in k1_alone)
