"""Routed policies: a mixture of SVF experts, HydraLoRA and MoLoRA. Each computes what its formula says, π_ref is
the base model, the balance term's gradient is the documented one, the router learns to separate two tasks,
and each trains through the unchanged loop and saves a file that loads."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from svf_rl.config import ConfigError, load_config
from svf_rl.inference.expert import Expert, save_expert
from svf_rl.policies import make_policy
from svf_rl.policies.mixture import MixtureLinear
from svf_rl.policies.routing import Router, routers, routing_metrics
from svf_rl.policies.svf_layer import apply_svf, load_z, svf_layers
from svf_rl.svd import model_fingerprint
from tests.conftest import tiny_llama

IDS = torch.tensor([[3, 9, 27, 11, 5, 17], [4, 8, 15, 16, 23, 42]])


def expert_files(tmp_path, count=2, targets="mlp", seed=0, model=None):
    """Expert files for tiny_llama: each z a different random scale."""
    model = model or tiny_llama()
    fingerprint = model_fingerprint(model)
    svf = tiny_llama()
    apply_svf(svf, targets, progress=False)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for k in range(count):
        vectors = {n: 1 + 0.5 * torch.randn(layer.z.shape, generator=generator)
                   for n, layer in svf_layers(svf).items()}
        paths.append(str(save_expert(Expert(vectors, "tiny", fingerprint, targets, f"task{k}"),
                                     tmp_path / f"e{k}.safetensors")))
    return paths


def mixture(paths, prompts=(), **args):
    overrides = ["policy=mixture", "targets=mlp", "progress=false", f"policy_args.experts=[{','.join(paths)}]"]
    config = load_config(None, overrides + [f"policy_args.{k}={v}" for k, v in args.items()])
    model = tiny_llama()
    policy = make_policy(config)
    policy.attach(model, prompts)
    return model, policy


def svf_model_at(vectors):
    model = tiny_llama()
    apply_svf(model, "mlp", progress=False)
    load_z(model, vectors)
    return model


def test_the_mixture_is_the_base_at_the_base_gate_each_expert_at_its_own_and_their_mean_when_uniform(tmp_path):
    from svf_rl.inference.expert import load_expert

    paths = expert_files(tmp_path)
    experts = [load_expert(p).vectors for p in paths]
    model, policy = mixture(paths)
    with torch.no_grad():
        uniform = model(IDS).logits  # the routers start at zero: gates 1/3 each
        mean = {n: 1 + sum(e[n] - 1 for e in experts) / 3 for n in experts[0]}
        assert torch.allclose(uniform, svf_model_at(mean)(IDS).logits, atol=1e-5)
        with policy.reference():
            assert torch.allclose(model(IDS).logits, tiny_llama()(IDS).logits, atol=1e-5)
        for option, want in ((0, None), (1, experts[0]), (2, experts[1])):
            for layer in policy.layers.values():
                layer.router.bias.zero_()
                layer.router.bias[option] = 50.0  # gate ≈ 1 on this option
            expected = tiny_llama()(IDS).logits if want is None else svf_model_at(want)(IDS).logits
            assert torch.allclose(model(IDS).logits, expected, atol=1e-4)


def test_the_router_gradient_is_the_per_token_mixtures(tmp_path):
    """∂L/∂R through the factored layer equals autograd through W'(z(x)) composed for each token."""
    paths = expert_files(tmp_path)
    model, policy = mixture(paths)
    layer = next(iter(policy.layers.values()))
    torch.manual_seed(0)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3)
    x = torch.randn(5, layer.in_features)
    (layer(x) ** 2).sum().backward()
    fast = layer.router.weight.grad.clone()
    layer.router.weight.grad = None
    gates = F.linear(x, layer.router.weight, layer.router.bias).softmax(-1)
    outs = []
    for t in range(len(x)):  # one W' per token, composed whole
        z = 1 + gates[t, 1:] @ (layer.experts - 1)
        outs.append(layer.compose(z) @ x[t])
    (torch.stack(outs) ** 2).sum().backward()
    assert torch.allclose(fast, layer.router.weight.grad, rtol=1e-4, atol=1e-6)


