"""Speed and memory of CoMeT next to full attention, in one run; one JSON line per measurement.

    python bench.py                                      # tiny shape on CPU, 8k to 1M tokens
    python bench.py --shape=124m --device=cuda --lengths=8192,131072,1048576 --json=out/bench.jsonl

Methods, all with the same base weights:
  comet    streaming prefill through the memories (S6), batch 1, `piece` tokens per call
  full     the plain decoder (full causal attention, SDPA) prefilling with a growing KV cache
  ceiling  the plain decoder on back-to-back chunk-length inputs: what any chunked model can at best reach
  train    one CoMeT training step (forward + backward + AdamW) on `train_len` tokens
Peak memory is CUDA's max_memory_allocated, or on CPU the process's peak RSS since the measurement
began (/proc/self/clear_refs resets it). A method that runs out of memory says so and stops there.
"""
from __future__ import annotations

import json as jsonlib
import math
import multiprocessing as mp
import os
import platform
import queue
import statistics
import time
from dataclasses import replace

import torch
from tqdm import tqdm

from checkpoint import append_line, write_atomically
from configurator import (JSON_LINES, PNG, check_output, configure_or_exit, parse_list, peak_memory_mib, pick_device,
                          pick_dtype, reset_peak_memory, settings_of)
from model import ModelConfig, Transformer
from stream import new_stream, stream

SHAPES = {  # "124m": GPT-2 small's size as a Llama (SwiGLU 8/3 d); CoMeT as the paper's run (docs/design.md S5), chunk 2048
    "tiny": dict(vocab_size=259, n_layer=4, n_head=4, n_embd=128, ffn_hidden=320,
                 chunk_size=64, n_global=16, stride=8, temp_budget=32),
    "124m": dict(vocab_size=50304, n_layer=12, n_head=12, n_embd=768, ffn_hidden=2048,
                 chunk_size=2048, n_global=512, stride=8, temp_budget=2048),
}
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, for MFU
# -----------------------------------------------------------------------------
shape = "tiny"            # tiny (train.py's default model) | 124m
lengths = "8192,65536,1048576"  # context lengths, comma-separated
methods = "comet,full,ceiling,train"
full_max = 0              # longest context for full attention; 0: 65536 on CPU (quadratic time), no limit on CUDA
piece = 8192              # comet: tokens per stream() call (any value gives the same result)
full_piece = 4096         # full: tokens per prefill step
train_len = 8192          # train: tokens per sequence
batch = 1                 # train: sequences per step
repeats = 3               # contexts up to 65536 are measured this many times; the fastest counts
device = "auto"           # auto | cpu | cuda
dtype = "auto"            # auto (bfloat16 on a CUDA device that has it, else float32) | float32 | bfloat16
compile = False           # torch.compile every decoder block
threads = 0               # torch CPU threads; 0 = torch's default
seed = 0
json = ""                 # also append the lines to this file
png = ""                  # plot tokens/s and peak memory against context length (needs matplotlib)
# -----------------------------------------------------------------------------


def block_flops(cfg: ModelConfig, rows: int, kv_rows: int, pairs: float) -> float:
    """Forward FLOPs of one layer: `rows` full rows, `kv_rows` rows that only need keys and values
    (CoMeT's memory prefix), `pairs` query-key pairs of attention."""
    hs, d = cfg.head_dim, cfg.n_embd
    qo, kv, ffn = 2 * d * cfg.n_head * hs, 2 * d * cfg.n_kv_head * hs, 3 * d * cfg.ffn_hidden
    return 2 * (rows * (qo + kv + ffn) + kv_rows * kv) + 4 * pairs * cfg.n_head * hs


