"""vLLM, colocated and as a server: after a training step its log-probs are the trainer's at the new z."""

import contextlib
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from svf_rl.base_model import cache_root, load_base_model
from svf_rl.engines.hf import Sampling, chat_ids
from svf_rl.loop.logprobs import completion_logprobs, make_token_batch
from svf_rl.loop.train import pad_logprobs, train
from svf_rl.policies.svf_layer import apply_svf, svf_layers
from svf_rl.svd import weight_fingerprints
from tests.same_z import EQUALITY, assert_same_z
from tests.test_distributed import adapter_at, launch, step_metrics, z_at
from tests.test_train import tiny_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")]


def trainer_logprobs(model, completions, pad_id, grad=False):
    batch = make_token_batch([c.prompt_ids for c in completions], [c.ids for c in completions], pad_id)
    with torch.set_grad_enabled(grad):
        logp = completion_logprobs(model, batch)
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


@pytest.fixture(scope="module", autouse=True)
def server_boots_early(request):
    """The server starts with the module when a test of it will need one: it boots while the first tests run."""
    if any("vllm_server" in item.fixturenames for item in request.session.items if item.module is request.module):
        request.getfixturevalue("vllm_server")


def make_engine(kind, model, tokenizer, model_path, request, fingerprints, policy):
    if kind == "colocated":
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        from svf_rl.engines.vllm_engine import VLLMEngine

        request.addfinalizer(destroy_distributed_environment)  # vLLM's process group, before train() makes its own
        request.addfinalizer(destroy_model_parallel)
        return VLLMEngine(model, tokenizer, model_path, policy.engine_weights, seed=0)
    from svf_rl.engines.vllm_engine import VLLMServerEngine

    return VLLMServerEngine(model, tokenizer, policy, [request.getfixturevalue("vllm_server")], timeout=300,
                            fingerprints=fingerprints)


# LoRA through a server is also trained below; every PEFT policy's server weights: tests/test_policies.py.
@pytest.mark.parametrize("kind, policy_name", [("colocated", "svf"), ("server", "svf"), ("colocated", "lora"),
                                               ("server", "dora")])
def test_weights_pushed_after_a_step_match_the_trainer(kind, policy_name, smollm2_path, request):
    from svf_rl.config import TrainConfig
    from svf_rl.policies import make_policy

    model, tokenizer = load_base_model(smollm2_path)
    fingerprints = weight_fingerprints(model)
    policy = make_policy(TrainConfig(policy=policy_name, progress=False))
    policy.attach(model)
    engine = make_engine(kind, model, tokenizer, smollm2_path, request, fingerprints, policy)
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in ("What is 7 * 8?", "Name a colour.")]
    sampling = Sampling(n=4, temperature=1.0, max_new_tokens=12, seeds=[1, 2])
    before = engine.generate(prompts, sampling)
    base_logp, mask = trainer_logprobs(model, before, tokenizer.pad_token_id)
    engine_base = pad_logprobs([c.logprobs for c in before], base_logp.shape[1])
    assert ((engine_base - base_logp).abs() * mask).max().item() < 1e-3  # not trained yet: vLLM is the base model

    # One REINFORCE step with a large learning rate, then push.
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.02)
    advantage = torch.tensor([1.0, -1.0] * 4)
    with policy.step(int(mask.numel()), True):
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


# SGD for runs compared with each other (tests/same_z.py); each clipped step moves z by lr·1e-3 = 2 in 2-norm,
# about 1e-2 per element, as far as Adam at lr 1e-2.
COMPARED = dict(EQUALITY, lr=2000.0)


def server_config(model_path, run_dir, url, **overrides):
    # Two URLs for the one server: the prompts are spread over both and z is pushed to each.
    return tiny_config(model_path, run_dir, **{
        **dict(engine="vllm_server", steps=2, prompts_per_step=2, generations_per_prompt=2, max_new_tokens=6,
               eval_every=2, save_every=2, seeded_rollouts=True, lr=0.02, baseline="mean", base_eval_max_new_tokens=0,
               vllm_server_urls=[url, url.replace("127.0.0.1", "localhost")]),
        **overrides})