def test_sequence_routing_runs_each_row_at_its_prompts_gates_and_the_router_gradient_is_the_written_out_ones(
        tmp_path):
    """routing=sequence: row i runs at z_i = 1 + Σₖ gₖ(p_i)(zₖ − 1), gates from the base model's final hidden
    states averaged over prompt i's tokens (left padding ignored), less their mean over the calibration prompts
    (set on first use), at unit length; the same for the prompt and its completion; ∂L/∂R is autograd's through
    each row's own SVF model at z_i(R)."""
    from torch.func import functional_call

    from svf_rl.engines.hf import left_pad, prompt_rows
    from svf_rl.inference.expert import load_expert

    paths = expert_files(tmp_path)
    experts = [load_expert(p).vectors for p in paths]
    calibration = [[7, 1, 2], [30, 31, 32, 33, 34], [5]]
    model, policy = mixture(paths, calibration, routing="sequence")
    torch.manual_seed(0)
    with torch.no_grad():
        policy.router.weight.normal_(0, 3.0)
    prompts, answers = [[3, 9, 27, 11], [4, 8, 15, 16, 23, 42]], [[5, 6, 7], [1, 2, 3]]
    ids, mask = left_pad(prompts, 0)
    full, full_mask = left_pad([p + a for p, a in zip(prompts, answers, strict=True)], 0)
    assert not policy.router.centre.any()
    with prompt_rows(model, ids, mask):
        logits = model(input_ids=full, attention_mask=full_mask,
                       position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    (logits ** 2 * full_mask[..., None]).sum().backward()  # the padding's outputs are no row's
    got = policy.router.weight.grad.clone()

    base, svf = tiny_llama(), svf_model_at({n: torch.ones_like(v) for n, v in experts[0].items()})
    with torch.no_grad():
        def pool(prompt):
            return base(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0].mean(0)
        centre = torch.stack([pool(p) for p in calibration]).mean(0)
    assert torch.allclose(policy.router.centre, centre, atol=1e-5)  # set by the first pass, from the calibration
    loss, gate_rows = 0, []
    for prompt, answer in zip(prompts, answers, strict=True):
        with torch.no_grad():
            pooled = pool(prompt) - centre
            pooled = pooled / pooled.norm()  # at unit length
        gates = F.linear(pooled, policy.router.weight, policy.router.bias).softmax(-1)
        gate_rows.append(gates.detach())
        z = {f"{n}.z": 1 + sum(gates[k + 1] * (e[n] - 1) for k, e in enumerate(experts)) for n in experts[0]}
        out = functional_call(svf, z, (torch.tensor([prompt + answer]),)).logits
        row = len(gate_rows) - 1
        assert torch.allclose(out[0], logits[row, -out.shape[1]:], atol=1e-4)  # the row's own model, unpadded
        loss = loss + (out ** 2).sum()
    assert (gate_rows[0] - gate_rows[1]).abs().max() > 0.05  # the prompts are routed differently
    want, = torch.autograd.grad(loss, policy.router.weight)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-6) and want.abs().max() > 1e-5
    with pytest.raises(RuntimeError, match="without its prompts' first pass"):
        model(full)
    with torch.no_grad(), policy.reference():  # π_ref needs no first pass
        assert torch.allclose(model(IDS).logits, tiny_llama()(IDS).logits, atol=1e-5)


def test_a_sequence_routers_centre_is_kept_by_checkpoints_and_files_and_old_ones_read_uncentred(tmp_path):
    """The centre a router was trained on travels with its trained tensors: a resumed policy (whose own
    calibration prompts might differ) and a loaded file use it, never a recomputed one; a checkpoint or file
    written before routers were centred reads with no centre, as it was trained."""
    from svf_rl.engines.hf import left_pad, prompt_rows
    from svf_rl.policies.mixture import CENTRE

    paths = expert_files(tmp_path)
    ids, mask = left_pad([[3, 9, 27, 11], [4, 8]], 0)

    def routed(policy, model):
        with torch.no_grad(), prompt_rows(model, ids, mask):
            return model(input_ids=ids, attention_mask=mask).logits

    model, policy = mixture(paths, [[7, 1, 2], [30, 31, 32]], routing="sequence")
    with torch.no_grad():
        policy.router.weight.normal_(0, 3.0)
    state = policy.state_dict()  # sets the centre first if no forward has
    assert state[CENTRE].any() and torch.equal(state[CENTRE], policy.router.centre)
    want = routed(policy, model)
    other_model, other = mixture(paths, [[5, 5, 5, 5, 5]], routing="sequence")  # a resume with other prompts
    other.load_state_dict(state)
    assert torch.equal(other.router.centre, state[CENTRE])
    assert torch.allclose(routed(other, other_model), want, atol=1e-6)
    saved = policy.save(tmp_path / "mix.safetensors", {"model": "tiny", "fingerprint": "f", "task": "t",
                                                       "config": {}}, {})
    from svf_rl.policies.routing import read_routed

    tensors, _ = read_routed(saved)
    assert torch.equal(tensors[CENTRE], state[CENTRE])
    old_model, old = mixture(paths, [[7, 1, 2], [30, 31, 32]], routing="sequence")
    old.load_state_dict({k: v for k, v in state.items() if k != CENTRE})  # a checkpoint from before centring
    routed(old, old_model)
    assert not old.router.centre.any()  # not recomputed from its calibration prompts
    old_model, old = mixture(paths, [[7, 1, 2], [30, 31, 32]], routing="sequence")
    old.load_tensors({k: v for k, v in tensors.items() if k != CENTRE}, "old.safetensors")
    routed(old, old_model)
    assert not old.router.centre.any()


def test_a_sequence_router_through_a_vllm_server_under_several_processes_is_refused_before_anything_loads(
        tmp_path, monkeypatch):
    e0 = expert_files(tmp_path)[0]
    args = ["policy=mixture", f"policy_args.experts=[{e0}]", "policy_args.routing=sequence", "engine=vllm_server",
            "vllm_server_urls=[http://127.0.0.1:8000]"]
    load_config(None, args)  # one process: one server's weights, pushed prompt by prompt
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="one training process can do, not several") as err:
        load_config(None, args)
    assert "\n" not in str(err.value)
    load_config(None, args[:-2] + ["engine=vllm"])  # a colocated engine per process


