"""Two CPU processes (gloo) train the same z as one process with the same global batch and seed.

Each backend is launched with the accelerate config shipped in launch/accelerate/, as a user would.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svf_rl.inference.expert import load_expert
from svf_rl.inference.export import export_checkpoint
from svf_rl.loop.train import train
from tests.same_z import EQUALITY, assert_same_z
from tests.test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = dict(prompts_per_step=4, generations_per_prompt=2, seeded_rollouts=True, micro_batch_size=2,
              baseline="mean", kl_coef=0.05, kl_estimator="k3")
COMPARED = dict(SHARED, **EQUALITY, lr=10.0)  # SGD: z's difference is bounded by the gradients' (tests/same_z.py)
BACKENDS = {  # accelerate config, extra environment
    "ddp": ("ddp.yaml", {"ACCELERATE_USE_CPU": "1"}),  # MULTI_GPU without a GPU: gloo DDP
    "zero2": ("zero2.yaml", {}),
    "zero3": ("zero3.yaml", {}),
}


@pytest.fixture(scope="module")
def single_run(tiny_model_dir, tmp_path_factory) -> Path:
    """The reference: one process, 3 steps, a checkpoint after every step."""
    config = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("single"), steps=3, save_every=1, eval_every=3,
                         **COMPARED)
    train(config)
    return Path(config.output_dir)


def z_at(run: Path, step: int) -> dict:
    checkpoint = run / "checkpoints" / f"step_{step:06d}"
    return load_expert(export_checkpoint(str(checkpoint), str(run / f"z_{step}.safetensors"))).vectors


def step_metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "reward" in record]


def launch(backend: str, config, port: int, flags: tuple = (), env_extra: dict | None = None,
           check: bool = True) -> str:
    """Run `accelerate launch` with 2 processes; return what they printed."""
    config_file, extra_env = BACKENDS[backend]
    extra_env = {**extra_env, **(env_extra or {})}
    overrides = [f"{k}={v}" for k, v in vars(config).items() if k not in ("task_args", "log_with", "reward_weights")]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", **extra_env)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch",
         "--config_file", str(ROOT / "launch" / "accelerate" / config_file), "--num_processes", "2", *flags,
         "--main_process_port", str(port), "-m", "svf_rl", "train", *overrides, "log_with=[]"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert (result.returncode == 0) == check, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_processes_match_one_process(backend, single_run, tiny_model_dir, tmp_path):
    port = 29517 + list(BACKENDS).index(backend)
    config = tiny_config(tiny_model_dir, tmp_path / backend, steps=2, save_every=2, eval_every=2, **COMPARED)
    output = launch(backend, config, port)
    run = Path(config.output_dir)
    steps, reference = step_metrics(run), step_metrics(single_run)
    assert [s["param_rank_spread"] for s in steps] == [0.0, 0.0]  # z identical on both ranks after every step
    for got, want in zip(steps, reference[:2], strict=False):  # a wrongly scaled gradient shows in its norm
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    assert_same_z(z_at(run, 2), z_at(single_run, 2), reference[:2], config)
    if backend == "zero3":
        assert "each rank holds 50% of the model's parameters" in output  # the factors really are sharded
        # Resume the sharded run for one more step: it continues exactly where the single process went, which
        # needs the optimiser's momentum back too.
        resumed = tiny_config(tiny_model_dir, tmp_path / backend, steps=3, save_every=3, eval_every=3, **COMPARED)
        assert re.search(r"resumed from \S+step_000002 \(step 2\)", launch(backend, resumed, port))
        assert [s["step"] for s in step_metrics(run)] == [1, 2, 3]
        assert_same_z(z_at(run, 3), z_at(single_run, 3), reference[:3], config)


def test_zero3_with_gradient_checkpointing_and_a_chunked_head_matches_one_process(single_run, tiny_model_dir,
                                                                                   tmp_path):
    # Recomputing a layer re-gathers its sharded factors inside backward (non-reentrant checkpointing), and
    # each head chunk is its own gathered forward: neither may change the gradient.
    config = tiny_config(tiny_model_dir, tmp_path, steps=2, save_every=2, eval_every=2, gradient_checkpointing=True,
                         logit_chunk_tokens=3, **COMPARED)
    launch("zero3", config, 29533)
    reference = step_metrics(single_run)[:2]
    assert_same_z(z_at(Path(config.output_dir), 2), z_at(single_run, 2), reference, config)


@pytest.mark.parametrize("backend, schedule", [("ddp", "linear"), ("zero2", "cosine")])
def test_lr_schedule_steps_once_per_update_whatever_the_number_of_processes(backend, schedule, tiny_model_dir,
                                                                             tmp_path):
    from svf_rl.loop.update import lr_lambda

    settings = dict(SHARED, steps=5, warmup_steps=2, lr_schedule=schedule, eval_every=5, save_every=5,
                    max_new_tokens=2)
    single = tiny_config(tiny_model_dir, tmp_path / "single", **settings)
    train(single)
    double = tiny_config(tiny_model_dir, tmp_path / "double", **settings)
    launch(backend, double, 29531 + (backend == "zero2"))
    # "lr" is logged after each update: the rate the next step will use.
    want = [single.lr * lr_lambda(single)(step) for step in range(1, 6)]
    assert [s["lr"] for s in step_metrics(Path(single.output_dir))] == pytest.approx(want, rel=1e-12)
    assert [s["lr"] for s in step_metrics(Path(double.output_dir))] == pytest.approx(want, rel=1e-12)
    assert want[-1] < 0.2 * single.lr < want[0]  # it warmed up, then decayed


@pytest.mark.parametrize("flags, env, message", [
    (("--mixed_precision", "bf16"), {}, "DeepSpeed bf16 would store z in 16 bits"),
    ((), {"ACCELERATE_USE_CPU": "1"}, "launched with DeepSpeed, but accelerate chose MULTI_CPU"),
])
def test_deepspeed_launches_that_would_train_wrongly_stop_with_one_line(flags, env, message, tiny_model_dir,
                                                                         tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path, steps=1, **SHARED)
    output = launch("zero2", config, 29527, flags, env, check=False)
    assert f"svf-rl train: error: {message}" in output
    assert not (Path(config.output_dir) / "checkpoints").exists()


def test_zero3_trains_a_bf16_model_with_z_in_fp32(tiny_model_dir, tmp_path):
    """bf16 factors sharded by ZeRO-3 next to fp32 z: both ranks step together and z moves."""
    config = tiny_config(tiny_model_dir, tmp_path, steps=2, save_every=2, eval_every=2, dtype="bfloat16", **SHARED)
    launch("zero3", config, 29531)
    assert [s["param_rank_spread"] for s in step_metrics(Path(config.output_dir))] == [0.0, 0.0]
    z = z_at(Path(config.output_dir), 2)
    assert all(v.dtype == torch.float32 for v in z.values())
    assert max((v - 1).abs().max().item() for v in z.values()) > 1e-3


LORA = dict(COMPARED, policy="lora", lr=20.0, policy_args={"rank": 4})


def adapter_at(run: Path, step: int) -> dict:
    """The LoRA parameters a checkpoint holds."""
    state = torch.load(run / "checkpoints" / f"step_{step:06d}" / "custom_checkpoint_0.pkl", weights_only=True)
    return state["adapter"]


def from_zero_b(adapter: dict) -> dict:
    """Where the parameters that start at 0 began (LoRA's B), for the check that they moved."""
    return {k: torch.zeros_like(v) for k, v in adapter.items() if "lora_B" in k}


@pytest.fixture(scope="module")
def single_lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    config = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("single_lora"), steps=3, save_every=1,
                         eval_every=3, **LORA)
    train(config)
    return Path(config.output_dir)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_processes_train_the_same_lora_as_one_process(backend, single_lora_run, tiny_model_dir, tmp_path):
    port = 29551 + list(BACKENDS).index(backend)
    config = tiny_config(tiny_model_dir, tmp_path / backend, steps=2, save_every=2, eval_every=2, **LORA)
    launch(backend, config, port)
    run = Path(config.output_dir)
    steps, reference = step_metrics(run), step_metrics(single_lora_run)
    assert [s["param_rank_spread"] for s in steps] == [0.0, 0.0]
    for got, want in zip(steps, reference[:2], strict=False):
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    want = adapter_at(single_lora_run, 2)
    got = {k: v for k, v in adapter_at(run, 2).items() if k in want}
    assert_same_z(got, want, reference[:2], config, from_zero_b(want))
    if backend == "zero3":  # resumed from the sharded checkpoint, it goes on where the single process went
        resumed = tiny_config(tiny_model_dir, tmp_path / backend, steps=3, save_every=3, eval_every=3, **LORA)
        assert re.search(r"resumed from \S+step_000002 \(step 2\)", launch(backend, resumed, port))
        want = adapter_at(single_lora_run, 3)
        got = adapter_at(run, 3)
        assert_same_z(got, want, reference[:3], config, from_zero_b(want))


