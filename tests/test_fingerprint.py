import copy
import json
import logging
import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaForCausalLM

from svf_rl import svd
from svf_rl.svd import cached_svd, factors_fit, model_fingerprint, svd_fp32, weight_fingerprint, weight_fingerprints

from .conftest import tiny_llama


def off_sample_twin(weight: torch.Tensor) -> torch.Tensor:
    """A copy differing in three odd-indexed values: a 131,072-value matrix was hashed at every second value."""
    twin = weight.detach().clone()
    twin.view(-1)[[1, 1001, 77777]] += 0.5
    return twin


def test_fingerprint_is_the_same_for_fp32_and_bf16_loads_of_a_checkpoint(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "fp32")
    bf16 = LlamaForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    assert model_fingerprint(bf16) == model_fingerprint(model)
    bf16.save_pretrained(tmp_path / "bf16")  # a bf16 checkpoint, loaded in fp32
    assert model_fingerprint(LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)) == \
        model_fingerprint(model)


def test_fingerprint_hashes_every_value():
    a = nn.Linear(256, 512, bias=False)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.weight.copy_(off_sample_twin(a.weight))
    assert weight_fingerprint(b.weight) != weight_fingerprint(a.weight)
    assert model_fingerprint(b) != model_fingerprint(a)


def test_model_fingerprint_reuses_the_weight_fingerprints():
    model = tiny_llama()
    weights = weight_fingerprints(model)
    assert "model.layers.0.mlp.up_proj.weight" in weights
    assert model_fingerprint(model, weights) == model_fingerprint(model)


