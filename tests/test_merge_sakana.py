"""Experts outside svf-rl: merged into a plain model, and imported from Sakana's Transformer² files."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from svf_rl.cli import main
from svf_rl.inference.compose import compose, z_digest
from svf_rl.inference.evaluate import model_with_experts
from svf_rl.inference.expert import SIGMOID_RESCALED, ExpertError, describe_expert, load_expert, save_expert
from svf_rl.inference.merge import merge_expert
from svf_rl.inference.sakana import import_policy_params
from svf_rl.policies.svf_layer import load_z, svf_layers
from svf_rl.svd import model_fingerprint
from svf_rl.targets import find_targets
from tests.test_compose_eval import random_expert

PLAIN_LOAD = """
import sys, torch
sys.modules["svf_rl"] = None  # any import of svf-rl fails: the directory must stand on its own
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
print(model.dtype)
"""


def error_lines(err: str) -> list[str]:
    """The command's own error lines (model loading draws progress bars on stderr too)."""
    return [line for line in err.splitlines() if line.startswith("svf-rl ")]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_a_merged_model_loads_without_svf_rl_and_gives_the_svf_models_logits(tiny_model_dir, tmp_path):
    expert = random_expert(tiny_model_dir, 0, task="math", spread=0.5)
    path = save_expert(expert, tmp_path / "math.safetensors")
    out = merge_expert(path, tmp_path / "merged")
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    run = subprocess.run([sys.executable, "-I", "-c", PLAIN_LOAD, str(out), str(tmp_path / "ids.pt"),
                          str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    plain = torch.load(tmp_path / "logits.pt")
    svf_model, _, _ = model_with_experts(tiny_model_dir, [expert])
    gap = (plain - logits(svf_model, ids)).abs().max().item()
    assert gap < 1e-3, f"merged and SVF logits differ by {gap}"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert (plain - logits(base, ids)).abs().max().item() > 1e-2  # the expert is in the weights

    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config  # a stock architecture, no remote code
    assert config["svf_expert"]["z_sha256"] == z_digest(expert) and config["svf_expert"]["task"] == "math"
    with safe_open(out / "model.safetensors", "pt") as merged, \
            safe_open(f"{tiny_model_dir}/model.safetensors", "pt") as original:
        assert set(merged.keys()) == set(original.keys())
        assert {merged.get_tensor(k).dtype for k in merged.keys()} == {torch.float32}
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()


def test_a_bf16_base_is_merged_in_bf16_with_w_rounded_once(tiny_model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    base.save_pretrained(tmp_path / "bf16")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "bf16")
    expert = random_expert(str(tmp_path / "bf16"), 1, spread=0.3)
    out = merge_expert(save_expert(expert, tmp_path / "e.safetensors"), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    name = find_targets(base, "mlp")[0]
    W = base.get_submodule(name).weight.double()
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    d = s * (expert.vectors[name].double() - 1)
    exact = W + (U * d) @ Vh
    got = merged.get_submodule(name).weight
    # W' = W + ΔW rounded once to bf16 (2⁻⁹ of |W'|, doubled for slack), where ΔW comes from factors held in bf16
    # (each rounded by 2⁻⁹): at most about 2⁻⁸ of Σₖ |Uᵢₖ dₖ Vₖⱼ| per element.
    spread = (U.abs() * d.abs()) @ Vh.abs()
    assert ((got.double() - exact).abs() <= 2 ** -8 * exact.abs() + 2 ** -7 * spread + 1e-6).all()
    at_one = merge_expert(save_expert(random_expert(str(tmp_path / "bf16"), 1, spread=0.0),
                                      tmp_path / "one.safetensors"), tmp_path / "at_one")
    unchanged = AutoModelForCausalLM.from_pretrained(at_one).get_submodule(name).weight
    assert torch.equal(unchanged, base.get_submodule(name).weight)  # z = 1: W, bit for bit


def test_in_bf16_merge_eval_and_adapt_compose_the_same_weights_and_z1_is_the_base(sharp_model_dir, tmp_path):
    tiny_model_dir = sharp_model_dir  # logits that a change of the last bits can flip
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    base.save_pretrained(tmp_path / "bf16")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "bf16")
    expert = random_expert(str(tmp_path / "bf16"), 2, spread=0.1)
    merged = AutoModelForCausalLM.from_pretrained(
        merge_expert(save_expert(expert, tmp_path / "e.safetensors"), tmp_path / "merged")).eval()
    svf_model, _, _ = model_with_experts(str(tmp_path / "bf16"), [expert], dtype="bfloat16")
    ids = torch.randint(0, 1000, (4, 48), generator=torch.Generator().manual_seed(0))
    layers = svf_layers(svf_model)
    differing = sum(int((merged.get_submodule(n).weight != layer.weight_for_inference()).sum())
                    for n, layer in layers.items()) / sum(layer.base.numel() for layer in layers.values())
    agree = (logits(merged, ids).argmax(-1) == logits(svf_model, ids).argmax(-1)).float().mean().item()
    # From bf16 factors alone (no W kept), as eval composed before:
    for layer in layers.values():
        layer.base, layer._policy_weight, layer._policy_z = None, None, None
    before = (logits(merged, ids).argmax(-1) == logits(svf_model, ids).argmax(-1)).float().mean().item()
    print(f"bf16: {100 * differing:.3f}% of weights and {100 * (1 - agree):.2f}% of argmax tokens differ "
          f"(bf16 factors alone: {100 * (1 - before):.2f}%)")
    assert differing == 0 and agree == 1.0 and before < agree
    with_base, _, _ = model_with_experts(str(tmp_path / "bf16"), [], dtype="bfloat16")
    ones = {n: torch.ones_like(layer.z) for n, layer in layers.items()}
    at_one, _, _ = model_with_experts(str(tmp_path / "bf16"), [expert], dtype="bfloat16")
    load_z(at_one, ones)
    assert torch.equal(logits(at_one, ids), logits(with_base, ids))  # z = 1 is the base model, bit for bit


def test_merge_refuses_bad_input_before_loading_anything(tiny_model_dir, tmp_path, capsys):
    expert = random_expert(tiny_model_dir, 0)
    path = save_expert(expert, tmp_path / "e.safetensors")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["merge", str(path), str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    expert.base_fingerprint = "0" * 32
    other = save_expert(expert, tmp_path / "other.safetensors")
    assert main(["merge", str(other), str(tmp_path / "new"), "--model", tiny_model_dir]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "fingerprint" in error_lines(err)[0] and not (tmp_path / "new").exists()


def sakana_file(model, path, seed=0):
    """A policy_params.pt as their code writes it: bf16 p ≈ 0.1 + σ·randn per MLP matrix, in HF order."""
    generator = torch.Generator().manual_seed(seed)
    names = find_targets(model, "mlp")
    state = {f"learnable_params_module_list.{i}":
             (0.1 + 2.0 * torch.randn(min(model.get_submodule(n).weight.shape), generator=generator)).bfloat16()
             for i, n in enumerate(names)}
    torch.save(state, path)
    return state, names


def sakana_weights(model, state, names, max_mult=1.0):
    """Their W' = U diag(s ⊙ m) Vᵀ · Σs / Σ(s ⊙ m) with m = σ(p)·max_mult, in fp64 into a copy of the base model."""
    with torch.no_grad():
        for i, name in enumerate(names):
            weight = model.get_submodule(name).weight
            U, s, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
            m = torch.sigmoid(state[f"learnable_params_module_list.{i}"].double()) * max_mult
            weight.copy_((U * (s * m)) @ Vh * (s.sum() / (s * m).sum()))
    return model


def test_a_sakana_expert_reproduces_their_weights_exactly(tiny_model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    state, names = sakana_file(base, tmp_path / "policy_params.pt")
    expert = import_policy_params(tmp_path / "policy_params.pt", base, tiny_model_dir, "math")
    assert expert.parametrisation == SIGMOID_RESCALED and list(expert.vectors) == names
    for i, name in enumerate(names):  # bf16 → fp32 is exact: the file's p, bit for bit
        assert torch.equal(expert.vectors[name], state[f"learnable_params_module_list.{i}"].float())
    stored = load_expert(save_expert(expert, tmp_path / "sakana.safetensors"))
    assert stored.parametrisation == SIGMOID_RESCALED and "σ(p)" in describe_expert(stored)

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    theirs = logits(sakana_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), state, names), ids)
    ours, _, _ = model_with_experts(tiny_model_dir, [stored])
    assert (logits(ours, ids) - theirs).abs().max().item() < 1e-4
    assert (logits(base, ids) - theirs).abs().max().item() > 1e-2  # the test would see a wrong W'
    for max_mult in (0.5, 2.0):  # their scale's max_mult cancels in the rescaling: the file's p alone gives W'
        scaled = sakana_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), state, names, max_mult)
        assert (logits(ours, ids) - logits(scaled, ids)).abs().max().item() < 1e-4
    as_z = import_policy_params(tmp_path / "policy_params.pt", base, tiny_model_dir, as_z=True)
    merged = merge_expert(save_expert(as_z, tmp_path / "z.safetensors"), tmp_path / "merged")
    assert (logits(AutoModelForCausalLM.from_pretrained(merged).eval(), ids) - theirs).abs().max().item() < 1e-4
    # Their mixing sums raw p; ours mixes the z they stand for, which needs the model: refused without it.
    with pytest.raises(ExpertError, match="singular values"):
        compose([stored, stored], [0.5, 0.5])
    mixed, _, _ = model_with_experts(tiny_model_dir, [stored, as_z], alpha=[0.5, 0.5])
    assert (logits(mixed, ids) - theirs).abs().max().item() < 1e-4  # two views of one expert mix to itself


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("learnable_params_module_list.1"), "without gaps"),
    (lambda s: s.update({"learnable_params_module_list.0": torch.zeros(3)}), "singular values"),
    (lambda s: s.update({"model.layers.0.mlp": torch.zeros(3)}), "is not learnable_params_module_list"),
    (lambda s: s.update({f"learnable_params_module_list.{len(s)}": torch.zeros(4)}), "MLP matrices"),
    (lambda s: s.update({"learnable_params_module_list.0": torch.full((32,), float("nan"))}), "non-finite"),
])
def test_files_in_another_layout_are_refused_in_one_line(tiny_model_dir, tmp_path, capsys, damage, message):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    state, _ = sakana_file(base, tmp_path / "p.pt")
    damage(state)
    torch.save(state, tmp_path / "p.pt")
    code = main(["import-sakana", str(tmp_path / "p.pt"), "--model", tiny_model_dir, "-o", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and message in error_lines(err)[0]
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    assert main(["import-sakana", str(tmp_path / "junk.pt"), "--model", tiny_model_dir, "-o", "x"]) == 2
    assert "not a torch state dict" in capsys.readouterr().err


def test_import_command_writes_an_expert_for_that_base(tiny_model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sakana_file(base, tmp_path / "policy_params.pt")
    assert main(["import-sakana", str(tmp_path / "policy_params.pt"), "--model", tiny_model_dir, "--task",
                 "arithmetic", "--task-args", '{"digits": 2}', "-o", str(tmp_path / "arith.safetensors")]) == 0
    expert = load_expert(tmp_path / "arith.safetensors")
    assert expert.base_fingerprint == model_fingerprint(base) and expert.task == "arithmetic"
    assert expert.targets == "mlp"
    # recorded as training records it, so eval and adapt find its problems
    assert expert.config["task"] == "arithmetic" and expert.config["task_args"] == {"digits": 2}
