"""The GPU check: CUDA correctness, speed and memory against full attention to 1M tokens, MFU and the memory plan.

    scripts/gpu_check.sh                      # on a CUDA machine: about 6 minutes on one H100, at most time_limit
    scripts/gpu_check.sh --dry_run            # the same sections at tiny shapes on the CPU (the tests run it)
    scripts/gpu_check.sh --sections=bench,mfu # some of them

Sections, each in its own process with a timeout, so that one failure or hang costs only itself:
  correctness   streaming equals the full forward (fp32 and bf16), the chunk layout on the device, Llama parity
                with transformers (fp32 and bf16), a state file written on the device read on the CPU, training
                steps on the device against the CPU's loss curve (fp32) and in bf16
  bench, full   bench.py at the 124m shape, 8k, 128k and 1M tokens: CoMeT's prefill and the chunk ceiling, then
                full attention (apart: the longest step, whose timeout must not cost CoMeT's figures)
  plan          Llama-3.2-1B-shaped training steps with activation checkpointing against plan.py's estimate
  mfu           bench.py's training step, bf16; mfu_compiled: the same with torch.compile
  distributed   with 2 GPUs or more: train.py's pipeline and --dp over NCCL against one process's losses
Every JSON line printed (and kept in out_dir/results.jsonl) names the device; then a Markdown table. Correctness
failures and sections that crash or time out make the exit status 1; speed and memory goals are reported (met
or missed), not enforced. Nothing is downloaded: transformers builds its reference model from a config.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import torch

import bench
from configurator import configure_or_exit, settings_of
from data import get_tokenizer
from llama import load_llama
from model import ModelConfig, Transformer, chunk_layout
from scripts import plan
from stream import load_state, new_stream, save_state, stream

try:  # optional: without it (or if it fails to import) the Llama parity check says it was skipped
    from transformers import LlamaConfig, LlamaForCausalLM
except Exception:
    LlamaForCausalLM = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
START = time.monotonic()  # time_limit counts from here
# -----------------------------------------------------------------------------
dry_run = False           # tiny shapes on the CPU, a minute or two: what the tests run
sections = "correctness,bench,full,plan,mfu,mfu_compiled,distributed"
out_dir = ""              # results.jsonl, bench.jsonl, table.md, log.txt; "" = out/gpu_check-<date>-<time>
time_limit = 540          # seconds for the whole check: a section gets at most what is left, or is skipped
run_section = ""          # (internal) run this one section here and print its JSON lines
# -----------------------------------------------------------------------------
# each section's own time limit in seconds (sized for a GPU; the dry run's sections need under a minute)
TIMEOUTS = dict(correctness=240, bench=150, full=240, plan=180, mfu=120, mfu_compiled=240, distributed=240)
LEAST = dict(mfu_compiled=150)  # a section is skipped with less time left than this (30 s by default)
# correctness: a CoMeT with GQA and flash-sized heads (64), several chunks, a FIFO that evicts
CHECK_MODEL = dict(vocab_size=512, n_layer=3, n_head=4, n_kv_head=2, n_embd=256, chunk_size=64, n_global=16,
                   stride=8, temp_budget=32, adapter_rank=8)
PIECES = (1, 2, 61, 64, 65, 127, 3, 200, 64, 190)  # streamed piece sizes: every kind of chunk boundary (777 tokens)
ENDS = list(itertools.accumulate(PIECES))
TRAIN = ["train.py", "config/smoke.py", "--eval_interval=0"]


def record(check: str, status: str, measured: str, goal: str = "", **numbers) -> dict:
    """One line of the check. status: pass | FAIL (correctness), met | missed (goals), info, skipped, error."""
    return dict(check=check, status=status, measured=measured, goal=goal, **numbers)


def verdict(ok: bool, goal: bool = False) -> str:
    return ("met" if ok else "missed") if goal else ("pass" if ok else "FAIL")


# --- correctness (one process, on the device) -------------------------------------------------------------

def check_model(dev: str) -> Transformer:
    """CHECK_MODEL with seeded weights, its zero-initialised adapters given weight so that they matter."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CHECK_MODEL))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adapter.up.weight"):
                p.normal_(std=0.1)
    return model.to(dev).eval()


