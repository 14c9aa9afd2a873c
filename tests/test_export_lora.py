"""An expert as a PEFT LoRA adapter: the exact truncation of U diag(s ⊙ (z − 1)) Vᵀ, and what PEFT loads from it."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from svf_rl.cli import main
from svf_rl.inference.evaluate import model_with_experts
from svf_rl.inference.expert import save_expert
from svf_rl.inference.export_lora import REPORT, lora_factors
from tests.test_compose_eval import random_expert


@pytest.mark.parametrize("rank", [1, 3, 6, 9])
def test_the_factors_are_the_best_rank_k_approximation_of_the_change(rank):
    generator = torch.Generator().manual_seed(rank)
    U, s, Vh = torch.linalg.svd(torch.randn(8, 6, generator=generator, dtype=torch.float64), full_matrices=False)
    z = 1 + 0.3 * torch.randn(6, generator=generator, dtype=torch.float64)
    A, B, kept = lora_factors(U, s, Vh, z, rank)
    change = (U * (s * (z - 1))) @ Vh
    assert A.shape == (rank, 6) and B.shape == (8, rank)
    d = torch.linalg.svdvals(change)  # Eckart–Young: the least error of any rank-k matrix
    best = d[rank:].square().sum().sqrt().item()
    assert math.isclose(torch.linalg.norm(change - (B @ A).double()).item(), best, rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(kept, (d[:rank].square().sum() / d.square().sum()).sqrt().item(), rel_tol=1e-5)
    assert lora_factors(U, s, Vh, torch.ones(6, dtype=torch.float64), rank)[2] == 1.0  # z = 1: nothing to keep


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_a_full_rank_adapter_gives_the_svf_models_logits_and_records_what_it_kept(tiny_model_dir, tmp_path,
                                                                                   capsys):
    from peft import PeftModel

    expert = random_expert(tiny_model_dir, 0, spread=0.3)
    expert.config = {"task": "arithmetic", "task_args": {}, "max_new_tokens": 4}
    path = save_expert(expert, tmp_path / "e.safetensors")
    full = max(v.numel() for v in expert.vectors.values())
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    svf_model, _, _ = model_with_experts(tiny_model_dir, [expert])
    gaps = {}
    for rank in (full, 4):
        out = tmp_path / f"rank{rank}"
        assert main(["export-lora", str(path), str(out), "--rank", str(rank)]) == 0
        assert "keep" in capsys.readouterr().out
        report = json.loads((out / REPORT).read_text())
        assert report["rank"] == rank and set(report["kept"]) == set(expert.vectors)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == config["lora_alpha"] == rank
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), str(out))
        gaps[rank] = ((logits(adapted, ids) - logits(svf_model, ids)).abs().max().item(), report["kept_min"])
    assert gaps[full][0] < 1e-3 and gaps[full][1] > 1 - 1e-6  # full rank: the expert itself
    assert gaps[4][1] < 1 and gaps[4][0] > gaps[full][0]  # truncated: some of ΔW is lost, and it shows
    record = json.loads((tmp_path / "rank4" / "svf_rl.json").read_text())
    assert record["task"] == "arithmetic" and record["exported_from"]["rank"] == 4
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for argv, message in ((["--rank", "0"], "--rank"), ([str(tmp_path / "full"), "--rank", "2"], "not empty")):
        target = [] if argv[0].startswith("-") else argv[:1]
        code = main(["export-lora", str(path), *(target or [str(tmp_path / "new")]), *argv[len(target):]])
        assert code == 2 and message in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (tmp_path / "new").exists()
