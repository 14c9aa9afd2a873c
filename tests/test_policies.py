"""Every policy trains through the same loop: its parameters move, π_ref is the base model, its artefact loads
where people use it, and a resumed run continues as an unbroken one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svf_rl.config import ConfigError
from svf_rl.loop.train import train
from svf_rl.policies import make_policy
from svf_rl.policies.base import linear_map
from svf_rl.policies.peft import DEFAULT_LR
from svf_rl.run_files import read_metrics
from tests.conftest import tiny_llama
from tests.test_train import tiny_config

PEFT_POLICIES = ["lora", "dora", "loraplus", "lorafa", "vera", "adalora", "tinylora", "ia3", "delta_lora",
                 "lora_drop"]
SMALL = {"lora": {"rank": 4}, "dora": {"rank": 4}, "loraplus": {"rank": 4}, "lorafa": {"rank": 4},
         "vera": {"rank": 8}, "adalora": {"init_rank": 4, "target_rank": 2}, "tinylora": {"u": 4},
         "ia3": {}, "delta_lora": {"rank": 4}, "lora_drop": {"rank": 4}}


@pytest.fixture(scope="module")
def probe_adapter(tmp_path_factory):
    """A LoRA adapter on tiny_llama with every target moved, as a short LoRA run leaves one."""
    model, policy = attached("lora")
    perturb(policy)
    path = tmp_path_factory.mktemp("probe") / "adapter"
    return str(policy.save(path, {"model": "tiny", "fingerprint": "-", "task": "t", "config": {}}, {}))


def attached(name, targets="all", seed=0, probe=None):
    from svf_rl.config import load_config

    model = tiny_llama(seed=seed)
    extra = [f"policy_args.probe={probe}"] if probe else []
    config = load_config(None, [f"policy={name}", f"targets={targets}", "progress=false"] + extra +
                         [f"policy_args.{k}={v}" for k, v in SMALL[name].items()])
    policy = make_policy(config)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    policy.attach(model, prompts)
    return model, policy


def perturb(policy, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("name", PEFT_POLICIES)
def test_reference_is_the_base_model_and_the_engine_weight_is_what_the_layer_computes(name, request):
    base = tiny_llama()
    probe = request.getfixturevalue("probe_adapter") if name == "lora_drop" else None
    model, policy = attached(name, probe=probe)
    ids = torch.tensor([[3, 9, 27, 11, 5, 17]])
    perturb(policy)
    with torch.no_grad():
        adapted = model(ids).logits
        with policy.reference():
            reference = model(ids).logits
        want = base(ids).logits
    assert torch.allclose(reference, want, atol=1e-6), "π_ref must be the base model"
    assert (adapted - want).abs().max() > 1e-4, "the perturbed adapter must change the model"
    # The weights an engine loads by name are the adapted layers' own maps: a plain model with them computes
    # what the adapted model computes.
    plain = tiny_llama()
    names = dict(policy.engine_weights())
    assert names and set(names) <= {f"{n}.weight" for n, _ in plain.named_modules()}
    with torch.no_grad():
        for name_, weight in names.items():
            plain.get_submodule(name_.removesuffix(".weight")).weight.copy_(weight)
        assert torch.allclose(plain(ids).logits, adapted, atol=1e-5)


def test_linear_map_reads_a_biased_layer_exactly():
    layer = torch.nn.Linear(5, 3)
    assert torch.equal(linear_map(layer, chunk=2), layer.weight.detach())


@pytest.mark.parametrize("name", ["lora", "tinylora", "vera", "ia3"])
def test_only_the_policys_parameters_train(name):
    model, policy = attached(name)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in policy.parameters()} and trainable
    sizes = sum(p.numel() for p in policy.parameters())
    assert sizes < sum(p.numel() for p in model.parameters()) / 5


def test_tinylora_trains_a_handful_of_numbers():
    _, policy = attached("tinylora")
    assert sum(p.numel() for p in policy.parameters()) == 4 * 14  # u per matrix, 7 matrices in 2 layers


@pytest.mark.parametrize("bad, message", [
    (["policy=lora", "policy_args.rank=0"], "rank must be at least 1"),
    (["policy=lora", "policy_args.rnak=4"], "policy 'lora' has no argument 'rnak'; its arguments: rank=16"),
    (["policy=lora", "policy_args.rank=four"], "policy_args.rank of policy 'lora' must be int"),
    (["policy=lora", "weight_cache=none"], "config key 'weight_cache' is SVF's; policy 'lora' has no weight_cache"),
    (["policy=lora", "forward_strategy=compose"], "'forward_strategy' is SVF's"),
    (["policy=lora", "policy_args.init=pissa", "kl_coef=0.1"], "init=pissa moves the principal components"),
    (["policy=lorafa", "optimizer=sgd"], "lorafa is its own AdamW"),
    (["policy=adalora", "steps=4", "policy_args.tinit=2", "policy_args.tfinal=2"], "tinit \\+ tfinal < steps=4"),
    (["policy=svf", "policy_args.rank=4"], "policy 'svf' has no argument 'rank'"),
    (["policy=lorra"], "config key 'policy' must be one of"),
    (["policy=lora_drop", "policy_args.keep=1.5"], "keep must be in"),
])
def test_bad_policy_settings_fail_in_one_line_before_anything_loads(bad, message):
    from svf_rl.config import load_config

    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, bad)
    assert "\n" not in str(err.value)


def test_each_policy_has_its_own_default_learning_rate():
    from svf_rl.config import load_config

    assert load_config(None, []).lr == 2e-3  # svf's, chosen for the embedded default
    assert load_config(None, ["policy=lora"]).lr == DEFAULT_LR["lora"]
    assert load_config(None, ["policy=lora", "lr=1e-3"]).lr == 1e-3


@pytest.mark.parametrize("name", PEFT_POLICIES)
def test_a_peft_policy_trains_and_writes_an_adapter_that_peft_loads_alone(name, tiny_model_dir, tmp_path, request):
    args = {**SMALL[name], **({"probe": request.getfixturevalue("probe_adapter")} if name == "lora_drop" else {})}
    config = tiny_config(tiny_model_dir, tmp_path, policy=name, lr=0.05,
                         **{f"policy_args.{k}": v for k, v in args.items()})
    adapter = train(config)
    assert adapter == Path(config.output_dir) / "adapter" and (adapter / "adapter_config.json").is_file()
    steps = [r for r in read_metrics(Path(config.output_dir) / "metrics.jsonl") if "reward" in r]
    assert len(steps) == 3 and steps[-1]["param_shift"] > 1e-4
    assert all(r["sampler_logp_gap"] < 1e-4 for r in steps)  # HF rollouts: the trainer's own policy
    record = json.loads((adapter / "svf_rl.json").read_text())
    assert record["policy"] == name and "test_accuracy" in record["scores"]
    # PEFT alone (svf_rl cannot be imported) loads it onto the base model, and it computes what the trainer did.
    script = f"""
