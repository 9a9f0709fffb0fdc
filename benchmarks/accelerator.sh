#!/usr/bin/env bash
# bf16 prefix-tuning steps on a GPU/TPU host: step time, tokens/s, analytic MFU, peak device memory, and PEFT on
# the same device when torch sees a GPU. One table, JSON in benchmarks/results/accelerator.json, <= 8 minutes.
#
#   bash benchmarks/accelerator.sh            # GPT-2-medium, T5-base, a 1B Llama-shaped decoder (random weights)
#   bash benchmarks/accelerator.sh --smoke    # tiny shapes on a CPU in < 2 minutes: checks the script runs, not a
#                                             # measurement (JSON to a temporary file; what tests run)
#
# Run on an NVIDIA H200 (JAX 0.11.2, torch 2.11 + CUDA 13): results in benchmarks/README.md. Not yet on a TPU.
# See benchmarks/accelerator.py for what each column means.
set -euo pipefail
cd "$(dirname "$0")/.."
# A hard ceiling above the script's own budget (450 s; smoke 110 s), so an unattended run always ends.
# ACCELERATOR_LIMIT_S overrides it (with --budget) on a slow or loaded machine.
limit=480
for arg in "$@"; do [ "$arg" = "--smoke" ] && limit=120; done
limit="${ACCELERATOR_LIMIT_S:-$limit}"
# python3: on CUDA images a bare `python` is often missing or another interpreter than the one with torch.
exec timeout --kill-after=10 "$limit" "${PYTHON:-python3}" benchmarks/accelerator.py "$@"
