#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): CUDA correctness, speed and memory against full attention to 1M tokens,
# MFU and the memory plan, in one command. --dry_run runs it at tiny shapes on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# growing caches (full attention's keys and values to 1M tokens) reuse freed memory instead of fragmenting it
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec "${PYTHON:-python3}" -m scripts.gpu_check "$@"