def test_route_agreement_compares_each_update_sequence_with_its_prompts_route_when_sampled(tmp_path):
    from svf_rl.engines.hf import left_pad, prompt_rows

    model, policy = mixture(expert_files(tmp_path), [[7, 1, 2], [30, 31, 32]], routing="sequence")
    with torch.no_grad():
        policy.router.weight.normal_(0, 3.0)
    sampled = [[3, 9, 27, 11], [4, 8]]

    def forward(grad: bool, prompts=sampled, repeats: int = 1):
        ids, mask = left_pad(prompts, 0)
        with torch.set_grad_enabled(grad), prompt_rows(model, ids, mask, repeats):
            model(input_ids=ids.repeat_interleave(repeats, 0), attention_mask=mask.repeat_interleave(repeats, 0))

    forward(False, repeats=2)  # the rollout: two completions per prompt
    forward(True, [sampled[1], sampled[0], [5, 6]])  # the update, in its own order, with an unsampled prompt
    assert policy.metrics()["route_agreement"] == 1.0
    forward(False)
    with torch.no_grad():  # the router moves between rollout and update: every prompt's top-1 option changes
        policy.router.bias[sorted(set(policy.rollout_top1.values()))] = -100.0
    forward(True)
    assert policy.metrics()["route_agreement"] == 0.0
    assert "route_agreement" not in policy.metrics()  # counted once


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_each_source_tasks_routing_is_what_its_sequences_alone_route(tmp_path, routing):
    """The update's statistics per source task (route_share/<source>/<option>) are those of that source's
    sequences forwarded alone, through the shared prompt's forward too (one row per group), whatever padding
    each batch has."""
    from svf_rl.loop.logprobs import completion_features, make_token_batch

    model, policy = mixture(expert_files(tmp_path), [[7, 1, 2, 4], [30, 31, 32, 33]], routing=routing)
    torch.manual_seed(0)
    with torch.no_grad():
        for router in routers(model):
            router.weight.normal_(0, 3.0)
    # Unequal lengths: each batch pads its own way, and only tokens count (the forwards leave out the widest
    # completion's last token, so each source has one as wide as the widest)
    prompts = [[3, 9, 27, 11, 2], [3, 9, 27, 11, 2], [4, 8], [4, 8], [5, 6, 7], [5, 6, 7]]
    completions = [[1, 2, 3], [4, 5], [7], [10, 11, 12, 13, 14], [13, 14], [16, 17, 18, 19, 20]]
    sources = ["a", "a", "b", "b", "a", "a"]

    def update(rows, labels=None):
        batch = make_token_batch([prompts[i] for i in rows], [completions[i] for i in rows], 0)
        named = [SimpleNamespace(source=label) for label in labels or [None] * len(rows)]
        with torch.enable_grad(), policy.step(1, False), policy.sequences(named):
            completion_features(model, model, batch, group=2)
        return routing_metrics(model, policy.labels)

    together = update(range(6), sources)
    for source, rows in (("a", [0, 1, 4, 5]), ("b", [2, 3])):
        alone = update(rows)
        assert together[f"route_entropy/{source}"] == pytest.approx(alone["route_entropy"], abs=1e-6)
        for label in policy.labels:
            for kind in ("share", "top1"):
                assert together[f"route_{kind}/{source}/{label}"] == pytest.approx(alone[f"route_{kind}/{label}"],
                                                                                  abs=1e-6)
    assert together["route_share/a/task0"] != pytest.approx(together["route_share/b/task0"], abs=1e-3)
    assert not any(key.count("/") == 2 for key in update(range(6)))  # no sources, no statistics per source


def test_the_balance_terms_gradient_is_switchs_on_the_forwarded_tokens():
    router = Router(6, 3, balance=0.5)
    torch.manual_seed(1)
    with torch.no_grad():
        router.weight.normal_()
    x = torch.randn(2, 7, 6)
    router.step_tokens, router.layers = 28, 2  # this forward is half the step's tokens, one of two layers
    gates = router(x)
    gates.backward(torch.zeros_like(gates))  # the loss contributes nothing: what arrives is the balance term's
    got = router.weight.grad.clone()
    probs = F.linear(x, router.weight, router.bias).softmax(-1).reshape(-1, 3)
    share = F.one_hot(probs.argmax(-1), 3).float().mean(0)
    term = 3 * (share * probs.mean(0)).sum() * (14 / 28) / 2 * 0.5
    want, = torch.autograd.grad(term, router.weight)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-9) and want.abs().max() > 1e-4
    # A backend that multiplies the loss (fp16's loss scale, DeepSpeed's rank count) divides the gradient by the
    # same factor afterwards, so the term's own gradient is multiplied alike; without it, it would shrink by S.
    weights = torch.randn(2, 7, 3)
    router.weight.grad, router.loss_scale = None, 4096.0
    (4096.0 * (router(x) * weights).sum()).backward()
    probs = F.linear(x, router.weight, router.bias).softmax(-1)
    term = 3 * (share * probs.reshape(-1, 3).mean(0)).sum() * (14 / 28) / 2 * 0.5
    want, = torch.autograd.grad((probs * weights).sum() + term, router.weight)
    assert torch.allclose(router.weight.grad / 4096.0, want, rtol=1e-4, atol=1e-8)