def test_dynamic_sampling_keeps_and_deals_the_same_groups_whatever_the_number_of_processes(tiny_model_dir, tmp_path):
    from tests.test_train import SPLIT_TASK

    (tmp_path / "split_task.py").write_text(SPLIT_TASK)
    settings = dict(COMPARED, task=f"{tmp_path / 'split_task.py'}:SplitTask", baseline="rloo", max_sampling_rounds=4,
                    train_size=16, steps=2, save_every=2, eval_every=2)
    single = tiny_config(tiny_model_dir, tmp_path / "single", **settings)
    train(single)
    double = tiny_config(tiny_model_dir, tmp_path / "double", **settings)
    launch("ddp", double, 29561)
    reference, steps = step_metrics(Path(single.output_dir)), step_metrics(Path(double.output_dir))
    assert all(s["sampling_rounds"] > 1 for s in reference)  # the even problems' groups were replaced
    for got, want in zip(steps, reference, strict=True):
        assert (got["sampling_rounds"], got["informative_groups"]) == (want["sampling_rounds"],
                                                                         want["informative_groups"])
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    assert_same_z(z_at(Path(double.output_dir), 2), z_at(Path(single.output_dir), 2), reference, double)


HYDRA = dict(COMPARED, policy="hydralora", targets="mlp", lr=20.0, policy_args={"experts": 2, "rank": 2})