@torch.no_grad()
def streamed(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """Next-token logits after each of PIECES streamed in turn (B, pieces, V): at positions ENDS - 1."""
    state, out = new_stream(model, idx.size(0)), []
    for a, b in zip([0, *ENDS], ENDS):
        logits, state = stream(model, idx[:, a:b], state)
        out.append(logits.float())
    return torch.stack(out, 1)


@torch.no_grad()
def check_stream(dev: str) -> Iterator[dict]:
    """Streaming in pieces equals the chunked forward: fp32 to 1e-4 of the logits' scale; bf16 (other kernels on
    CUDA: flash attention, lower-right causal masks) no further from fp32's logits than the bf16 forward is."""
    model = check_model(dev)
    idx = torch.randint(512, (2, sum(PIECES)), generator=torch.Generator().manual_seed(1)).to(dev)
    ref, at = model(idx)[0].float(), [e - 1 for e in ENDS]
    got = streamed(model, idx)
    err, scale = (got - ref[:, at]).abs().max().item(), ref.abs().max().item()
    yield record("streaming = forward, fp32", verdict(err <= 1e-4 * scale), f"max |diff| {err:.2e} (logits up to "
                 f"{scale:.2f})", "<= 1e-4 x max |logit|", error=err, scale=scale)
    half = model.to(torch.bfloat16)
    got16 = streamed(half, idx)
    fwd16 = half(idx)[0].float()[:, at]
    err16, errf = ((got16 - ref[:, at]).abs().mean().item(), (fwd16 - ref[:, at]).abs().mean().item())
    yield record("streaming = forward, bf16", verdict(err16 <= 2 * errf), f"mean |diff| from fp32: streamed "
                 f"{err16:.2e}, forward {errf:.2e}", "streamed <= 2 x forward", streamed=err16, forward=errf)


def check_layout(dev: str) -> dict:
    """The chunk layout (S2) built on the device holds the CPU's rows, for every chunk length, open and closed."""
    cfg, bad = ModelConfig(**CHECK_MODEL), []
    for n in range(1, cfg.chunk_size + 1):
        for closed in (True, False):
            here, cpu = (chunk_layout(n, cfg.stride, cfg.n_global, closed, torch.device(d)) for d in (dev, "cpu"))
            for name in ("order", "tokens", "compression", "readout"):
                a, b = getattr(here, name), getattr(cpu, name)
                if a.device.type != torch.device(dev).type or not torch.equal(a.cpu(), b):
                    bad.append(f"{name} of {n} tokens, closed={closed}")
    return record("chunk layout on the device", verdict(not bad), bad[0] if bad else
                  f"{2 * cfg.chunk_size} layouts x 4 index tensors equal the CPU's", "equal")


@torch.no_grad()
def check_state(dev: str) -> dict:
    """A stream state saved on the device loads on the CPU and continues as the device's state does."""
    model, enc = check_model(dev), get_tokenizer("bytes")
    idx = torch.randint(259, (1, 300), generator=torch.Generator().manual_seed(2)).to(dev)
    _, state = stream(model, idx[:, :250], new_stream(model))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "check.state")
        save_state(path, model, state, enc, 250)
        cpu = copy.deepcopy(model).cpu()
        loaded, _ = load_state(path, cpu, enc)
    want, _ = stream(model, idx[:, 250:], state)
    got, _ = stream(cpu, idx[:, 250:].cpu(), loaded)
    err, scale = (got - want.float().cpu()).abs().max().item(), want.abs().max().item()
    return record("state file: saved on the device, read on the CPU", verdict(err <= 1e-4 * scale),
                  f"next logits after 50 more tokens: max |diff| {err:.2e}", "<= 1e-4 x max |logit|", error=err)