def test_padding_is_neither_balanced_nor_counted():
    """Where the model's forward has padding (its attention mask), the balance term's fₖ, Pₖ and T are the
    tokens' alone, padding gets no gradient from it, and the statistics count tokens only."""
    config = load_config(None, ["policy=hydralora", "targets=mlp", "policy_args.experts=3", "policy_args.rank=2",
                                "policy_args.balance=0.5"])
    model, policy = tiny_llama(), make_policy(config)
    policy.attach(model)
    ids = torch.tensor([[0, 0, 5, 9, 3, 0], [4, 8, 15, 16, 23, 42]])  # row 0: left and right padding
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    layer = next(iter(policy.layers.values()))
    torch.manual_seed(0)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)  # real preferences: a near-uniform router's term is flat
    seen = []
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with policy.step(100, False, unpadded=18):  # this forward's 9 tokens are half the step's
        model(input_ids=ids, attention_mask=mask).logits.sum().mul(0).backward()
    hook.remove()
    router, keep = layer.router, mask.reshape(-1).bool()
    got = router.weight.grad.clone()
    probs = F.linear(seen[0].float(), router.weight, router.bias).softmax(-1).reshape(-1, 3)[keep]
    share = F.one_hot(probs.argmax(-1), 3).float().mean(0)
    term = 0.5 * 3 * (share * probs.mean(0)).sum() * (9 / 18) / len(policy.layers)
    want, = torch.autograd.grad(term, router.weight)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-9) and want.abs().max() > 1e-6
    router.stats.clear()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        probs = F.linear(seen[0].float(), router.weight, router.bias).softmax(-1).reshape(-1, 3)[keep]
    counted = router.stats["rollout"]
    assert counted[-1] == 9 and torch.allclose(counted[:3], probs.sum(0), atol=1e-5)
    assert torch.allclose(counted[3:6], F.one_hot(probs.argmax(-1), 3).float().sum(0))


def test_a_checkpointed_routed_layer_recomputes_with_its_own_forwards_padding():
    """Gradient checkpointing recomputes each layer in the backward, after other forwards (π_ref's, a shared
    prompt's) have run: the balance term must still see the padding of the forward it recomputes."""
    import copy

    from svf_rl.loop.logprobs import checkpoint_layers, completion_features, make_token_batch, update_tokens

    config = load_config(None, ["policy=hydralora", "targets=mlp", "policy_args.experts=3", "policy_args.rank=2",
                                "policy_args.balance=5.0"])
    batch = make_token_batch([[3, 9, 27, 11, 2]] * 2 + [[4, 8]] * 2, [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]], 0)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model, policy = tiny_llama(), make_policy(config)
        policy.attach(model)
        if checkpointed:
            checkpoint_layers(model)
        with policy.step(update_tokens(batch, 2), False, unpadded=update_tokens(batch, 2, padding=False)):
            features = completion_features(model, model, batch, group=2)
            with torch.no_grad(), policy.reference():
                completion_features(model, model, copy.deepcopy(batch)[:2], group=2)  # other shapes last
            (features * batch.completion_mask[..., None]).sum().mul(1e-3).backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_top_k_keeps_the_k_largest_gates_and_their_gradient():
    router = Router(4, 5, top_k=2)
    with torch.no_grad():
        router.weight.normal_()
    x = torch.randn(10, 4)
    gates = router(x)
    probs = F.linear(x, router.weight, router.bias).softmax(-1)
    kept = probs >= probs.topk(2, -1).values[:, -1:]
    assert ((gates > 0).sum(-1) == 2).all() and torch.equal(gates, torch.where(kept, probs, 0))
    top1 = Router(4, 5, top_k=1)
    with torch.no_grad():
        top1.weight.copy_(router.weight)
    top1(x).sum().backward()  # a renormalised top-1 gate would be 1, and this gradient 0
    assert top1.weight.grad.abs().max() > 1e-3


def test_hydralora_and_molora_start_at_the_base_and_share_a_where_they_say(tmp_path):
    base = tiny_llama()(IDS).logits
    for name in ("hydralora", "molora"):
        config = load_config(None, [f"policy={name}", "targets=mlp", "policy_args.experts=3",
                                    "policy_args.rank=2"])
        model, policy = tiny_llama(), make_policy(config)
        policy.attach(model)
        layer = next(iter(policy.layers.values()))
        assert layer.A.shape[0] == (2 if name == "hydralora" else 6) and layer.B.shape[1] == 6
        with torch.no_grad():
            assert torch.allclose(model(IDS).logits, base, atol=1e-6)  # every B starts at 0
            for p in policy.parameters():
                p.add_(0.3 * torch.randn_like(p))
            moved = model(IDS).logits
            with policy.reference():
                assert torch.allclose(model(IDS).logits, base, atol=1e-6)
        assert (moved - base).abs().max() > 1e-3
        # The layer is Σₖ gₖ Bₖ Aₖ x, written out
        x = torch.randn(4, layer.base.in_features)
        gates = F.linear(x, layer.router.weight, layer.router.bias).softmax(-1)
        A = [layer.A[:2]] * 3 if name == "hydralora" else list(layer.A.split(2))
        B = layer.B.split(2, 1)
        want = layer.base(x) + layer.scale * sum(gates[:, k:k + 1] * (x @ A[k].T @ B[k].T) for k in range(3))
        assert torch.allclose(layer(x), want, atol=1e-5)