import sys; sys.modules["svf_rl"] = None
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({tiny_model_dir!r}), {str(adapter)!r}).eval()
with torch.no_grad():
    print(model(torch.tensor([[3, 9, 27, 11]])).logits.sum().item())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(torch.tensor([[3, 9, 27, 11]])).logits.sum()
    assert float(out.stdout.split()[-1]) == pytest.approx(ours(torch.tensor([[3, 9, 27, 11]])).logits.sum().item(),
                                                          rel=1e-5)
    assert abs(float(out.stdout.split()[-1]) - plain.item()) > 1e-6  # the adapter is not a no-op


def test_eval_scores_an_adapter_and_merge_bakes_it_into_a_plain_model(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from svf_rl.cli import main

    config = tiny_config(tiny_model_dir, tmp_path, policy="lora", lr=0.05, **{"policy_args.rank": 4})
    adapter = train(config)
    result_file = tmp_path / "eval.json"
    assert main(["eval", str(adapter), "--size", "4", "--max-new-tokens", "4", "--output", str(result_file)]) == 0
    result = json.loads(result_file.read_text())
    assert result["task"] == "yes" and result["n"] == 4
    record = json.loads((adapter / "svf_rl.json").read_text())
    assert result["accuracy"] == pytest.approx(record["scores"]["test_accuracy"], rel=1e-6)  # training's scoring

    merged = tmp_path / "merged"
    assert main(["merge", str(adapter), str(merged)]) == 0
    ids = torch.tensor([[3, 9, 27, 11]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))(ids)
    assert torch.allclose(plain, adapted.logits, atol=1e-5)
    assert main(["merge", str(adapter), str(merged)]) == 2  # never over an existing output
    assert main(["eval", str(adapter), str(adapter), "--size", "4"]) == 2  # adapters are not composed


def test_a_resumed_lora_run_continues_as_an_unbroken_one(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from tests.same_z import EQUALITY

    def run(path, steps, resume=True):
        return train(tiny_config(tiny_model_dir, path, policy="lora", steps=steps, save_every=2, eval_every=2,
                                 resume=resume, **EQUALITY, **{"lr": 2.0, "policy_args.rank": 4}))

    whole = load_file(run(tmp_path / "whole", 4) / "adapter_model.safetensors")
    run(tmp_path / "split", 2)
    resumed = load_file(run(tmp_path / "split", 4) / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.allclose(whole[key], resumed[key], rtol=0, atol=1e-6), key
    from svf_rl.cli import main

    assert main(["export", str(tmp_path / "split" / "run"), str(tmp_path / "z.safetensors")]) == 2  # not z
    assert not (tmp_path / "z.safetensors").exists()


def test_a_pissa_adapter_is_saved_converted_so_that_peft_loads_it_onto_the_base_weights(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from svf_rl.svd import model_fingerprint

    config = tiny_config(tiny_model_dir, tmp_path, policy="lora", lr=0.05, kl_coef=0.0,
                         **{"policy_args.rank": 4, "policy_args.init": "pissa"})
    adapter = train(config)
    ids = torch.tensor([[3, 9, 27, 11]])
    trainer = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fingerprint = model_fingerprint(trainer)
    policy = make_policy(config)
    policy.attach(trainer)  # W_res = W − BA at the start, as training had it
    policy.load(adapter, fingerprint)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    with torch.no_grad():
        want, got = trainer(ids).logits, loaded(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert (got - base).abs().max() > 1e-4


def test_adaloras_orthogonality_penalty_is_pefts_own_in_value_and_gradient():
    model, policy = attached("adalora")
    perturb(policy)
    ids = torch.tensor([[3, 9, 27, 11, 5]])
    params = policy.parameters()

    def peft_loss(weight):
        policy.peft.peft_config["default"].orth_reg_weight = weight
        return policy.peft(input_ids=ids, labels=ids).loss

    with_penalty, without = peft_loss(0.5), peft_loss(0.0)
    want = torch.autograd.grad(with_penalty - without, params, allow_unused=True)
    ours = policy.regulariser()
    got = torch.autograd.grad(ours, params, allow_unused=True)
    assert ours.item() == pytest.approx((with_penalty - without).item(), rel=1e-5)
    for p, g, w in zip(params, got, want, strict=True):  # unused: None (the LM loss cancels to 0 in PEFT's)
        assert torch.allclose(torch.zeros_like(p) if g is None else g, torch.zeros_like(p) if w is None else w,
                              atol=1e-6)


def test_bad_adapter_inputs_fail_in_one_line_before_a_model_loads(tmp_path, capsys):
    from svf_rl.cli import main

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    assert main(["eval", str(broken), "--task", "arithmetic"]) == 2
    assert "has no adapter_model.safetensors" in capsys.readouterr().err
    (broken / "adapter_model.safetensors").write_bytes(b"")
    (broken / "adapter_config.json").write_text("{not json")
    assert main(["merge", str(broken), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json is not JSON" in err and len(err.strip().splitlines()) == 1
    (broken / "adapter_config.json").write_text("{}")
    assert main(["merge", str(broken), str(tmp_path / "out")]) == 2
    assert "records no base model; give --model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", [n for n in PEFT_POLICIES if n != "lora_drop"])
def test_a_servers_worker_builds_the_trainers_weights_from_the_adapter_state_alone(name, tmp_path, monkeypatch):
    import types

    from svf_rl.engines.vllm_engine import VLLMServerEngine
    from tests.test_fingerprint import FakeClient, FakeWorker

    monkeypatch.setenv("SVF_RL_CACHE", str(tmp_path / "cache"))
    tiny_llama().save_pretrained(tmp_path / "served")
    model, policy = attached(name)
    worker = FakeWorker(tmp_path / "served", dtype=torch.float32)  # the extension in this process
    pushed = []
    worker.extension.reload_weights = lambda weights_iterator, is_checkpoint_format: pushed.append(
        dict(weights_iterator))
    monkeypatch.setitem(sys.modules, "trl.generation.vllm_client", types.SimpleNamespace(VLLMClient=FakeClient))
    monkeypatch.setattr(VLLMServerEngine, "_rpc", worker.rpc)
    engine = VLLMServerEngine(model, None, policy, ["http://server:8000"])
    perturb(policy)
    sent = policy.server_update()  # what the next push sends: the trained tensors, not the frozen ones
    assert set(sent) and all(any(t in k for t in ("lora", "vera_lambda", "tinylora_v", "ia3")) for k in sent)
    policy.served = {k: v for k, v in policy.served.items() if k not in sent}  # as before the perturbation
    engine.update_weights()
    ours = dict(policy.engine_weights())
    assert pushed[-1].keys() == ours.keys()
    for key, weight in ours.items():
        assert torch.allclose(pushed[-1][key], weight, atol=1e-6), key
