"""Two CPU processes (gloo) train the same z as one process with the same global batch and seed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from svf_rl.expert import load_expert
from svf_rl.export import export_checkpoint
from svf_rl.train import train
from tests.test_train import tiny_config

SHARED = dict(steps=2, prompts_per_step=4, generations_per_prompt=2, seeded_rollouts=True, save_every=2,
              eval_every=2, baseline="mean", kl_coef=0.05, kl_estimator="k3")


def final_z(run: Path) -> dict:
    return load_expert(export_checkpoint(str(run), str(run / "final.safetensors"))).vectors


def test_two_process_ddp_matches_one_process(tiny_model_dir, tmp_path):
    single = tiny_config(tiny_model_dir, tmp_path / "single", **SHARED)
    train(single)
    double = tiny_config(tiny_model_dir, tmp_path / "double", **SHARED)
    overrides = [f"{k}={v}" for k, v in vars(double).items() if k not in ("task_args", "log_with", "reward_weights")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
         "-m", "svf_rl", "train", *overrides, "log_with=[]"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line) for line in (Path(double.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [s["z_rank_spread"] for s in steps if "reward" in s] == [0.0, 0.0]  # z identical on both ranks
    single_z, double_z = final_z(Path(single.output_dir)), final_z(Path(double.output_dir))
    assert max((single_z[k] - 1).abs().max().item() for k in single_z) > 1e-3  # it trained
    for name in single_z:
        torch.testing.assert_close(double_z[name], single_z[name], rtol=0, atol=1e-5)