def test_two_tasks_each_solved_by_one_expert_are_routed_apart_without_collapse():
    """REINFORCE on a router over two frozen experts: inputs of task a are answered right by expert a's z, of
    task b by expert b's; the router must send each task to its expert, and keep both in use."""
    torch.manual_seed(0)
    d = 6
    svf = apply_identity_layer(d)
    experts = torch.ones(2, d)
    experts[0, 0], experts[1, 1] = 6.0, 6.0  # a boosts action 0, b action 1
    layer = MixtureLinear(svf, experts, Router(d, 3), train_experts=False)
    optimiser = torch.optim.Adam(layer.router.parameters(), lr=0.05)
    for _ in range(300):
        task = torch.randint(0, 2, (64,))
        logits = layer(x_of(task, d))[:, :4]
        action = torch.distributions.Categorical(logits=logits.detach()).sample()
        reward = (action == task).float()
        logp = logits.log_softmax(-1).gather(1, action[:, None])[:, 0]
        loss = -((reward - reward.mean()) * logp).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    routing_metrics_reset(layer)
    with torch.no_grad():
        shares = []
        for t in (0, 1):
            x = torch.ones(1, d)
            x[0, 4 + t] = 2
            shares.append(layer.router(x)[0])
    assert shares[0][1] > 0.8 and shares[1][2] > 0.8, shares  # task a → expert a, task b → expert b
    # What a step's statistics show: each task's share of its own expert, and both experts in use
    layer.router.row_sources = ["a" if t == 0 else "b" for t in task]
    layer(x_of(task, d))
    seen = routing_metrics(layer, ["base", "expert_a", "expert_b"])
    assert seen["route_top1/a/expert_a"] == 1.0 and seen["route_top1/b/expert_b"] == 1.0
    assert 0.3 < seen["route_top1/expert_a"] < 0.7 and seen["route_entropy/a"] < 0.5


def x_of(task, d):
    x = torch.ones(len(task), d)
    x[:, 4] = (task == 0).float() * 2
    x[:, 5] = (task == 1).float() * 2
    return x


def apply_identity_layer(d):
    from svf_rl.policies.svf_layer import SVFLinear

    return SVFLinear(torch.eye(d), torch.ones(d), torch.eye(d), None, "factored")


def routing_metrics_reset(layer):
    layer.router.stats.clear()


def test_routing_statistics_are_each_options_mean_gate_and_top1_share(tmp_path):
    paths = expert_files(tmp_path)
    model, policy = mixture(paths)
    with torch.no_grad():
        for layer in policy.layers.values():
            layer.router.bias.copy_(torch.tensor([0.0, 2.0, 0.0]))
        model(IDS)
    metrics = routing_metrics(model, policy.labels)
    assert metrics["route_rollout_top1/task0"] == 1.0 and metrics["route_rollout_top1/base"] == 0.0
    gate = torch.tensor([0.0, 2.0, 0.0]).softmax(0)
    assert abs(metrics["route_rollout_share/task0"] - gate[1].item()) < 1e-6
    assert abs(metrics["route_rollout_entropy"] - (-(gate * gate.log()).sum()).item()) < 1e-5
    assert routing_metrics(model, policy.labels) == {}  # counted once


@pytest.mark.parametrize("bad, message", [
    (["policy=mixture"], "experts must list at least one expert file"),
    (["policy=mixture", "policy_args.experts=[missing.safetensors]"], "expert file not found"),
    (["policy=mixture", "policy_args.experts=[{e0}]", "policy_args.routing=prompt"], "routing must be token"),
    (["policy=mixture", "policy_args.experts=[{e0}]", "policy_args.routing=sequence", "gradient_checkpointing=true"],
     "routing=sequence with gradient_checkpointing"),
    (["policy=mixture", "policy_args.experts=[{e0}]", "policy_args.top_k=3"], "top_k must be 0"),
    (["policy=mixture", "policy_args.experts=[{e0}]", "targets=attn"], "trained with targets 'mlp'"),
    (["policy=mixture", "policy_args.experts=[{e0},{other}]"], "other base weights or layers"),
    (["policy=mixture", "policy_args.experts=[{e0}]", "engine=vllm"], "vLLM engines do not run"),
    (["policy=hydralora", "engine=vllm"], "routes each token inside its layers, which vLLM engines do not run"),
    (["policy=mixture", "policy_args.experts=[{e0}]", "policy_args.balance=-0.1"], "balance must be >= 0"),
    (["policy=hydralora", "policy_args.experts=1"], "need experts >= 2"),
    (["policy=molora", "policy_args.top_k=5"], "top_k must be 0"),
])
def test_bad_routed_policy_settings_fail_in_one_line_before_anything_loads(tmp_path, bad, message):
    e0 = expert_files(tmp_path)[0]
    other = expert_files(tmp_path / "o", model=tiny_llama(seed=3))[0]
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [b.format(e0=e0, other=other) for b in bad])
    assert "\n" not in str(err.value)


