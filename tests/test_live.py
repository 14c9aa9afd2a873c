"""Experts on a live model (svf_rl.from_pretrained): load, switch, mix, a temporary expert, unload."""

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import svf_rl
from svf_rl.inference.compose import compose
from svf_rl.inference.expert import ExpertError, save_expert
from svf_rl.targets import find_targets
from tests.test_compose_eval import random_expert

DOC = Path(__file__).parents[1] / "docs" / "experts.md"


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def two_experts(tiny_model_dir, tmp_path):
    a = save_expert(random_expert(tiny_model_dir, 0, "arith", spread=0.3), tmp_path / "arith" / "expert.safetensors")
    b = save_expert(random_expert(tiny_model_dir, 1, "gcd", spread=0.3), tmp_path / "gcd.safetensors")
    return a, b


def test_load_switch_mix_scope_and_unload_give_the_models_each_promises(tiny_model_dir, two_experts):
    a, b = two_experts
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base_logits = logits(plain, ids)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    svf = svf_rl.from_pretrained(model, a)
    assert svf.active == "arith" and svf.load_expert(b) == "gcd"
    with_a = logits(model, ids)
    assert (with_a - base_logits).abs().max() > 1e-2  # the expert changes the model
    svf.set_expert("gcd")
    with_b = logits(model, ids)
    with svf.expert("arith"):
        torch.testing.assert_close(logits(model, ids), with_a, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids), with_b, rtol=0, atol=0)  # back to what was active
    with svf.expert(None):
        torch.testing.assert_close(logits(model, ids), base_logits, rtol=0, atol=0)  # z = 1: the base, bit for bit
    svf.mix({"arith": 0.5, "gcd": 0.5}, mixing="sum")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    mixed = compose([random_expert(tiny_model_dir, 0, spread=0.3), random_expert(tiny_model_dir, 1, spread=0.3)],
                    [0.5, 0.5])
    svf_rl.from_pretrained(reference, mixed)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=1e-5)
    svf.mix({"arith": 0.0})  # anchored: no weight is the base model
    torch.testing.assert_close(logits(model, ids), base_logits, rtol=0, atol=0)
    with pytest.raises(ExpertError, match="no expert named 'math'"):
        svf.set_expert("math")
    with pytest.raises(ExpertError, match="loaded already"):
        svf.load_expert(b)
    svf.set_expert("gcd")
    svf.delete_expert("gcd")
    assert list(svf.experts) == ["arith"] and svf.active is None
    back = svf.unload()
    names = find_targets(plain, "mlp")
    assert all(type(back.get_submodule(n)) is torch.nn.Linear for n in names)
    assert all(torch.equal(back.get_submodule(n).weight, plain.get_submodule(n).weight) for n in names)
    torch.testing.assert_close(logits(back, ids), base_logits, rtol=0, atol=0)


def test_an_expert_of_another_base_is_refused_in_one_line(tiny_model_dir, two_experts):
    expert = random_expert(tiny_model_dir, 0)
    expert.base_fingerprint = "0" * 32
    with pytest.raises(ExpertError, match="fingerprint"):
        svf_rl.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), expert)


def test_the_documented_example_runs(tiny_model_dir, two_experts):
    block = re.search(r"<!-- example: library API -->\n```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    namespace = {"BASE": tiny_model_dir, "ARITH": str(two_experts[0]), "GCD": str(two_experts[1])}
    exec(compile(block, str(DOC), "exec"), namespace)
    assert isinstance(namespace["model"], torch.nn.Module) and namespace["answers"]
