import pytest
import torch
from torch import nn

from svf_rl.policies.svf_layer import SVFLinear, apply_svf, policy_step, reference_mode, svf_layers, z_vectors
from svf_rl.svd import cached_svd, model_fingerprint
from svf_rl.targets import find_targets

from .conftest import tiny_llama


def make_layer(out=24, inp=16, strategy="auto", seed=0) -> tuple[SVFLinear, torch.Tensor]:
    torch.manual_seed(seed)
    weight = torch.randn(out, inp)
    U, s, Vh = torch.linalg.svd(weight, full_matrices=False)
    return SVFLinear(U, s, Vh, torch.randn(out), strategy), weight


def test_z_one_reproduces_base_weights():
    layer, weight = make_layer()
    composed = layer.compose(layer.z)
    assert torch.equal(layer.z, torch.ones_like(layer.z))
    assert (composed - weight).norm() / weight.norm() < 1e-5  # fp32 SVD precision


def test_svf_model_at_z_one_matches_base_logits():
    base, model = tiny_llama(), tiny_llama()
    apply_svf(model, "all", progress=False)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, base(ids).logits, atol=1e-4)


@pytest.mark.parametrize("strategy", ["compose", "factored"])
def test_z_gradient_matches_closed_form(strategy):
    layer, _ = make_layer(strategy=strategy)
    with torch.no_grad():
        layer.z.mul_(torch.linspace(0.5, 1.5, layer.z.numel()))
    x, target = torch.randn(5, 16), torch.randn(5, 24)
    ((layer(x) - target) ** 2).sum().backward()
    # Closed form: ∂L/∂z = s ⊙ diag(Uᵀ (∂L/∂W') V), with ∂L/∂W' from a plain linear layer at W'.
    w = layer.compose(layer.z).detach().requires_grad_()
    ((torch.nn.functional.linear(x, w, layer.bias) - target) ** 2).sum().backward()
    closed = layer.s * torch.diagonal(layer.U.T @ w.grad @ layer.Vh.T)
    assert torch.allclose(layer.z.grad, closed, rtol=1e-4, atol=1e-5)


def test_policy_step_composes_once_and_gives_the_same_gradient_over_micro_batches():
    layer, _ = make_layer(strategy="compose")
    x = torch.randn(8, 16)
    layer(x).pow(2).sum().backward()
    expected = layer.z.grad.clone()
    layer.z.grad = None
    model = nn.Sequential(layer)
    with policy_step(model, tokens=8):
        assert layer._step_weight is not None
        for half in (x[:4], x[4:]):
            layer(half).pow(2).sum().backward()
        assert layer.z.grad is None  # z gets its gradient once, when the step closes
    assert torch.allclose(layer.z.grad, expected, rtol=1e-5, atol=1e-6)


def test_auto_strategy_composes_square_matrices_for_many_tokens_and_factors_for_few():
    square, _ = make_layer(out=576, inp=576)
    assert square.choose_strategy(tokens=4) == "factored"
    assert square.choose_strategy(tokens=8192) == "compose"
    wide, _ = make_layer(out=1536, inp=576)  # out > 2·in: the thin factors are cheaper at any batch
    assert wide.choose_strategy(tokens=8192) == "factored"


def test_cached_weight_recomposes_only_when_z_changes():
    layer, _ = make_layer()
    with torch.no_grad():
        first = layer.weight_for_inference()
        assert layer.weight_for_inference() is first
        layer.z.mul_(2.0)
        second = layer.weight_for_inference()
    assert second is not first
    assert torch.allclose(second, layer.compose(layer.z.detach()))


def test_cached_weight_follows_z_written_behind_autograd():
    """ZeRO-1/2 write z through `.data` views of a flat buffer: no version bump, and W' must still follow."""
    layer, _ = make_layer()
    flat = torch.ones(layer.z.numel())
    layer.z.data = flat  # the layer's z is now a view of an optimiser-owned buffer
    first = layer.weight_for_inference().clone()
    flat.add_(0.5)  # the optimiser's in-place update, unseen by autograd
    torch.testing.assert_close(layer.weight_for_inference(), layer.compose(torch.full_like(flat, 1.5)))
    assert not torch.allclose(layer.weight_for_inference(), first)


def test_reference_mode_runs_the_base_model_whatever_z_is():
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        base = model(ids).logits
    apply_svf(model, "mlp", progress=False)
    for layer in svf_layers(model).values():
        layer.z.data.fill_(1.7)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base, atol=1e-3)
        with reference_mode(model):
            assert torch.allclose(model(ids).logits, base, atol=1e-4)


def test_only_z_is_trainable():
    model = tiny_llama()
    names = apply_svf(model, "mlp", progress=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.z" for n in names}
    assert set(z_vectors(model)) == set(names)


@pytest.mark.parametrize("targets, expected", [
    ("mlp", {"gate_proj", "up_proj", "down_proj"}),
    ("attn", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("all", {"gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"}),
    (r"layers\.1\.mlp\.down_proj$", {"down_proj"}),
])
def test_target_selection(targets, expected):
    names = find_targets(tiny_llama(), targets)
    assert {n.rsplit(".", 1)[1] for n in names} == expected
    assert "lm_head" not in names


def test_target_that_matches_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        find_targets(tiny_llama(), "nothing_here")


def test_tied_output_layer_cannot_be_a_target():
    with pytest.raises(ValueError, match="tied"):
        find_targets(tiny_llama(), "lm_head")


def test_svd_cache_is_reused_from_disk(tmp_path):
    weight = torch.randn(12, 8)
    U, s, Vh = cached_svd(weight, tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    U2, s2, Vh2 = cached_svd(weight, tmp_path)
    assert torch.equal(U, U2) and torch.equal(s, s2) and torch.equal(Vh, Vh2)
    files[0].write_bytes(b"corrupt")  # a damaged cache entry is recomputed, not trusted
    assert torch.equal(cached_svd(weight, tmp_path)[1], s)


def test_fingerprint_tells_models_apart():
    assert model_fingerprint(tiny_llama(seed=0)) == model_fingerprint(tiny_llama(seed=0))
    assert model_fingerprint(tiny_llama(seed=0)) != model_fingerprint(tiny_llama(seed=1))


@pytest.mark.parametrize("keep_base", [False, True])
def test_rows_of_one_batch_each_run_at_their_own_z(keep_base):
    from svf_rl.policies.svf_layer import SVFLinear

    generator = torch.Generator().manual_seed(0)
    W, bias = torch.randn(6, 4, generator=generator), torch.randn(6, generator=generator)
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    layer = SVFLinear(U, s, Vh, bias)
    if keep_base:
        layer.base = torch.nn.Parameter(W.clone(), requires_grad=False)
    zs = [1 + 0.3 * torch.randn(4, generator=generator) for _ in range(3)]
    x = torch.randn(3, 5, 4, generator=generator)
    expected = []
    with torch.no_grad():
        for row, z in enumerate(zs):
            layer.z.copy_(z)
            expected.append(layer(x[row:row + 1]))
        layer.row_z = torch.stack(zs)[:, None, :]
        got = layer(x)
    torch.testing.assert_close(got, torch.cat(expected), rtol=0, atol=1e-5)