ROUTED = {"mixture": {"balance": 0.1, "top_k": 2}, "hydralora": {"experts": 3, "rank": 2, "balance": 0.1},
          "molora": {"experts": 2, "rank": 2}, "mixture-sequence": {"routing": "sequence", "balance": 0.1}}


def routed_config(name, tiny_model_dir, path, experts, **overrides):
    from tests.test_train import tiny_config

    policy = name.partition("-")[0]
    args = {**ROUTED[name], **({"experts": f"[{','.join(experts)}]"} if policy == "mixture" else {})}
    return tiny_config(tiny_model_dir, path, **{"policy": policy, "targets": "mlp", "lr": 2.0, **overrides},
                       **{f"policy_args.{k}": v for k, v in args.items()})


@pytest.mark.parametrize("name", list(ROUTED))
def test_a_routed_policy_trains_through_the_loop_and_its_file_loads_and_resumes(name, tiny_model_dir, tiny_experts,
                                                                                tmp_path):
    from transformers import AutoModelForCausalLM

    from svf_rl.loop.train import train
    from svf_rl.run_files import read_metrics
    from tests.same_z import EQUALITY

    config = routed_config(name, tiny_model_dir, tmp_path / "whole", tiny_experts, steps=4, save_every=2,
                           eval_every=2, **EQUALITY)
    artefact = train(config)
    assert artefact.name == "mixture.safetensors"
    steps = [r for r in read_metrics(tmp_path / "whole" / "run" / "metrics.jsonl") if "reward" in r]
    assert len(steps) == 4 and all(0 < r["route_entropy"] <= 1.1 for r in steps)
    assert all(r["sampler_logp_gap"] < 1e-4 for r in steps)  # rollouts ran the trainer's own routed policy
    # each update sequence took its prompt's route when sampled; each token its own (up to float ties)
    assert all(r["route_agreement"] >= (1.0 if name == "mixture-sequence" else 0.99) for r in steps)
    # The file alone rebuilds what training ended with
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fingerprint = model_fingerprint(model)
    policy = make_policy(config)
    policy.attach(model)
    fresh = {k: v.clone() for k, v in policy.state_dict().items()}
    policy.load(artefact, fingerprint)
    loaded = policy.state_dict()
    assert any((loaded[k] - fresh[k]).abs().max() > 1e-4 for k in fresh), "training moved nothing"
    with pytest.raises(ValueError, match="other base weights"):
        policy.load(artefact, "0" * 32)
    # Two steps, then two more after a resume: the same tensors as four in one go
    train(routed_config(name, tiny_model_dir, tmp_path / "split", tiny_experts, steps=2, save_every=2, eval_every=2,
                        **EQUALITY))
    from svf_rl.policies.routing import read_routed

    resumed, _ = read_routed(train(routed_config(name, tiny_model_dir, tmp_path / "split", tiny_experts, steps=4,
                                                 save_every=2, eval_every=2, **EQUALITY)))
    whole, info = read_routed(artefact)
    assert info["policy"] == name.partition("-")[0] and info["labels"] == policy.labels
    assert "test_accuracy" in info["scores"]
    for key in whole:
        assert torch.allclose(whole[key], resumed[key], rtol=0, atol=1e-6), key
    assert "sequence_router.centre" not in whole or whole["sequence_router.centre"].any()  # set, and kept
    # `svf-rl eval` scores the file as training's test did (the mixture's experts come from the file itself)
    import json

    from svf_rl.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", str(artefact), "--size", "4", "--max-new-tokens", "4", "--output", str(out)]) == 0
    scored = json.loads(out.read_text())
    assert scored["accuracy"] == pytest.approx(info["scores"]["test_accuracy"], rel=1e-6)
    shares = [scored["routing"]["all"][f"share/{label}"] for label in info["labels"]]
    assert sum(shares) == pytest.approx(1.0) and 0 < scored["routing"]["all"]["entropy"] <= 1.1
    if name != "mixture-sequence":  # token routing stays on the HF engine (a sequence router: tests/test_vllm.py)
        assert main(["eval", str(artefact), "--engine", "vllm", "--size", "4"]) == 2