def test_svd_cache_keys_on_every_value(tmp_path):
    weight = torch.randn(512, 256)
    twin = off_sample_twin(weight)
    cached_svd(weight, tmp_path)
    assert torch.equal(cached_svd(twin, tmp_path)[1], svd_fp32(twin)[1])
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_bf16_weight_and_its_fp32_copy_share_a_cache_entry(tmp_path):
    """A bf16 checkpoint read by a vLLM worker and loaded in fp32 by the trainer: one SVD, not two."""
    weight = torch.randn(12, 8)
    cached_svd(weight.bfloat16(), tmp_path)
    cached_svd(weight.bfloat16().float(), tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    cached_svd(weight, tmp_path)  # values bf16 cannot hold: another matrix
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


@pytest.mark.parametrize("wrong", ["another matrix", "the matrix rounded to bf16", "another shape"])
def test_cache_entry_that_does_not_decompose_its_weight_is_recomputed(wrong, tmp_path, monkeypatch, caplog):
    weight = torch.randn(12, 8)
    cached_svd(weight, tmp_path)
    [path] = tmp_path.glob("*.safetensors")
    other = {"another matrix": torch.randn(12, 8), "the matrix rounded to bf16": weight.bfloat16(),
             "another shape": torch.randn(8, 12)}[wrong]
    save_file(dict(zip(("U", "s", "Vh"), svd_fp32(other), strict=True)), path)
    monkeypatch.setattr(svd, "_verified", set())  # as in a new process
    with caplog.at_level(logging.WARNING, logger="svf_rl.svd"):
        U, s, Vh = cached_svd(weight, tmp_path)
    assert torch.equal(s, svd_fp32(weight)[1])
    assert "does not decompose" in caplog.text
    assert factors_fit(weight, *cached_svd(weight, tmp_path))  # the entry was overwritten


def test_cache_entry_is_checked_once_per_process(tmp_path, monkeypatch):
    checks = []
    fit = svd.factors_fit
    monkeypatch.setattr(svd, "factors_fit", lambda *args, check_values=True: checks.append(check_values) or
                        fit(*args, check_values=check_values))
    weight = torch.randn(12, 8)
    cached_svd(weight, tmp_path)  # computed here: nothing to check
    monkeypatch.setattr(svd, "_verified", set())
    for _ in range(3):
        cached_svd(weight, tmp_path)
    assert checks == [True, False, False]  # shapes every time, values once


@pytest.mark.parametrize("weight", [torch.randn(12, 8), torch.randn(576, 1536).bfloat16() * 0.02, torch.zeros(16, 16),
                                    torch.randn(512, 4) @ torch.randn(4, 256)],
                         ids=["small", "smollm2-mlp-bf16", "zero", "rank-4"])
def test_exact_svd_passes_the_reconstruction_check(weight):
    assert factors_fit(weight, *svd_fp32(weight))


class FakeWorker:
    """What PolicyWorkerExtension needs of vLLM's worker: its model config, and a loader that takes weights."""

    def __init__(self, model_dir, dtype=torch.bfloat16):
        from svf_rl.engines.vllm_worker import PolicyWorkerExtension

        self.extension = PolicyWorkerExtension()
        self.extension.vllm_config = types.SimpleNamespace(model_config=types.SimpleNamespace(model=str(model_dir),
                                                                                             dtype=dtype))
        self.extension.reload_weights = lambda weights_iterator, is_checkpoint_format: list(weights_iterator)

    def rpc(self, client, method, argument):  # replaces VLLMServerEngine._rpc, bound to this worker
        return [getattr(self.extension, method)(argument)]


class FakeClient:
    def __init__(self, base_url, connection_timeout):
        self.base_url = base_url

    def reset_prefix_cache(self):
        pass


def server_engine(model_dir, trainer, fingerprints, monkeypatch):
    """A VLLMServerEngine whose one server runs PolicyWorkerExtension in this process, on `model_dir`; `trainer`:
    an attached policy."""
    from svf_rl.engines.vllm_engine import VLLMServerEngine

    monkeypatch.setitem(sys.modules, "trl.generation.vllm_client", types.SimpleNamespace(VLLMClient=FakeClient))
    monkeypatch.setattr(VLLMServerEngine, "_rpc", FakeWorker(model_dir).rpc)
    return VLLMServerEngine(trainer.model, None, trainer, ["http://server:8000"], fingerprints=fingerprints)


def test_server_identity_is_checked_exactly(tmp_path, monkeypatch):
    from svf_rl.config import TrainConfig
    from svf_rl.engines.vllm_engine import VLLMServerError
    from svf_rl.policies import make_policy

    monkeypatch.setenv("SVF_RL_CACHE", str(tmp_path / "cache"))
    served = tiny_llama()
    served.save_pretrained(tmp_path / "same")  # fp32 checkpoint; the trainer loads it in bf16
    trainer = LlamaForCausalLM.from_pretrained(tmp_path / "same", dtype=torch.bfloat16)
    fingerprints = weight_fingerprints(trainer)  # before apply_svf replaces the weights by factors
    policy = make_policy(TrainConfig())
    policy.attach(trainer)
    server_engine(tmp_path / "same", policy, fingerprints, monkeypatch)

    with torch.no_grad():  # 5% on one value: Σs moves by far less than the old 1e-3 tolerance
        served.model.layers[1].mlp.down_proj.weight[0, 0] *= 1.05
    served.save_pretrained(tmp_path / "other")
    with pytest.raises(VLLMServerError, match=r"serves other weights .* 1 of 6 adapted layers differ, e.g. "
                                              r"model.layers.1.mlp.down_proj \(fingerprint") as err:
        server_engine(tmp_path / "other", policy, fingerprints, monkeypatch)
    assert "\n" not in str(err.value)


def test_worker_reports_the_fingerprint_of_each_checkpoint_weight(tmp_path, monkeypatch):
    monkeypatch.setenv("SVF_RL_CACHE", str(tmp_path / "cache"))
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    reported = FakeWorker(tmp_path).extension.policy_setup(json.dumps({"policy": "svf", "names": names}))
    assert reported == {name: weight_fingerprint(model.get_submodule(name).weight) for name in names}


def test_a_machines_first_run_draws_the_random_numbers_a_later_run_draws(tmp_path, monkeypatch, smollm2_path):
    """Converting the embedded model (what a machine's first run does) and loading it leave the global generator as
    they found it, so a seed samples the same completions whether the cache was empty or not; the conversion is
    the cached one, byte for byte."""
    from pathlib import Path

    from svf_rl.base_model import EMBEDDED_MODEL, load_base_model

    monkeypatch.setenv("SVF_RL_CACHE", str(tmp_path))
    expected = torch.manual_seed(0).get_state()
    load_base_model(EMBEDDED_MODEL)  # converts into the empty cache
    assert torch.equal(torch.get_rng_state(), expected)
    torch.manual_seed(0)
    load_base_model(EMBEDDED_MODEL)  # reads it
    assert torch.equal(torch.get_rng_state(), expected)
    converted = tmp_path / "models" / "smollm2-135m-instruct" / "model.safetensors"
    assert converted.read_bytes() == (Path(smollm2_path) / "model.safetensors").read_bytes()
