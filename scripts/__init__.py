"""Checks and tools that run beside the core: `python -m scripts.gpu_check` (or scripts/gpu_check.sh)."""