def flops_per_token(cfg: ModelConfig, method: str, ctx: int) -> float:
    """Forward FLOPs per real token over a context of ctx tokens (decoder layers; the output head only where
    every token needs it). CoMeT: chunk by chunk, with the memories as large as they are by then (S2)."""
    c, L = cfg.chunk_size, cfg.n_layer
    if method == "full":
        return L * block_flops(cfg, 1, 0, ctx / 2)
    if method == "ceiling":
        return L * block_flops(cfg, c, 0, c * (c + 1) / 2) / c
    rows, n_chunks = c + cfg.n_compression + cfg.n_global, max(1, ctx // c)
    prefixes = [sum(cfg.memory_slots(i)) for i in range(n_chunks)]  # [G; T] before chunk i: filling at first
    total = sum(block_flops(cfg, rows, p, rows * p + rows * (rows + 1) / 2) for p in prefixes)
    return L * total / (n_chunks * c) + (2 * cfg.n_embd * cfg.vocab_size if method == "train" else 0)


def device_name(dev: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor a measurement ran on: speeds from two machines (or two VMs of one name) don't compare."""
    if dev.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(dev))
    try:
        with open(cpuinfo) as f:  # Linux; platform.processor() there says only "x86_64"
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # ours, not the host's
    return f"{model or platform.processor() or platform.machine()}, {cores} logical cores"


def random_tokens(cfg: ModelConfig, n: int, dev: str, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(cfg.vocab_size, (1, n), generator=gen).to(dev)


@torch.no_grad()
def run_comet(model: Transformer, ctx: int, dev: str, gen: torch.Generator, between=None) -> list[float]:
    """Stream ctx tokens; returns the seconds of every piece. between(): called after every piece, untimed."""
    state, seconds = new_stream(model, 1), []
    for a in tqdm(range(0, ctx, piece), desc=f"comet {ctx:,}", leave=False, disable=ctx <= piece):
        ids = random_tokens(model.config, min(piece, ctx - a), dev, gen)
        t0 = time.perf_counter()
        _, state = stream(model, ids, state)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        if between:
            between()
    return seconds


@torch.no_grad()
def run_full(plain: Transformer, ctx: int, dev: str, gen: torch.Generator) -> None:
    """Prefill with a KV cache, full_piece tokens at a time. Layer by layer, each layer's longer keys/values replace
    its old ones at once: one cache in memory (and a layer's copy), not the old and the new whole."""
    cache = [None] * plain.config.n_layer  # per layer (k, v) of everything so far
    for a in tqdm(range(0, ctx, full_piece), desc=f"full {ctx:,}", leave=False, disable=ctx <= 8 * full_piece):
        h = plain.tok_embeddings(random_tokens(plain.config, min(full_piece, ctx - a), dev, gen))
        rope = plain.rope_at(range(a, a + h.size(1)))
        for l, block in enumerate(plain.layers):
            h, cache[l] = block(h, rope, cache[l])
        plain.output(plain.norm(h[:, -1]))


@torch.no_grad()
def run_ceiling(plain: Transformer, ctx: int, dev: str, gen: torch.Generator, chunk: int) -> None:
    for a in range(0, ctx, chunk):
        h, _ = plain.run_blocks(plain.tok_embeddings(random_tokens(plain.config, min(chunk, ctx - a), dev, gen)))
        plain.output(plain.norm(h[:, -1]))


def run_train(model: Transformer, optimizer, ctx: int, dev: str, gen: torch.Generator, autocast) -> None:
    idx = torch.randint(model.config.vocab_size, (batch, ctx), generator=gen).to(dev)
    with autocast:
        _, loss = model(idx, targets=idx)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build_net(cfg: ModelConfig, method: str, dev: str, wdtype: torch.dtype, longest_full: int) -> Transformer:
    """The model one method measures, from the same seeded weights in every process: CoMeT (inference in the
    benchmark dtype; training in fp32 weights + autocast), or its base without memories (full, ceiling)."""
    torch.manual_seed(seed)  # every process builds the same weights
    model = Transformer(cfg)
    if method in ("full", "ceiling"):  # the same base weights without memories
        ctx_max = max(int(x) for x in lengths.split(","))
        longest = min(longest_full, ctx_max) if method == "full" else cfg.chunk_size  # the RoPE table it needs
        net = Transformer(replace(cfg, chunk_size=0, block_size=max(longest, cfg.chunk_size)))
        net.load_state_dict({k: v for k, v in model.state_dict().items() if not model.is_memory_param(k)})
        net = net.to(dev, wdtype)
    else:
        net = model.to(dev) if method == "train" else model.to(dev, wdtype).eval()
    if compile:
        for block in net.layers:
            block.compile(dynamic=True)
    return net


def measure(settings: dict, method: str, results) -> None:
    """Every context of one method, in a fresh process: its peak memory owes nothing to another method."""
    globals().update(settings)
    dev = pick_device(device)
    cuda = dev.startswith("cuda")
    torch.set_num_threads(threads or torch.get_num_threads())
    wdtype = pick_dtype(dtype, dev)
    use_bf16 = wdtype == torch.bfloat16
    machine = device_name(dev)  # here, not in main: CUDA is initialised only in the measuring processes

    def put(record: dict) -> None:  # every line says the device and dtype this process measured in
        results.put({"device_name": machine, "dtype": str(wdtype).removeprefix("torch."), **record})

    cfg = ModelConfig(**SHAPES[shape])
    longest_full = full_max or (10**12 if cuda else 65536)
    net = build_net(cfg, method, dev, wdtype, longest_full)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=cuda) if method == "train" else None
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=use_bf16)
    peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in machine), None) if use_bf16 and cuda else None
    run = {"comet": lambda n, g: run_comet(net, n, dev, g), "full": lambda n, g: run_full(net, n, dev, g),
           "ceiling": lambda n, g: run_ceiling(net, n, dev, g, cfg.chunk_size),
           "train": lambda n, g: run_train(net, optimizer, n, dev, g, autocast)}[method]
    # comet: this machine's speed drifts by 2x within minutes. So around every piece of every CoMeT run,
    # CoMeT on a fresh stream of one piece (`piece` tokens, 8,192 by default) and the ceiling on as many (its speed does not depend on
    # the length) are timed too; each piece's speed is divided by the mean of the runs before and after it.
    calib: list[tuple[float, float]] = []

    def calibrate() -> None:
        g, n = torch.Generator().manual_seed(seed), piece
        comet_8k = n / sum(run_comet(net, n, dev, g))
        t0 = time.perf_counter()
        run_ceiling(net, n, dev, g, cfg.chunk_size)  # the same weights: the CoMeT model's plain blocks
        if cuda:
            torch.cuda.synchronize()
        calib.append((comet_8k, n / (time.perf_counter() - t0)))

    stopped = ""
    for i, ctx in enumerate([train_len] if method == "train" else [int(x) for x in lengths.split(",")]):
        if stopped or (method == "full" and ctx > longest_full):
            put(dict(method=method, ctx=ctx, status="skipped",
                     note=stopped or f"beyond full_max={longest_full} (quadratic time)"))
            continue
        gen = torch.Generator().manual_seed(seed)
        try:
            if i == 0:  # first calls: allocator, kernels, optimizer state, compilation
                run(ctx if method == "train" else min(ctx, 8 * cfg.chunk_size), gen)
            best, peak, start, paired = math.inf, 0.0, 0.0, {"vs_comet_8k": [], "vs_ceiling": []}
            for _ in range(repeats if ctx <= 65536 else 1):
                if method == "comet":
                    calib.clear()
                    calibrate()
                start = max(start, reset_peak_memory(dev))
                t0 = time.perf_counter()
                if method == "comet":
                    pieces = run_comet(net, ctx, dev, gen, between=calibrate)
                    took = sum(pieces)
                    for k, t in enumerate(pieces):  # piece k sits between calibrations k and k+1
                        n = min(piece, ctx - k * piece)
                        for j, key in enumerate(paired):
                            paired[key].append(n / t / ((calib[k][j] + calib[k + 1][j]) / 2))
                else:
                    run(ctx, gen)
                    if cuda:
                        torch.cuda.synchronize()
                    took = time.perf_counter() - t0
                best, peak = min(best, took), max(peak, peak_memory_mib(dev))
        except torch.cuda.OutOfMemoryError:  # the same class as torch.OutOfMemoryError on torch >= 2.5
            stopped = f"out of memory at {ctx:,} tokens"
            put(dict(method=method, ctx=ctx, status="oom", note=stopped))
            torch.cuda.empty_cache()
            continue
        tokens = ctx * (batch if method == "train" else 1)
        flops = flops_per_token(cfg, method, ctx) * (3 if method == "train" else 1)
        record = dict(method=method, ctx=ctx, **({"batch": batch, "compiled": compile} if method == "train" else {}),
                      status="ok", seconds=round(best, 4), tokens_per_s=round(tokens / best, 1),
                      peak_mib=round(peak, 1), start_mib=round(start, 1),
                      mfu=round(flops * tokens / best / peak_flops, 4) if peak_flops else None)
        for key, ratios in paired.items():  # median and range over every piece of every repeat
            if ratios:
                record[key] = [round(x, 3) for x in (statistics.median(ratios), min(ratios), max(ratios))]
        put(record)


