"""bench.py: its FLOP model against torch's counter, the machine it names, one line for a bad setting. (Its JSON
lines end to end: the GPU check's dry run, tests/test_gpu_check.py.)"""
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import SHAPES, block_flops, device_name, flops_per_token
from model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[1]
CORES = f", {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} logical cores"


def bench(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_device_name_of_a_cpu_is_its_model_and_the_cores_we_may_use(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n")
    assert device_name("cpu", str(cpuinfo)) == "AMD EPYC 9R14 96-Core Processor" + CORES


def test_device_name_without_cpuinfo_falls_back_to_what_platform_knows(tmp_path):
    name = device_name("cpu", str(tmp_path / "none"))  # no /proc: macOS, Windows
    assert name.endswith(CORES) and name != CORES


def test_device_name_of_a_gpu_is_cudas_name_for_it(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: asked.append(d) or "NVIDIA H100 80GB HBM3")
    assert device_name("cuda:1") == "NVIDIA H100 80GB HBM3" and asked == [torch.device("cuda:1")]


def test_bench_rejects_an_unknown_method_in_one_line():
    r = bench("--methods=comet,magic")
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_flop_model_matches_torch_flop_counter_on_a_chunk_with_full_memories():
    cfg = ModelConfig(**SHAPES["tiny"])
    model = Transformer(cfg).eval()
    memory = model.empty_memory(1)
    with torch.no_grad():
        for _ in range(5):  # the FIFO (32 slots, 8 per chunk) is full after 4 chunks
            _, memory = model.forward_chunk(torch.randint(259, (1, 64)), memory)
        with FlopCounterMode(display=False) as counter:
            model.forward_chunk(torch.randint(259, (1, 64)), memory)
    rows, prefix = 64 + 8 + 16, 16 + 32
    predicted = cfg.n_layer * block_flops(cfg, rows, prefix, pairs=0)  # the matrix products (attention apart)
    assert abs(counter.get_total_flops() - predicted) / predicted < 0.01  # the memories' own small products


def test_flop_model_full_attention_grows_with_context_and_comet_pays_for_filling_memories():
    cfg = ModelConfig(**SHAPES["tiny"])
    assert flops_per_token(cfg, "full", 65536) > 10 * flops_per_token(cfg, "full", 4096)
    assert flops_per_token(cfg, "comet", 64) < flops_per_token(cfg, "comet", 8192)  # no memory before chunk 2
    assert flops_per_token(cfg, "comet", 8192) > flops_per_token(cfg, "ceiling", 8192)