@torch.no_grad()
def check_llama(dev: str) -> Iterator[dict]:
    """llama.load_llama against transformers' LlamaForCausalLM on the same random checkpoint: fp32 to 1e-4 of the
    logits' scale; bf16 no further from transformers' fp32 logits than transformers' own bf16 is, x 1.5."""
    if LlamaForCausalLM is None:
        yield record("Llama parity with transformers", "skipped", "transformers is not installed")
        return
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = LlamaForCausalLM(hf_cfg).eval()
    for name, p in hf.named_parameters():  # weights of a size that makes every part matter (its init is near 0)
        p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    idx = torch.randint(512, (2, 300), generator=torch.Generator().manual_seed(3)).to(dev)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = {dt: load_llama(tmp, dtype=dt, device=dev) for dt in (torch.float32, torch.bfloat16)}
        theirs = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).to(dev).eval()  # RoPE kept fp32
    hf = hf.to(dev)
    ref = hf(idx).logits.float()
    err, scale = (ours[torch.float32](idx)[0] - ref).abs().max().item(), ref.abs().max().item()
    yield record("Llama parity with transformers, fp32", verdict(err <= 1e-4 * scale), f"max |diff| {err:.2e} "
                 f"(logits up to {scale:.1f})", "<= 1e-4 x max |logit|", error=err, scale=scale)
    ours16 = (ours[torch.bfloat16](idx)[0].float() - ref).abs().mean().item()
    theirs16 = (theirs(idx).logits.float() - ref).abs().mean().item()
    yield record("Llama parity with transformers, bf16", verdict(ours16 <= 1.5 * theirs16), f"mean |diff| from "
                 f"fp32: ours {ours16:.3f}, transformers' bf16 {theirs16:.3f}", "ours <= 1.5 x transformers'",
                 ours=ours16, transformers=theirs16)