def main() -> None:
    settings = configure_or_exit(settings_of(globals()))
    try:
        if settings["shape"] not in SHAPES:
            raise ValueError(f"shape={settings['shape']!r} must be one of {', '.join(SHAPES)}")
        ctxs = parse_list("lengths", settings["lengths"])
        todo = [m for m in settings["methods"].split(",") if m]
        unknown = sorted(set(todo) - {"comet", "full", "ceiling", "train"})
        if unknown or not todo:
            raise ValueError(f"methods: unknown {','.join(unknown) or '(none given)'}; use comet,full,ceiling,train")
        if min(ctxs) <= 0:  # single numbers: configurator.RULES
            raise ValueError(f"lengths={settings['lengths']!r} must be positive token counts")
        pick_device(settings["device"])
        pick_dtype(settings["dtype"], "cpu")  # auto, float32 or bfloat16; each measuring process picks its own
        for setting, kind in (("json", JSON_LINES), ("png", PNG)):  # bench lines are added to a file of bench lines
            if settings[setting]:
                check_output(settings[setting], f"--{setting}", kind)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    cfg, dev = ModelConfig(**SHAPES[settings["shape"]]), pick_device(settings["device"])
    name = f"{settings['shape']} (L{cfg.n_layer} d{cfg.n_embd} V{cfg.vocab_size}, chunk {cfg.chunk_size})"
    results = []
    machine = {"name": ""}  # as the measuring processes report it; the summary's lines repeat it

    def emit(**record) -> None:
        machine["name"] = record.pop("device_name", machine["name"])
        line = jsonlib.dumps(dict(shape=name, device=dev, device_name=machine["name"], **record))
        print(line, flush=True)
        results.append(record)
        if settings["json"]:
            append_line(settings["json"], line)

    # NOTE: measuring processes keep the memory they free (glibc): on a VM that reclaims freed pages,
    # faulting them back in made identical full-attention runs differ by up to 5x
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**30))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**40))
    ctx_, died = mp.get_context("spawn"), False
    for method in todo:
        reports = ctx_.Queue()
        proc = ctx_.Process(target=measure, args=(settings, method, reports))
        proc.start()
        while proc.is_alive() or not reports.empty():
            try:
                emit(**reports.get(timeout=1.0))
            except queue.Empty:
                pass
        if proc.exitcode:  # e.g. killed by the kernel when the machine's memory ran out
            emit(method=method, status="died", note=f"the measuring process exited with {proc.exitcode}")
            died = True
    summary(results, cfg, emit)
    if settings["png"]:
        plot(results, name, settings["png"])
    if died:
        raise SystemExit("error: a measuring process died (see its traceback above)")


