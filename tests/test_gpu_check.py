"""scripts/gpu_check.py: its dry run on CPU passes every correctness check; its verdicts and section handling."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench
from configurator import configure, settings_of
from scripts import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_passes_every_correctness_check_and_names_the_device_in_every_line(tmp_path):
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry_run", f"--out_dir={tmp_path}", "--time_limit=1200"],
                       cwd=ROOT, capture_output=True, text=True, timeout=1300, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")] == lines
    assert len({x["device_name"] for x in lines}) == 1 and "logical cores" in lines[0]["device_name"]
    status = {(x["section"], x["check"]): x["status"] for x in lines}
    correctness = {check: s for (section, check), s in status.items() if section == "correctness"}
    assert len(correctness) == 8 and set(correctness.values()) == {"pass", "skipped"}
    assert correctness["training on the device, fp32 = CPU"] == "skipped"  # the CPU is the device
    assert {s for (section, _), s in status.items() if section == "distributed"} == {"pass"}
    assert [c for (section, c) in status if section == "bench"] == [
        "CoMeT vs full attention at 1,024 tokens: time", "CoMeT vs full attention at 1,024 tokens: peak memory",
        "CoMeT prefill vs the chunk ceiling at 1,024 tokens"]
    assert status["plan", "plan vs a measured step: tiny, 512 tokens x 2 (CPU, fp32, live tensors)"] == "met"
    assert status["mfu", "training step MFU, float32"] == "info"
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {x['check'].replace('|', chr(92) + '|')} |" in table for x in lines)
    bench_lines = [json.loads(x) for x in (tmp_path / "bench.jsonl").read_text().splitlines()]  # bench.py's own
    got = {(x["method"], x["ctx"]): x for x in bench_lines}
    assert set(got) == {(m, c) for m in ("comet", "full", "ceiling", "comet/ceiling") for c in (256, 512, 1024)} | {
        ("train", 256)}
    for x in bench_lines:  # every line says where, in what and how it measured
        assert x["device"] == "cpu" and x["device_name"] == lines[0]["device_name"] and x["dtype"] == "float32"
        if x["method"] != "comet/ceiling":
            assert x["status"] == "ok" and x["tokens_per_s"] > 0 and x["peak_mib"] > 100 and x["mfu"] is None
    assert got["train", 256]["batch"] == 2 and got["train", 256]["compiled"] is False
    for key in ("vs_comet_8k", "raw", "adjusted_rows", "adjusted_flops"):  # [median, min, max] of per-piece ratios
        median, low, high = got["comet/ceiling", 1024][key]
        assert 0 < low <= median <= high
    ratio = got["comet/ceiling", 1024]
    assert abs(ratio["adjusted_flops"][0] - ratio["raw"][0] / ratio["flops_factor"]) < 5e-3  # rounding only


def bench_line(method, ctx, **fields):
    return dict(method=method, ctx=ctx, status="ok", **fields)


@pytest.mark.parametrize("full_seconds, verdict", [(29.9, "missed"), (30.0, "met")])
def test_the_speed_goal_is_30x_full_attention_at_the_longest_context(full_seconds, verdict):
    lines = [bench_line("comet", 8192, seconds=0.1, peak_mib=100), bench_line("full", 8192, seconds=0.1, peak_mib=100),
             bench_line("comet", 2**20, seconds=1.0, peak_mib=100),
             bench_line("full", 2**20, seconds=full_seconds, peak_mib=2000)]
    checks = {c["check"]: c for c in gpu_check.speed_checks(lines)}
    assert checks["CoMeT vs full attention at 1,048,576 tokens: time"]["status"] == verdict
    assert checks["CoMeT vs full attention at 1,048,576 tokens: peak memory"]["status"] == "met"  # 20x


def test_a_measuring_process_that_died_is_reported_not_compared():
    lines = [bench_line("comet", 2**20, seconds=1.0, peak_mib=100, tokens_per_s=2**20),
             dict(method="full", status="died", note="the measuring process exited with 1")]  # no ctx
    (check,) = gpu_check.speed_checks(lines)
    assert check["status"] == "info" and check["measured"] == "full attention: not measured"
    assert "| comet, tokens/s |" in gpu_check.bench_table(lines)


def test_full_attention_out_of_memory_is_reported_not_compared():
    lines = [bench_line("comet", 2**20, seconds=1.0, peak_mib=100),
             dict(method="full", ctx=2**20, status="oom", note="out of memory at 1,048,576 tokens")]
    (check,) = gpu_check.speed_checks(lines)
    assert check["status"] == "info" and "out of memory" in check["measured"]


@pytest.mark.parametrize("mfu, verdict", [(0.399, "missed"), (0.4, "met"), (None, "info")])
def test_the_mfu_goal_is_40_percent(mfu, verdict):
    line = bench_line("train", 8192, batch=4, compiled=True, dtype="bfloat16", tokens_per_s=1e5, mfu=mfu)
    (check,) = gpu_check.mfu_checks([line])
    assert check["status"] == verdict and check["check"] == "training step MFU, bfloat16, compiled"


def test_the_gpu_command_lines_are_settings_bench_and_the_check_accept():
    """What runs on the GPU cannot be run here; its command lines at least parse, with no unknown setting."""
    for name, cmd in gpu_check.commands(False, "out/x").items():
        script = bench if cmd[1] == "bench.py" else gpu_check
        args = cmd[2:] if cmd[1] == "bench.py" else cmd[3:]
        assert configure(settings_of(vars(script)), args), name


def run_fake_sections(monkeypatch, tmp_path, cmds: dict, timeout: float = 60):
    monkeypatch.setattr(gpu_check, "commands", lambda dry, out: cmds)
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--dry_run", f"--sections={','.join(cmds)}",
                                      f"--out_dir={tmp_path}"])
    monkeypatch.setitem(gpu_check.TIMEOUTS, "plan", timeout)
    try:
        gpu_check.main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    return code, [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]


def printing(*records) -> list[str]:
    return [sys.executable, "-c", f"print(chr(10).join({[json.dumps(r) for r in records]!r}))"]


def test_a_failed_correctness_check_makes_the_exit_status_1_and_a_missed_goal_does_not(monkeypatch, tmp_path):
    missed = gpu_check.record("a goal", "missed", "0.5x", ">= 30x")
    failed = gpu_check.record("a check", "FAIL", "wrong")
    code, lines = run_fake_sections(monkeypatch, tmp_path / "a", {"correctness": printing(missed)})
    assert code == 0 and [x["status"] for x in lines] == ["info", "missed"]
    code, lines = run_fake_sections(monkeypatch, tmp_path / "b", {"correctness": printing(missed, failed)})
    assert code == 1 and [x["status"] for x in lines] == ["info", "missed", "FAIL"]


def test_a_section_that_hangs_is_killed_at_its_timeout_keeping_what_it_printed(monkeypatch, tmp_path):
    line = json.dumps(gpu_check.record("first", "pass", "ok"))
    hang = [sys.executable, "-c", f"import time; print({line!r}, flush=True); time.sleep(600)"]
    code, lines = run_fake_sections(monkeypatch, tmp_path, {"plan": hang}, timeout=3)
    assert code == 1 and [(x["check"], x["status"]) for x in lines[1:]] == [("first", "pass"), ("plan section", "error")]
    assert "timed out after 3 s" in lines[-1]["measured"]
