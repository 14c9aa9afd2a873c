"""vLLM, colocated and as a server: after a training step its log-probs are the trainer's at the new z."""

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from svf_rl.base_model import cache_root, load_base_model
from svf_rl.engine import Sampling
from svf_rl.logprobs import completion_logits, make_token_batch, of_tokens
from svf_rl.svf import apply_svf, policy_step, svf_layers
from svf_rl.train import chat_ids, pad_logprobs, train
from tests.test_distributed import launch, z_at
from tests.test_train import tiny_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")]


def trainer_logprobs(model, completions, pad_id, grad=False):
    batch = make_token_batch([c.prompt_ids for c in completions], [c.ids for c in completions], pad_id)
    with torch.set_grad_enabled(grad):
        logp = of_tokens(torch.log_softmax(completion_logits(model, batch), -1), batch.completion_ids)
    return logp, batch.completion_mask


@pytest.fixture(scope="module")
def vllm_server(smollm2_path, tmp_path_factory):
    """launch/vllm_server.sh serving SmolLM2 on a free port, as a user would start it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    root = Path(__file__).resolve().parents[1]
    with open(log, "w") as out:
        server = subprocess.Popen([str(root / "launch" / "vllm_server.sh"), smollm2_path, str(port),
                                   "--max-model-len", "1024"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    yield f"http://127.0.0.1:{port}"
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


def make_engine(kind, model, tokenizer, model_path, request):
    if kind == "colocated":
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        from svf_rl.vllm_engine import VLLMEngine

        request.addfinalizer(destroy_distributed_environment)  # vLLM's process group, before train() makes its own
        request.addfinalizer(destroy_model_parallel)
        return VLLMEngine(model, tokenizer, model_path, seed=0)
    from svf_rl.vllm_engine import VLLMServerEngine

    return VLLMServerEngine(model, tokenizer, [request.getfixturevalue("vllm_server")], timeout=300)


@pytest.mark.parametrize("kind", ["colocated", "server"])
def test_weights_pushed_after_a_step_match_the_trainer(kind, smollm2_path, request):
    model, tokenizer = load_base_model(smollm2_path)
    apply_svf(model, "mlp", "auto", cache_root() / "svd", progress=False)
    engine = make_engine(kind, model, tokenizer, smollm2_path, request)
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in ("What is 7 * 8?", "Name a colour.")]
    sampling = Sampling(n=4, temperature=1.0, max_new_tokens=12, seeds=[1, 2])
    before = engine.generate(prompts, sampling)
    base_logp, mask = trainer_logprobs(model, before, tokenizer.pad_token_id)
    engine_base = pad_logprobs([c.logprobs for c in before], base_logp.shape[1])
    assert ((engine_base - base_logp).abs() * mask).max().item() < 1e-3  # z = 1: vLLM is the base model

    # One REINFORCE step with a large learning rate, then push.
    optimizer = torch.optim.Adam([layer.z for layer in svf_layers(model).values()], lr=0.02)
    advantage = torch.tensor([1.0, -1.0] * 4)
    with policy_step(model, tokens=int(mask.numel())):
        logp, mask = trainer_logprobs(model, before, tokenizer.pad_token_id, grad=True)
        (-(advantage[:, None] * logp * mask).sum() / mask.sum()).backward()
    optimizer.step()
    engine.update_weights()

    after = engine.generate(prompts, sampling)
    new_logp, new_mask = trainer_logprobs(model, after, tokenizer.pad_token_id)
    engine_logp = pad_logprobs([c.logprobs for c in after], new_logp.shape[1])
    gap = ((engine_logp - new_logp).abs() * new_mask).max().item()
    assert gap < 1e-3, f"vLLM and trainer disagree by {gap} after the push"
    stale, _ = trainer_logprobs(load_base_model(smollm2_path)[0], after, tokenizer.pad_token_id)
    assert ((engine_logp - stale).abs() * new_mask).max().item() > 1e-2  # the push changed vLLM's weights


def server_config(model_path, run_dir, url, **overrides):
    # Two URLs for the one server: the prompts are spread over both and z is pushed to each.
    return tiny_config(model_path, run_dir, engine="vllm_server", steps=2, prompts_per_step=2,
                       generations_per_prompt=2, max_new_tokens=6, eval_every=2, save_every=2, seeded_rollouts=True,
                       lr=0.02, baseline="mean", vllm_server_urls=[url, url.replace("127.0.0.1", "localhost")],
                       **overrides)


def test_training_through_a_vllm_server_with_the_importance_ratio(smollm2_path, vllm_server, tmp_path):
    config = server_config(smollm2_path, tmp_path, vllm_server, engine_ratio_cap=2.0)
    train(config)
    steps = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "reward" in s] == [1, 2]
    assert all(math.isfinite(s["loss"]) and s["sync_s"] > 0 for s in steps if "reward" in s)
    assert (Path(config.output_dir) / "expert.safetensors").exists()


def test_one_and_two_trainer_processes_train_through_a_vllm_server(smollm2_path, vllm_server, tmp_path):
    # No importance ratio here: it would make the gradient depend on the server's log-probs, whose last
    # digits vary with how the server happens to batch the two ranks' requests.
    single = server_config(smollm2_path, tmp_path / "single", vllm_server)
    train(single)
    assert (Path(single.output_dir) / "expert.safetensors").exists()
    # Two ranks: the main one pushes z, and neither samples until the server holds it; so with per-prompt
    # seeds both ranks draw what the single process drew, and end with its z.
    double = server_config(smollm2_path, tmp_path / "double", vllm_server)
    launch("ddp", double, 29541)
    steps = [json.loads(line) for line in (Path(double.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [s["z_rank_spread"] for s in steps if "reward" in s] == [0.0, 0.0]
    single_z, double_z = z_at(Path(single.output_dir), 2), z_at(Path(double.output_dir), 2)
    assert max((z - 1).abs().max().item() for z in single_z.values()) > 1e-3
    for name in single_z:
        torch.testing.assert_close(double_z[name], single_z[name], rtol=0, atol=1e-5)


def test_a_missing_server_is_a_one_line_error(smollm2_path):
    from svf_rl.vllm_engine import VLLMServerEngine, VLLMServerError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    start = time.perf_counter()
    with pytest.raises(VLLMServerError, match=f"no vLLM server answered at {url} within 2 s"):
        VLLMServerEngine(None, None, [url], timeout=2)
    assert time.perf_counter() - start < 30
