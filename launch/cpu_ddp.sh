#!/usr/bin/env bash
# Two CPU processes with gloo (what the tests run). `--cpu --num_processes 2` would silently run ONE process.
set -euo pipefail
ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
    --mixed_precision no --dynamo_backend no -m svf_rl train "$@"
