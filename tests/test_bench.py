"""bench.py runs end to end on CPU and prints one valid JSON line per measurement."""
import json
import subprocess
import sys
from pathlib import Path

from bench import SHAPES, flops_per_token
from model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def bench(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bench_prints_a_json_line_per_method_and_length_and_skips_full_attention_beyond_its_limit(tmp_path):
    r = bench("--lengths=256,512", "--train_len=256", "--repeats=1", "--full_max=256", "--threads=1",
              f"--json={tmp_path / 'b.jsonl'}")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert (tmp_path / "b.jsonl").read_text().splitlines() == r.stdout.splitlines()
    got = {(x["method"], x["ctx"]): x for x in lines}
    assert set(got) == {(m, c) for m in ("comet", "full", "ceiling", "comet/ceiling") for c in (256, 512)} | {
        ("train", 256)}
    for (method, ctx), x in got.items():
        assert x["shape"].startswith("tiny") and x["device"] == "cpu" and x["dtype"] == "float32"
        if method == "full" and ctx == 512:
            assert x["status"] == "skipped" and "full_max=256" in x["note"]
        elif method != "comet/ceiling":
            assert x["status"] == "ok" and x["tokens_per_s"] > 0 and x["peak_mib"] > 100 and x["mfu"] is None
    ratio = got["comet/ceiling", 512]
    assert got["comet", 512]["ceiling_tokens_per_s"] > 0 and got["comet/ceiling", 256]["vs_comet_8k"] > 0
    assert ratio["adjusted_flops"] == round(ratio["raw"] / ratio["flops_factor"], 3)


def test_bench_rejects_an_unknown_method_in_one_line():
    r = bench("--methods=comet,magic")
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_flop_model_full_attention_grows_with_context_and_comet_pays_for_its_extra_rows():
    cfg = ModelConfig(**SHAPES["tiny"])
    assert flops_per_token(cfg, "full", 65536) > 10 * flops_per_token(cfg, "full", 4096)
    assert flops_per_token(cfg, "comet", 1) > flops_per_token(cfg, "ceiling", 1)
    assert flops_per_token(cfg, "comet", 10**6) == flops_per_token(cfg, "comet", 8192)  # constant per token
