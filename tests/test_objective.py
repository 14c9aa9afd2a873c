import pytest
import torch

from svf_rl.objective import advantages, aggregate, kl_per_token, policy_loss


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
    logp = torch.log(torch.tensor([[0.2, 0.5]]))
    full = torch.log_softmax(torch.randn(1, 2, 7), -1)
    for estimator in ("k1", "k3", "full"):
        assert torch.allclose(kl_per_token(logp, logp, estimator, full, full), torch.zeros(1, 2), atol=1e-7)


def test_k3_is_never_negative_and_unbiased():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(5), torch.randn(5)
    p, q = torch.softmax(p_logits, 0), torch.softmax(q_logits, 0)
    exact = (p * (p.log() - q.log())).sum()
    samples = torch.multinomial(p, 200_000, replacement=True)
    k3 = kl_per_token(p.log()[samples], q.log()[samples], "k3")
    assert (k3 >= 0).all()
    assert torch.isclose(k3.mean(), exact, rtol=0.03)
    full = kl_per_token(None, None, "full", p.log()[None], q.log()[None])
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