def routed_at(run: Path, step: int) -> dict:
    state = torch.load(run / "checkpoints" / f"step_{step:06d}" / "custom_checkpoint_0.pkl", weights_only=True)
    return state["routed"]


@pytest.mark.parametrize("routed", ["hydralora", "mixture-sequence"])
def test_two_ddp_processes_train_the_same_routed_policy_as_one(routed, tiny_model_dir, tiny_experts, tmp_path):
    """Routed policies through DDP: HydraLoRA (per-token gates, a shared A) and a mixture routed by sequence (its
    router outside the layers, fed the prompts' first pass): the same parameters as one process, to the
    rounding bound."""
    settings = HYDRA if routed == "hydralora" else dict(
        COMPARED, policy="mixture", targets="mlp", lr=20.0,
        policy_args={"experts": tiny_experts, "routing": "sequence"})
    single = tiny_config(tiny_model_dir, tmp_path / "single", steps=2, save_every=2, eval_every=2, **settings)
    train(single)
    double = tiny_config(tiny_model_dir, tmp_path / "double", steps=2, save_every=2, eval_every=2, **settings)
    launch("ddp", double, 29571 if routed == "hydralora" else 29572)
    steps, reference = step_metrics(Path(double.output_dir)), step_metrics(Path(single.output_dir))
    assert [s["param_rank_spread"] for s in steps] == [0.0, 0.0]
    for got, want in zip(steps, reference, strict=True):
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    want, got = routed_at(Path(single.output_dir), 2), routed_at(Path(double.output_dir), 2)
    if routed == "mixture-sequence":  # the router's centre, from the same calibration prompts on every rank
        centre = want.pop("sequence_router.centre")
        assert centre.any() and torch.allclose(got.pop("sequence_router.centre"), centre, rtol=1e-5, atol=1e-6)
    start = {k: torch.zeros_like(v) for k, v in want.items() if k.endswith((".B", "router.weight", "router.bias"))}
    assert start.keys() == want.keys() or routed == "hydralora"
    assert_same_z(got, want, reference, double, start)