def train_losses(out: str, *args: str, ranks: int = 0, timeout: float = 240) -> list[float]:
    """Run train.py (config/smoke.py, or under torchrun with `ranks` processes) and return its logged losses."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    r = subprocess.run([*(launcher if ranks else [sys.executable]), *TRAIN, f"--out_dir={out}", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"train.py {' '.join(args)} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def curve_check(check: str, curve: list[float], ref: list[float], rel: float) -> dict:
    """Two loss curves equal to a relative tolerance, step by step; a non-finite loss fails."""
    worst = max((abs(a - b) / abs(b) for a, b in zip(curve, ref)), default=math.inf)
    ok = len(curve) == len(ref) and all(map(math.isfinite, curve)) and worst <= rel
    return record(check, verdict(ok), f"{len(curve)} steps, largest relative difference {worst:.1e}; losses "
                  f"{curve[0]:.3f} -> {curve[-1]:.3f}" if curve else "no steps", f"<= {rel:g}", worst=worst)


def check_training(dev: str) -> Iterator[dict]:
    """train.py on the device: fp32 follows the CPU's loss curve, bf16 autocast follows fp32's."""
    with tempfile.TemporaryDirectory() as tmp:
        steps = "--max_iters=10" if dev != "cpu" else "--max_iters=4"  # the dry run: a few
        cpu = train_losses(os.path.join(tmp, "cpu"), steps, "--device=cpu")
        if dev == "cpu":
            yield record("training on the device, fp32 = CPU", "skipped", "the dry run's device is the CPU")
            fp32 = cpu
        else:
            fp32 = train_losses(os.path.join(tmp, "fp32"), steps, "--device=cuda", "--dtype=float32")
            yield curve_check("training on the device, fp32 = CPU", fp32, cpu, 1e-3)
        bf16 = train_losses(os.path.join(tmp, "bf16"), steps, f"--device={dev}", "--dtype=bfloat16")
        yield curve_check("training steps in bf16 autocast = fp32", bf16, fp32, 2e-2)


def section_correctness(dev: str) -> Iterator[dict]:
    for check in (check_stream, check_layout, check_state, check_llama, check_training):
        try:
            out = check(dev)
            yield from ([out] if isinstance(out, dict) else out)
        except Exception as e:  # one check's crash is its own failure; the others still run
            yield record(check.__name__, "error", f"{type(e).__name__}: {str(e)[:300]}")


# --- the plan and a measured step ---------------------------------------------------------------------------

def section_plan(dev: str) -> Iterator[dict]:
    """CUDA: Llama-3.2-1B-shaped steps (plan.py's chunk and memory settings, activation checkpointing, batch 1),
    frozen base and full fine-tune, each at 32k tokens or the longest of 16k, 8k whose plan fits 90% of the GPU's
    free memory (and that runs), against the plan's peak. CPU: plan.py's tiny shape at 1,024 tokens x 2, the live tensors of a profiled fp32 step."""
    settings = settings_of(vars(plan))  # its defaults: chunk 2048, 64 global slots, a FIFO of 512, stride 8
    if dev == "cpu":
        cfg = plan.model_config("tiny", {**settings, "chunk_size": 64, "n_global": 16, "temp_budget": 32})
        want = plan.make_plan(cfg, 512, 2, 1, 1, 4, False, False)
        _, _, live = plan.measure_step(cfg, 512, 2, False, False)
        held = want.peak - want.parameters - want.optimizer
        yield record("plan vs a measured step: tiny, 512 tokens x 2 (CPU, fp32, live tensors)",
                     verdict(abs(held / live - 1) <= 0.1, goal=True), f"{live / GIB:.3f} GiB measured, plan "
                     f"{held / GIB:.3f} ({held / live - 1:+.1%})", "within 10%", measured_bytes=live, plan_bytes=held)
        return
    cfg, free = plan.model_config("Llama-3.2-1B", settings), 0.9 * torch.cuda.mem_get_info()[0]
    peak_flops = next((v for k, v in bench.PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None)
    for frozen in (True, False):
        what, measured = "frozen base" if frozen else "full fine-tune", None
        for ctx in (c for c in (32768, 16384, 8192) if plan.make_plan(cfg, c, 1, 1, 1, 2, frozen, True).peak <= free):
            try:
                measured = ctx, *plan.measure_cuda_step(cfg, ctx, 1, frozen, True)
            except torch.cuda.OutOfMemoryError:
                yield record(f"Llama-3.2-1B, {what}, {ctx:,} tokens", "info", "out of memory; the plan said "
                             f"{plan.make_plan(cfg, ctx, 1, 1, 1, 2, frozen, True).peak / GIB:.2f} GiB: a shorter one")
            gc.collect()  # what the step held, a failed one's frames too, goes back before the next
            torch.cuda.empty_cache()
            if measured:
                break
        if not measured:
            yield record(f"plan vs a measured step: Llama-3.2-1B, {what}", "missed", "no context of 32k, 16k or "
                         "8k tokens fits, as planned, or as run", "within 10%")
            continue
        ctx, peak, seconds = measured
        want = plan.make_plan(cfg, ctx, 1, 1, 1, 2, frozen, True)
        flops = 3 * bench.flops_per_token(cfg, "train", ctx) * ctx  # a full fine-tune's: forward and 2x backward
        mfu = f", MFU {flops / seconds / peak_flops:.1%}" if peak_flops and not frozen else ""
        yield record(f"plan vs a measured step: Llama-3.2-1B, {what}, {ctx:,} tokens, checkpointed",
                     verdict(abs(want.peak / peak - 1) <= 0.1, True), f"{peak / GIB:.2f} GiB measured, plan "
                     f"{want.peak / GIB:.2f} ({want.peak / peak - 1:+.1%}); {seconds:.2f} s a step, "
                     f"{ctx / seconds:,.0f} tok/s{mfu}", "within 10%", measured_bytes=peak, plan_bytes=want.peak,
                     seconds=seconds)


def section_distributed(dev: str) -> Iterator[dict]:
    """train.py's pipeline (2 ranks) and --dp=2 against one process reading the same rows: bf16 on 2 GPUs over
    NCCL; the dry run: fp32 on CPU ranks over gloo."""
    args, rel = (["--device=cuda", "--dtype=bfloat16", "--max_iters=6"], 2e-2) if dev != "cpu" else \
        (["--device=cpu", "--max_iters=3"], 1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        one = train_losses(os.path.join(tmp, "one"), "--batch_size=4", *args)
        pp = train_losses(os.path.join(tmp, "pp"), "--batch_size=4", "--pipeline=True", *args, ranks=2)
        yield curve_check("pipeline, 2 ranks = one process", pp, one, rel)
        dp = train_losses(os.path.join(tmp, "dp"), "--batch_size=2", "--dp=2", *args, ranks=2)
        yield curve_check("--dp=2 (FSDP2) = one process", dp, one, rel)


CHILDREN = dict(correctness=section_correctness, plan=section_plan, distributed=section_distributed)


# --- bench.py's lines, read as checks ----------------------------------------------------------------------

def speed_checks(lines: list[dict]) -> list[dict]:
    """The goals at the longest context CoMeT measured: >= 30x faster and >= 20x less peak memory than full
    attention, >= 0.8x the chunk ceiling (adjusted for the rows CoMeT adds, as docs/benchmarks.md explains)."""
    ok = {(r["method"], r["ctx"]): r for r in lines if r.get("status") == "ok"}
    out, longest = [], max((c for m, c in ok if m == "comet"), default=None)
    if longest is None:
        return out
    comet, full, at = ok[("comet", longest)], ok.get(("full", longest)), f"{longest:,} tokens"
    if full:
        speed, memory = full["seconds"] / comet["seconds"], full["peak_mib"] / comet["peak_mib"]
        out.append(record(f"CoMeT vs full attention at {at}: time", verdict(speed >= 30, True), f"{speed:.1f}x "
                          f"({full['seconds']:.2f} s vs {comet['seconds']:.2f} s)", ">= 30x", ratio=speed))
        out.append(record(f"CoMeT vs full attention at {at}: peak memory", verdict(memory >= 20, True),
                          f"{memory:.1f}x ({full['peak_mib'] / 1024:.2f} GiB vs {comet['peak_mib'] / 1024:.2f} GiB)",
                          ">= 20x", ratio=memory))
    else:
        why = next((r.get("note", r["status"]) for r in lines if r["method"] == "full" and r.get("ctx") == longest),
                   "not measured")
        out.append(record(f"CoMeT vs full attention at {at}", "info", f"full attention: {why}"))
    ceiling = ok.get(("comet/ceiling", longest))
    if ceiling:
        adj, raw, flops = ceiling["adjusted_rows"][0], ceiling["raw"][0], ceiling["adjusted_flops"][0]
        out.append(record(f"CoMeT prefill vs the chunk ceiling at {at}", verdict(adj >= 0.8, True),
                          f"{adj:.2f}x adjusted for rows (raw {raw:.2f}x, for FLOPs {flops:.2f}x)",
                          ">= 0.8x, adjusted for rows", ratio=adj))
    return out


def mfu_checks(lines: list[dict]) -> list[dict]:
    """Each training step bench.py measured: its MFU, >= 40% in bf16 on a GPU of known peak."""
    out = []
    for r in (r for r in lines if r["method"] == "train"):
        name = f"training step MFU, {r.get('dtype')}{', compiled' if r.get('compiled') else ''}"
        if r.get("status") != "ok":
            out.append(record(name, "error", r.get("note", r["status"])))
        elif r.get("mfu") is None:
            out.append(record(name, "info", f"{r['tokens_per_s']:,.0f} tok/s; MFU needs a CUDA GPU of known bf16 "
                              "peak"))
        else:
            out.append(record(name, verdict(r["mfu"] >= 0.4, True), f"{r['mfu']:.1%} ({r['tokens_per_s']:,.0f} "
                              f"tok/s, {r['ctx']:,} tokens x {r.get('batch')})", ">= 40%", mfu=r["mfu"]))
    return out


def bench_table(lines: list[dict]) -> str:
    """Markdown: tokens/s and peak memory of every method at every context bench.py measured."""
    rows = [r for r in lines if r.get("method") in ("comet", "full", "ceiling") and "ctx" in r]
    ctxs = sorted({r["ctx"] for r in rows})
    table = ["| method | " + " | ".join(f"{c:,} tokens" for c in ctxs) + " |", "|---" * (len(ctxs) + 1) + "|"]
    for method in ("comet", "full", "ceiling"):
        cells = {r["ctx"]: r for r in rows if r["method"] == method}
        for what, show in (("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
                           ("peak GiB", lambda r: f"{r['peak_mib'] / 1024:.2f}")):
            table.append(f"| {method}, {what} | " + " | ".join(
                show(cells[c]) if cells.get(c, {}).get("status") == "ok" else cells.get(c, {}).get("status", "-")
                for c in ctxs) + " |")
    return "\n".join(table)


def checks_table(records: list[dict]) -> str:
    lines = ["| section | check | measured | goal | status |", "|---|---|---|---|---|"]
    for r in records:
        cell = lambda s: str(s).replace("|", "\\|")
        lines.append(f"| {r['section']} | {cell(r['check'])} | {cell(r['measured'])} | {cell(r['goal'])} | "
                     f"{r['status']} |")
    return "\n".join(lines)


# --- the parent: every section in its own process ----------------------------------------------------------

def commands(dry: bool, out: str) -> dict[str, list[str]]:
    """Each section's command line. The dry run: bench.py's tiny shape on CPU, 256 to 1,024 tokens standing for
    8k to 1M. bench.py appends its lines to out/bench.jsonl as it measures them."""
    me = [sys.executable, "-m", "scripts.gpu_check", f"--dry_run={dry}"]
    if dry:
        shape = ["--shape=tiny", "--device=cpu", "--lengths=256,512,1024", "--repeats=1", "--piece=256"]
        train = ["--shape=tiny", "--device=cpu", "--train_len=256", "--batch=2", "--repeats=1"]
    else:
        shape = ["--shape=124m", "--device=cuda", "--dtype=bfloat16", "--lengths=8192,131072,1048576", "--repeats=2"]
        train = ["--shape=124m", "--device=cuda", "--dtype=bfloat16", "--train_len=8192", "--batch=4", "--repeats=2"]
    bench_py = [sys.executable, "bench.py", f"--json={os.path.join(out, 'bench.jsonl')}"]
    cmds = {name: [*me, f"--run_section={name}"] for name in CHILDREN}
    cmds.update(bench=[*bench_py, "--methods=comet,ceiling", *shape], full=[*bench_py, "--methods=full", *shape],
                mfu=[*bench_py, "--methods=train", *train], mfu_compiled=[*bench_py, "--methods=train", *train,
                                                                           "--compile"])
    return cmds


def not_here(section: str, dry: bool) -> str:
    """Why a section does not run on this machine, or ''."""
    if dry and section == "mfu_compiled":
        return "the dry run compiles nothing (a minute on 2 CPU cores)"
    if not dry and section == "distributed" and torch.cuda.device_count() < 2:
        return f"{torch.cuda.device_count()} GPU: the pipeline and --dp over NCCL need 2"
    return ""


def run(cmd: list[str], timeout: float, log) -> tuple[list[dict], str]:
    """Run a section's command in its own process group; its JSON lines, and '' or why it failed. Killed, with
    its children, after `timeout` seconds; what it printed until then is kept."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, process_group=0)
    try:
        out, failed = proc.communicate(timeout=timeout)[0], ""
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, failed = proc.communicate()[0], f"timed out after {timeout:.0f} s"
    lines = []
    for line in out.splitlines():
        with contextlib.suppress(ValueError):  # anything else a section printed stays out of the results
            lines.append(json.loads(line))
    lines = [x for x in lines if isinstance(x, dict)]
    return lines, failed or (f"exited with {proc.returncode} (see log.txt)" if proc.returncode else "")


def machine(dev: str) -> tuple[str, dict]:
    """The device's name (every line carries it) and the check's first line: what ran it. CUDA's name is asked in
    another process: a context here would hold GPU memory that the sections need."""
    if dev == "cpu":
        name = bench.device_name("cpu")
    else:
        name = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                              capture_output=True, text=True, timeout=120).stdout.strip() or "an unnamed GPU"
    cuda = f", CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if dev == "cuda" else ""
    return name, record("machine", "info", f"{name}; torch {torch.__version__}{cuda}")