def summary(results: list[dict], cfg: ModelConfig, emit) -> None:
    """For every CoMeT measurement: its speed over CoMeT's on fresh one-piece streams (`piece` tokens) timed around
    each piece (constant time per token: ~1), and over the ceiling's, raw and adjusted for the rows (or FLOPs)
    that CoMeT adds per chunk. Medians [and ranges] of the per-piece ratios."""
    c = cfg.chunk_size
    rows = c / (c + cfg.n_compression + cfg.n_global)  # share of a chunk's rows that are real tokens
    for r in results:
        if r["method"] != "comet" or r.get("status") != "ok":
            continue
        work = flops_per_token(cfg, "ceiling", r["ctx"]) / flops_per_token(cfg, "comet", r["ctx"])  # FLOP share
        raw = r["vs_ceiling"]
        emit(method="comet/ceiling", ctx=r["ctx"], dtype=r["dtype"], status="ok", vs_comet_8k=r["vs_comet_8k"], raw=raw,
             rows_factor=round(rows, 3), flops_factor=round(work, 3),
             adjusted_rows=[round(x / rows, 3) for x in raw], adjusted_flops=[round(x / work, 3) for x in raw])


def plot(results: list[dict], name: str, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --png needs matplotlib (pip install matplotlib)")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in ("comet", "full", "ceiling"):
        rs = [r for r in results if r["method"] == method and r.get("status") == "ok"]
        if rs:
            axes[0].plot([r["ctx"] for r in rs], [r["tokens_per_s"] for r in rs], "o-", label=method)
            axes[1].plot([r["ctx"] for r in rs], [r["peak_mib"] for r in rs], "o-", label=method)
    for ax, label in zip(axes, ("tokens/s (prefill)", "peak memory (MiB)")):
        ax.set(xscale="log", xlabel="context length (tokens)", ylabel=label)
        ax.legend()
    fig.suptitle(name)
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120), mode=0o644)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