def test_one_two_and_resumed_trainer_processes_train_through_a_vllm_server(smollm2_path, vllm_server, tmp_path):
    # No importance ratio here: it would make the gradient depend on the server's log-probs, whose last
    # digits vary with how the server happens to batch the two ranks' requests.
    single = server_config(smollm2_path, tmp_path / "single", vllm_server, **COMPARED)
    train(single)
    assert (Path(single.output_dir) / "expert.safetensors").exists()
    single_z, reference = z_at(Path(single.output_dir), 2), step_metrics(Path(single.output_dir))
    # Two ranks: the main one pushes z, and neither samples until the server holds it; so with per-prompt
    # seeds both ranks draw what the single process drew, and end with its z.
    double = server_config(smollm2_path, tmp_path / "double", vllm_server, **COMPARED)
    launch("ddp", double, 29541)
    steps = [json.loads(line) for line in (Path(double.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [s["param_rank_spread"] for s in steps if "reward" in s] == [0.0, 0.0]
    assert_same_z(z_at(Path(double.output_dir), 2), single_z, reference, single)
    # Resumed after its first step, it goes on as the uninterrupted single process did
    train(server_config(smollm2_path, tmp_path / "resumed", vllm_server, steps=1, **COMPARED))
    resumed = server_config(smollm2_path, tmp_path / "resumed", vllm_server, **COMPARED)
    train(resumed)  # the server must be sent the restored z before the first resumed rollout
    assert_engine_served_the_trainers_z(Path(resumed.output_dir), moved=1e-3)
    assert_same_z(z_at(Path(resumed.output_dir), 2), single_z, reference, single)


def test_a_missing_server_is_a_one_line_error(smollm2_path):
    from svf_rl.engines.vllm_engine import VLLMServerEngine, VLLMServerError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    start = time.perf_counter()
    with pytest.raises(VLLMServerError, match=f"no vLLM server answered at {url} within 2 s"):
        VLLMServerEngine(None, None, None, [url], timeout=2)
    assert time.perf_counter() - start < 30


def colocated_config(model_path, run_dir, **overrides):
    return tiny_config(model_path, run_dir, **{
        **dict(engine="vllm", steps=3, prompts_per_step=2, generations_per_prompt=2, max_new_tokens=6, eval_every=3,
               save_every=1, seeded_rollouts=True, lr=0.02, baseline="mean", base_eval_max_new_tokens=0),
        **overrides})


def assert_engine_served_the_trainers_z(run: Path, moved: float = 1e-2) -> None:
    """Each step's rollouts were sampled at the z of the step before: vLLM's log-probs are the trainer's."""
    steps = step_metrics(run)
    assert steps[-1]["z_dev_max"] > moved  # z moved far enough that stale weights would show
    gaps = [s["sampler_logp_gap"] for s in steps]
    assert max(gaps) < 1e-3, f"vLLM sampled from other weights than the trainer's: gaps {gaps}"


def test_lora_trains_through_a_vllm_server_whose_log_probs_stay_the_trainers(smollm2_path, vllm_server, tmp_path):
    # The push is the adapter's parameters alone, with the importance ratio towards the server's log-probs
    # (colocated LoRA: the resumed run below).
    config = server_config(smollm2_path, tmp_path, vllm_server, engine_ratio_cap=2.0, policy="lora", lr=0.01,
                           **{"policy_args.rank": 8})
    train(config)
    steps = step_metrics(Path(config.output_dir))
    assert all(math.isfinite(s["loss"]) and s["sync_s"] > 0 for s in steps)
    assert steps[-1]["param_shift"] > 0.05
    gaps = [s["sampler_logp_gap"] for s in steps]
    assert max(gaps) < 1e-3, f"vLLM sampled from other weights than the trainer's: gaps {gaps}"
    assert (Path(config.output_dir) / "adapter" / "adapter_model.safetensors").is_file()


def test_colocated_vllm_under_zero2_follows_z(smollm2_path, tmp_path):
    # ZeRO-2 writes z through a flat buffer: a cache keyed on z's version would keep serving step 0's W'.
    config = colocated_config(smollm2_path, tmp_path)
    launch("zero2", config, 29543, env_extra={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert_engine_served_the_trainers_z(Path(config.output_dir))


def run_cli(config) -> None:
    import subprocess
    import sys

    overrides = [f"{k}={v}" for k, v in vars(config).items() if k not in ("task_args", "log_with", "reward_weights")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run([sys.executable, "-m", "svf_rl", "train", *overrides, "log_with=[]"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_resumed_colocated_vllm_run_of_lora_continues_as_an_uninterrupted_one(smollm2_path, tmp_path):
    # The push is the adapted layers' W + ΔW by name; a resumed run's engine must start from the restored adapter,
    # not from the base weights. Each run in its own process: vLLM keeps a process group per process.
    lora = dict(policy="lora", lr=0.01, lr_schedule="constant", warmup_steps=0, **{"policy_args.rank": 8})
    whole = colocated_config(smollm2_path, tmp_path / "whole", **lora)
    run_cli(whole)
    run_cli(colocated_config(smollm2_path, tmp_path / "resumed", steps=2, **lora))
    resumed = colocated_config(smollm2_path, tmp_path / "resumed", **lora)
    run_cli(resumed)
    steps = step_metrics(Path(resumed.output_dir))
    assert [s["step"] for s in steps] == [1, 2, 3] and steps[-1]["param_shift"] > 0.05
    gaps = [s["sampler_logp_gap"] for s in steps]
    assert max(gaps) < 1e-3, f"vLLM sampled from other weights than the trainer's: gaps {gaps}"
    assert (Path(resumed.output_dir) / "adapter" / "adapter_model.safetensors").is_file()
    # The same process layout, seeded rollouts and a constant lr (a schedule would follow each run's own length):
    # the same arithmetic, so the same adapter
    want, got = adapter_at(Path(whole.output_dir), 3), adapter_at(Path(resumed.output_dir), 3)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-6), key


VLLM_LOAD = """
import json, sys
sys.modules["svf_rl"] = None  # the merged directory must load in vLLM without svf-rl
from vllm import LLM, SamplingParams, TokensPrompt
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
prompts = json.loads(sys.argv[2])
params = SamplingParams(n=2, temperature=1.0, max_tokens=10, logprobs=0, seed=1)
out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
print("RESULT" + json.dumps([[list(s.token_ids), [step[t].logprob for step, t in zip(s.logprobs, s.token_ids)]]
                             for o in out for s in o.outputs]))
"""


def test_a_merged_model_serves_in_vllm_without_svf_rl(smollm2_path, tmp_path):
    from svf_rl.engines.hf import Completion
    from svf_rl.inference.expert import Expert, save_expert
    from svf_rl.inference.merge import merge_expert
    from svf_rl.svd import model_fingerprint

    model, tokenizer = load_base_model(smollm2_path)
    fingerprint = model_fingerprint(model)
    apply_svf(model, "mlp", "auto", cache_root() / "svd", progress=False)
    generator = torch.Generator().manual_seed(0)
    z = {n: 1 + 0.1 * torch.randn(layer.z.shape, generator=generator) for n, layer in svf_layers(model).items()}
    path = save_expert(Expert(z, smollm2_path, fingerprint, "mlp", "test"), tmp_path / "expert.safetensors")
    merged = merge_expert(path, tmp_path / "merged")
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in ("What is 7 * 8?", "Name a colour.")]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_LOGGING_LEVEL": "ERROR"}
    run = subprocess.run([sys.executable, "-I", "-c", VLLM_LOAD, str(merged), json.dumps(prompts)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = json.loads(run.stdout.split("RESULT", 1)[1])
    completions = [Completion(prompts[k // 2], ids, "") for k, (ids, _) in enumerate(samples)]
    for layer_name, layer in svf_layers(model).items():
        layer.z.data.copy_(z[layer_name])
    ours, mask = trainer_logprobs(model, completions, tokenizer.pad_token_id)
    served = pad_logprobs([lp for _, lp in samples], ours.shape[1])
    gap = ((served - ours).abs() * mask).max().item()
    assert gap < 1e-3, f"vLLM on the merged model and the SVF model disagree by {gap}"
    base, _ = trainer_logprobs(load_base_model(smollm2_path)[0], completions, tokenizer.pad_token_id)
    assert ((served - base).abs() * mask).max().item() > 1e-2  # vLLM serves the expert, not the base


def test_colocated_vllm_generates_each_group_with_its_own_z(smollm2_path, request):
    from svf_rl.engines.hf import generate_per_z
    from svf_rl.inference.evaluate import ModelWeights

    model, tokenizer = load_base_model(smollm2_path)
    apply_svf(model, "mlp", "auto", cache_root() / "svd", progress=False)
    engine = make_engine("colocated", model, tokenizer, smollm2_path, request, None, ModelWeights(model))
    generator = torch.Generator().manual_seed(0)
    zs = [{n: 1 + 0.2 * torch.randn(layer.z.shape, generator=generator) for n, layer in svf_layers(model).items()}
          for _ in range(2)]
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in ("What is 7 * 8?", "Name a colour.")]
    sampling = Sampling(n=2, temperature=1.0, max_new_tokens=8, seeds=[1, 2])
    groups = generate_per_z(engine, [(zs[0], prompts), (None, prompts), (zs[1], prompts)], sampling)
    assert all(torch.equal(layer.z.detach(), torch.ones_like(layer.z)) for layer in svf_layers(model).values())
    for z, completions in zip([zs[0], None, zs[1]], groups, strict=True):
        for name, layer in svf_layers(model).items():
            layer.z.data.copy_(z[name] if z is not None else torch.ones_like(layer.z))
        ours, mask = trainer_logprobs(model, completions, tokenizer.pad_token_id)
        served = pad_logprobs([c.logprobs for c in completions], ours.shape[1])
        assert ((served - ours).abs() * mask).max().item() < 1e-3  # each group ran at its own z


@pytest.fixture(scope="module")
def smollm2_experts(smollm2_path, tmp_path_factory):
    """Two expert files for SmolLM2's MLPs, each z a different random scale, as far apart as trained experts."""
    from svf_rl.inference.expert import Expert, save_expert
    from svf_rl.svd import model_fingerprint

    model, _ = load_base_model(smollm2_path)
    fingerprint = model_fingerprint(model)
    apply_svf(model, "mlp", "auto", cache_root() / "svd", progress=False)
    generator = torch.Generator().manual_seed(3)
    folder = tmp_path_factory.mktemp("smollm2_experts")
    return [str(save_expert(Expert({n: 1 + 0.3 * torch.randn(layer.z.shape, generator=generator)
                                    for n, layer in svf_layers(model).items()}, smollm2_path, fingerprint, "mlp",
                                   f"e{k}"), folder / f"e{k}.safetensors")) for k in range(2)]


@pytest.mark.parametrize("kind, top_k", [("colocated", 1), ("server", 0)])  # all gates or the top-1 only
def test_vllm_generates_each_prompt_at_its_sequence_routers_gates(kind, top_k, smollm2_path, smollm2_experts,
                                                                  request):
    from svf_rl.config import TrainConfig
    from svf_rl.engines.hf import left_pad
    from svf_rl.engines.per_prompt import PerPromptEngine
    from svf_rl.policies import make_policy
    from svf_rl.policies.mixture import prompt_features

    model, tokenizer = load_base_model(smollm2_path)
    fingerprints = weight_fingerprints(model)
    policy = make_policy(TrainConfig(policy="mixture", targets="mlp", progress=False,
                                     engine="vllm" if kind == "colocated" else "vllm_server",
                                     policy_args={"experts": smollm2_experts, "routing": "sequence",
                                                  "top_k": top_k}))
    questions = ("What is 7 * 8?", "Name a colour.", "How many r's are in 'strawberry'?")
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    policy.attach(model, prompts)
    with torch.no_grad():  # a trained router: prompt 0 mostly expert 0, prompt 1 expert 1, prompt 2 a mix of both
        policy.ensure_centre()
        features = prompt_features(model, *left_pad(prompts, 0))
        u = torch.nn.functional.normalize(features - policy.router.centre, dim=-1)
        policy.router.weight.copy_(5 * torch.stack([-u[2], u[0], u[1]]))
    gates = policy.prompt_gates(prompts)
    assert min((gates[i] - gates[j]).abs().max().item() for i, j in ((0, 1), (0, 2), (1, 2))) > 0.1
    engine = PerPromptEngine(make_engine(kind, model, tokenizer, smollm2_path, request, fingerprints, policy), policy)
    sampling = Sampling(n=2, temperature=1.0, max_new_tokens=8, seeds=[1, 2, 3])

    def gap(completions, reference=False):
        with policy.reference() if reference else contextlib.nullcontext():
            ours, mask = trainer_logprobs(model, completions, tokenizer.pad_token_id)
        served = pad_logprobs([c.logprobs for c in completions], ours.shape[1])
        return ((served - ours).abs() * mask).amax(1).view(len(prompts), -1).amax(1)

    routed = engine.generate(prompts, sampling)
    assert [c.prompt_ids for c in routed] == [p for p in prompts for _ in range(2)]  # in the prompts' order
    assert gap(routed).max() < 1e-3  # each prompt ran at its own gates, as the update routes it
    for i, prompt in enumerate(prompts):  # ... and its own seed
        with policy.at_gates(gates[i]):
            engine.engine.update_weights()
        alone = engine.engine.generate([prompt], Sampling(n=2, temperature=1.0, max_new_tokens=8, seeds=[i + 1]))
        assert [c.ids for c in alone] == [c.ids for c in routed[2 * i:2 * i + 2]]
    assert gap(routed, reference=True).min() > 1e-2  # ... which are not the base model
    with policy.at_gates(gates[0]):  # one route for all: the other two prompts' completions show it
        engine.engine.update_weights()
    assert gap(engine.engine.generate(prompts, sampling))[1:].min() > 1e-2
    with policy.reference():  # π_ref's scope (the base model's scores) routes nothing
        assert gap(engine.generate(prompts, sampling), reference=True).max() < 1e-3


def test_a_sequence_routed_mixture_trains_through_a_vllm_server_whose_log_probs_stay_the_trainers(
        smollm2_path, smollm2_experts, vllm_server, tmp_path):
    # The engine factory wraps either vLLM engine alike (the colocated one is checked directly above).
    mixture = {"policy": "mixture", "targets": "mlp", "lr": 0.5, "policy_args.routing": "sequence",
               "policy_args.experts": f"[{','.join(smollm2_experts)}]"}
    config = server_config(smollm2_path, tmp_path, vllm_server, **mixture)
    train(config)
    steps = step_metrics(Path(config.output_dir))
    gaps = [s["sampler_logp_gap"] for s in steps]
    assert max(gaps) < 1e-3, f"vLLM sampled from other weights than the trainer's: gaps {gaps}"
    assert all(0 < s["route_rollout_entropy"] < math.log(3) for s in steps[1:])  # the router moved off uniform
    assert all(s["route_agreement"] == 1.0 for s in steps)  # each update sequence routed as it was sampled
    # `svf-rl eval --engine vllm` of the file generates each prompt at its own route, as the HF engine does (vLLM
    # in a process of its own: it keeps a process group per process)
    from svf_rl.inference.evaluate import evaluate

    artefact, out = str(Path(config.output_dir) / "mixture.safetensors"), tmp_path / "eval_vllm.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run([sys.executable, "-m", "svf_rl", "eval", artefact, "--engine", "vllm", "--size", "6",
                             "--max-new-tokens", "8", "--output", str(out)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = {"vllm": json.loads(out.read_text()), "hf": evaluate(None, None, [artefact], size=6, max_new_tokens=8)}
    assert [g["completion"] for g in scored["vllm"]["greedy"]] == [g["completion"] for g in scored["hf"]["greedy"]]
    assert scored["vllm"]["accuracy"] == scored["hf"]["accuracy"]


LORA_SERVE = """
import json, sys
sys.modules["svf_rl"] = None  # the adapters must serve without svf-rl
from vllm import LLM, SamplingParams, TokensPrompt
from vllm.lora.request import LoRARequest
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512, seed=0, enable_lora=True,
          max_lora_rank=int(sys.argv[4]), max_loras=2)
prompts, adapters = json.loads(sys.argv[2]), json.loads(sys.argv[3])
requests = [LoRARequest(name, k + 1, path) for k, (name, path) in enumerate(adapters)]
params = SamplingParams(n=1, temperature=1.0, max_tokens=10, logprobs=0, seed=1)
# One batch: every prompt once per adapter, each request naming its own adapter.
batch = [(p, r) for r in requests for p in prompts]
out = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in batch], params, lora_request=[r for _, r in batch],
                   use_tqdm=False)
print("RESULT" + json.dumps([[list(s.token_ids), [step[t].logprob for step, t in zip(s.logprobs, s.token_ids)]]
                             for o in out for s in o.outputs]))
"""


def test_vllm_serves_two_exported_experts_in_one_batch_each_request_with_its_own(smollm2_path, tmp_path):
    """Each expert changes 8 singular values per matrix, so rank 8 keeps all of ΔW (Eckart–Young: the share
    kept is 1), and each request's log-probs must be the SVF model's with its expert, to vLLM's precision."""
    from svf_rl.engines.hf import Completion
    from svf_rl.inference.expert import Expert, save_expert
    from svf_rl.inference.export_lora import export_lora
    from svf_rl.svd import model_fingerprint

    model, tokenizer = load_base_model(smollm2_path)
    fingerprint = model_fingerprint(model)
    apply_svf(model, "mlp", "auto", cache_root() / "svd", progress=False)
    generator, zs, adapters = torch.Generator().manual_seed(0), [], []
    for name in ("first", "second"):
        z = {}
        for module, layer in svf_layers(model).items():
            z[module] = torch.ones(layer.z.shape)
            changed = torch.randperm(layer.z.numel(), generator=generator)[:8]
            z[module][changed] += 0.5 * torch.randn(8, generator=generator)
        zs.append(z)
        path = save_expert(Expert(z, smollm2_path, fingerprint, "mlp", "test"), tmp_path / f"{name}.safetensors")
        report = export_lora(path, tmp_path / name, rank=8)
        assert report["kept_min"] > 1 - 1e-6
        adapters.append((name, str(tmp_path / name)))
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in ("What is 7 * 8?", "Name a colour.")]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_LOGGING_LEVEL": "ERROR"}
    run = subprocess.run([sys.executable, "-I", "-c", LORA_SERVE, smollm2_path, json.dumps(prompts),
                          json.dumps(adapters), "8"], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = json.loads(run.stdout.split("RESULT", 1)[1])
    served = {}
    for k, z in enumerate(zs):
        part = samples[k * len(prompts):(k + 1) * len(prompts)]
        completions = [Completion(p, ids, "") for p, (ids, _) in zip(prompts, part, strict=True)]
        for name, layer in svf_layers(model).items():
            layer.z.data.copy_(z[name])
        ours, mask = trainer_logprobs(model, completions, tokenizer.pad_token_id)
        served[k] = pad_logprobs([lp for _, lp in part], ours.shape[1])
        gap = ((served[k] - ours).abs() * mask).max().item()
        assert gap < 1e-3, f"request with expert {k} differs from the SVF model by {gap}"
        for name, layer in svf_layers(model).items():  # and the other expert would have given other log-probs
            layer.z.data.copy_(zs[1 - k][name])
        other, _ = trainer_logprobs(model, completions, tokenizer.pad_token_id)
        assert ((served[k] - other).abs() * mask).max().item() > 1e-2