def run_sections(todo: list[str], dev: str, cfg: dict, emit, log) -> None:
    """Every section in turn, each within its own timeout and what is left of time_limit; emit(section, record)
    each line. The speed goals are read once CoMeT's and full attention's runs are both done."""
    cmds, bench_file = commands(dev == "cpu", cfg["out_dir"]), os.path.join(cfg["out_dir"], "bench.jsonl")
    last_speed = max((todo.index(s) for s in ("bench", "full") if s in todo), default=-1)
    for i, section in enumerate(todo):
        left = cfg["time_limit"] - (time.monotonic() - START)
        why = not_here(section, dev == "cpu") or (f"{left:.0f} s left of time_limit={cfg['time_limit']}"
                                                  if left < LEAST.get(section, 30) else "")
        if why:
            emit(section, record(section, "skipped", why))
        else:
            timeout = min(left, TIMEOUTS[section])
            print(f"--- {section} (at most {timeout:.0f} s)", file=sys.stderr, flush=True)
            log.write(f"\n--- {section}: {' '.join(cmds[section])}\n")
            log.flush()
            t0 = time.monotonic()
            lines, failed = run(cmds[section], timeout, log)
            print(f"--- {section}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
            for r in mfu_checks(lines) if section.startswith("mfu") else [] if section in ("bench", "full") else lines:
                emit(section, r)
            if failed:
                emit(section, record(f"{section} section", "error", failed))
        if i == last_speed:
            for r in speed_checks(read_lines(bench_file)):
                emit("bench", r)


def read_lines(path: str) -> list[dict]:
    """The JSON lines of a file (bench.py's), [] if there is none yet."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_table(out: str, name: str, records: list[dict]) -> str:
    """table.md: the checks, then bench.py's measurements by method and context; returns the text."""
    lines = read_lines(os.path.join(out, "bench.jsonl"))
    table = f"{name}\n\n{checks_table(records)}\n" + (f"\n{bench_table(lines)}\n" if lines else "")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    return table


def main() -> None:
    cfg = configure_or_exit(settings_of(globals()))
    dev = "cpu" if cfg["dry_run"] else "cuda"
    if cfg["run_section"]:  # a child: one section's JSON lines, as they come
        for r in CHILDREN[cfg["run_section"]](dev):
            print(json.dumps(r), flush=True)
        return
    todo = [s for s in cfg["sections"].split(",") if s]
    unknown = sorted(set(todo) - set(TIMEOUTS))
    if unknown or not todo:
        sys.exit(f"error: sections: unknown {','.join(unknown) or '(none given)'}; use {','.join(TIMEOUTS)}")
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("error: torch sees no CUDA device: run the check on a GPU machine, or --dry_run on this one")
    out = cfg["out_dir"] = cfg["out_dir"] or os.path.join(ROOT, "out", time.strftime("gpu_check-%Y%m%d-%H%M%S"))
    if any(os.path.exists(os.path.join(out, f)) for f in ("results.jsonl", "bench.jsonl", "table.md", "log.txt")):
        sys.exit(f"error: {out} holds an earlier check's results: choose another --out_dir")
    os.makedirs(out, exist_ok=True)
    name, first = machine(dev)
    records = []
    with open(os.path.join(out, "results.jsonl"), "w") as res, open(os.path.join(out, "log.txt"), "w") as log:
        def emit(section: str, r: dict) -> None:  # every line names the device; kept as it comes
            r = dict(section=section, device_name=name, **r)
            records.append(r)
            print(json.dumps(r), flush=True)
            res.write(json.dumps(r) + "\n")
            res.flush()
            write_table(out, name, records)

        emit("machine", first)
        run_sections(todo, dev, cfg, emit, log)
    print(f"\n{write_table(out, name, records)}\nwritten to {out}", flush=True)
    if any(r["status"] in ("FAIL", "error") for r in records):
        sys.exit(1)


if __name__ == "__main__":
    main()