def test_a_mixed_tasks_sources_are_routed_and_reported_apart_each_step(tiny_model_dir, tiny_experts, tmp_path,
                                                                         monkeypatch):
    """Through the loop, a mixed task's sources each get their routing statistics per step, and the routers'
    step scope is given the step's tokens without padding."""
    from svf_rl.loop.train import train
    from svf_rl.policies.routing import RoutedPolicy
    from svf_rl.run_files import read_metrics
    from tests.test_train import TASK_FILE

    scopes, step = [], RoutedPolicy.step

    def noted(self, tokens, gather_per_step, loss_scale=1.0, sequences=0, unpadded=0):
        scopes.append((tokens, unpadded))
        return step(self, tokens, gather_per_step, loss_scale, sequences, unpadded)

    monkeypatch.setattr(RoutedPolicy, "step", noted)
    task_file = tmp_path / "two_tasks.py"
    task_file.write_text(TASK_FILE + NO_TASK)
    sources = f'{{"yes": ["{task_file}:YesTask", {{}}], "no": ["{task_file}:NoTask", {{}}]}}'
    config = routed_config("mixture-sequence", tiny_model_dir, tmp_path, tiny_experts, steps=2, eval_every=2,
                           prompts_per_step=4, task="mixed", **{"task_args.sources": sources})
    train(config)
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    seen = [{source for source in ("yes", "no") if f"route_entropy/{source}" in record} for record in steps]
    assert len(steps) == 2 and all(seen) and set.union(*seen) == {"yes", "no"}  # those each step drew
    for record, sources in zip(steps, seen, strict=True):
        for source in sources:
            shares = [record[f"route_share/{source}/{label}"] for label in ("base", "t0", "t1")]
            assert sum(shares) == pytest.approx(1.0) and 0 < record[f"route_entropy/{source}"] <= 1.1
    assert len(scopes) == 2 and all(0 < unpadded <= tokens for tokens, unpadded in scopes)


