"""Rollout engines: HF generate on the policy's own model (hf.py, with the engine factory), vLLM in the
trainer's process or on servers of its own (vllm_engine.py), and the servers' worker extension (vllm_worker.py)."""

from svf_rl.engines.hf import Completion, HFEngine, RolloutEngine, Sampling, chat_ids, make_engine

__all__ = ["Completion", "HFEngine", "RolloutEngine", "Sampling", "chat_ids", "make_engine"]