def test_each_completion_is_labelled_with_its_own_prompts_source(tiny_model_dir, tmp_path):
    """The rollout names each completion's source task from its own prompt's row (n completions per prompt, the
    sources interleaved)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from svf_rl.engines.hf import HFEngine, chat_ids
    from svf_rl.loop.train import roll_out
    from svf_rl.task import load_task
    from tests.test_train import TASK_FILE

    task_file = tmp_path / "two_tasks.py"
    task_file.write_text(TASK_FILE + NO_TASK)
    task = load_task("mixed", {"sources": {"yes": [f"{task_file}:YesTask", {}], "no": [f"{task_file}:NoTask", {}]}})
    rows = task.rows("train", 6, 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = SimpleNamespace(seed=0, prompts_per_step=len(rows), generations_per_prompt=3, temperature=1.0,
                             top_p=1.0, max_new_tokens=2, seeded_rollouts=True)
    run = SimpleNamespace(config=config, accelerator=SimpleNamespace(process_index=0, num_processes=1),
                          tokenizer=tokenizer, engine=HFEngine(model, tokenizer), task=task)
    completions, _ = roll_out(run, rows, [task.prompt(row) for row in rows], 1)
    source_of = {tuple(chat_ids(tokenizer, task.prompt(row))): task.source(row) for row in rows}
    assert len(source_of) == len(rows) and [task.source(r) for r in rows] != sorted(task.source(r) for r in rows)
    assert len(completions) == 18 and [c.source for c in completions] == [source_of[tuple(c.prompt_ids)]
                                                                          for c in completions]


NO_TASK = '''

class NoTask(YesTask):
    name = "no"

    def user_message(self, row):
        return f"Is {row['question'][3:]} a word?"
'''


def test_hydralora_experts_part_ways_from_their_shared_start():
    """Every B starts at 0 and A is shared: only a router that starts random gives the experts different
    gradients; at zero they would stay identical and the router would never learn."""
    config = load_config(None, ["policy=hydralora", "targets=mlp", "policy_args.experts=2", "policy_args.rank=2"])
    model, policy = tiny_llama(), make_policy(config)
    policy.attach(model)
    optimiser = torch.optim.SGD(policy.parameters(), lr=1.0)
    for _ in range(2):
        optimiser.zero_grad()
        model(IDS).logits.square().mean().backward()
        optimiser.step()
    layer = next(iter(policy.layers.values()))
    first, second = layer.B.split(2, 1)
    assert (first - second).abs().max() > 1e-6
    assert layer.router.weight.grad.abs().max() > 0


@pytest.mark.parametrize("name", ["mixture", "molora"])
def test_token_route_agreement_compares_each_update_token_with_its_route_when_sampled(tmp_path, name):
    """The HF engine keeps each fed token's top-1 option at every token router while it samples (a shared
    prompt's prefill, then one cached position at a time); the update's forwards (a group's prompt once, or each
    sequence whole) compare every token the rollout fed: all agree at the same weights, each token is compared
    once per router, and a router moved in between is seen."""
    from svf_rl.engines.hf import HFEngine, Sampling
    from svf_rl.loop.logprobs import completion_features, make_token_batch

    if name == "mixture":
        model, policy = mixture(expert_files(tmp_path, count=3))
    else:
        model, policy = tiny_llama(), make_policy(load_config(None, ["policy=molora", "targets=mlp",
                                                                     "policy_args.experts=3", "policy_args.rank=2"]))
        policy.attach(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for router in routers(model):
            router.weight.normal_(0, 2.0)  # a router with real preferences, not ties
    model.generation_config.eos_token_id = list(range(2, 12))  # completions of several lengths
    engine = HFEngine(model, SimpleNamespace(pad_token_id=0, decode=lambda ids, **_: ""))
    prompts, group = [[3, 9, 27, 11, 5], [4, 8], [15, 16, 23]], 3  # left-padded together
    completions = engine.generate(prompts, Sampling(n=group, max_new_tokens=8))
    lengths = [len(c.ids) for c in completions]
    assert all(c.routes.shape == (len(routers(model)), len(c.prompt_ids) + len(c.ids) - 1) for c in completions)
    assert len(set(lengths)) > 1 and len({r for c in completions for r in c.routes.flatten().tolist()}) > 1

    def update(shared: int) -> tuple[dict, int]:
        batch = make_token_batch([c.prompt_ids for c in completions], [c.ids for c in completions], 0)
        with torch.enable_grad(), policy.step(1, False), policy.sequences(completions):
            completion_features(model, model, batch, group=shared)
        compared = int(sum(r.stats["agreement"][1] for r in routers(model)))
        return routing_metrics(model, policy.labels), compared

    fed = sum(len(c.prompt_ids) + len(c.ids) - 1 for c in completions)
    shared = sum(len(p) for p in prompts) + sum(n - 1 for n in lengths)  # each prompt once
    for width, count in ((1, fed), (group, shared)):
        metrics, compared = update(width)
        assert metrics["route_agreement"] == 1.0 and compared == count * len(routers(model))
    with torch.no_grad():  # the routers move between rollout and update
        for router in routers(model):
            router.weight.normal_(0, 2.0)
    assert update(group)[0]["route_agreement"] < 0.8


def test_a_bad_routed_file_is_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    from svf_rl.policies.base import PolicyError
    from svf_rl.policies.routing import FORMAT, read_routed

    good = {"format": FORMAT, "policy": "molora", "policy_args": "{}", "labels": "[]", "config": "{}", "scores": "{}",
            "base_model": "m", "base_fingerprint": "f", "targets": "mlp", "task": "t"}
    cases = {"missing.safetensors": (None, "no such file"),
             "nobase.safetensors": ({k: v for k, v in good.items() if k != "base_fingerprint"},
                                    "metadata 'base_fingerprint' is missing"),
             "labels.safetensors": ({**good, "labels": "{}"}, "metadata 'labels' is not a JSON list"),
             "garbage.safetensors": (b"not a tensor file", "not a safetensors file"),
             "expert.safetensors": ({"format": "svf-rl-expert"}, "not a routed policy's file"),
             "nan.safetensors": ({**good, "nan": True}, "non-finite values"),
             "json.safetensors": ({**good, "labels": "[unclosed"}, "'labels' is not JSON")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            value = torch.tensor([1.0, float("nan")]) if content.pop("nan", False) else torch.ones(2)
            save_file({"layer.router.bias": value}, str(path), metadata=content)
        with pytest.raises(PolicyError, match=message) as err:
            read_routed(path)
        assert "\n" not in str(err.value)


def test_a_mixed_tasks_reward_keeps_no_score_passes_token_ids_and_reports_a_failing_source():
    from tasks.mixed import MixedTasks, source_reward

    task = MixedTasks()
    seen = {}

    def by_length(prompts, completions, completion_ids, **_):
        seen["ids"] = completion_ids
        return [None if len(ids) == 0 else 1.0 for ids in completion_ids]

    task.sources["gcd"].reward_funcs, task.sources["gcd"].reward_weights = [by_length], None
    reward = source_reward(task.sources)
    rows = [task.rows("test", 3, 0)[i] for i in range(3)]
    sources = [r["source"] for r in rows]
    assert sorted(sources) == ["arithmetic", "counting", "gcd"]
    gcd = sources.index("gcd")
    ids = [[1, 2], [], [3]]
    ids[gcd] = []
    values = reward([task.prompt(r) for r in rows], ["7"] * 3, sources, [r["row"] for r in rows], completion_ids=ids)
    assert values[gcd] is None and seen["ids"] == [[]]  # its own ids, and no score is not a 0
    assert all(isinstance(v, float) for i, v in enumerate(values) if i != gcd)

    def broken(**_):
        raise KeyError("answer")

    task.sources["gcd"].reward_funcs = [broken]
    with pytest.raises(RuntimeError, match="gcd/broken raised KeyError"):
        reward([task.prompt(r) for r in rows], ["7"] * 3, sources, [r["row"] for r in rows], completion_ids=ids)


def test_a_run_resumes_only_with_the_policy_arguments_it_started_with(tmp_path):
    from svf_rl.loop.train import TrainingError, check_resumable

    config = load_config(None, ["policy=hydralora", "policy_args.experts=3"])
    previous = {"base_model": config.model, "targets": config.targets, "task": "arithmetic",
                "task_args": config.task_args, "policy": "hydralora", "policy_args": {"experts": 4}}
    with pytest.raises(TrainingError, match="policy_args={'experts': 4}"):
        check_resumable(previous, config, "arithmetic", tmp_path)
    check_resumable({**previous, "policy_args": {"experts": 3}}, config, "arithmetic", tmp_path)
