"""Train CoMeT on the passkey task (SPEC S8), nanoGPT style; or, to compare, a baseline or RAM (S9).

    python train.py                                  # the default job: tiny CoMeT, CPU, passkey
    python train.py config/NAME.py --batch_size=32   # config file, then overrides
    python train.py --init_from=resume               # continue out_dir/ckpt.pt exactly where it stopped
    python train.py config/finetune_llama.py --init_from=/path/to/Llama-3.2-1B   # memories on a pretrained model
    torchrun --standalone --nproc_per_node=2 train.py --pipeline=True   # each sequence split over 2 ranks (S7)

Baselines are the same model with settings (chunk_size=0: full attention; window=48: sliding window); RAM
and the truncated decoder (--method=ram|truncate) bring their batch and loss from ram.py (`Method`). Batches
are a pure function of (seed, iteration): a resumed run sees the same data and, on CPU, the same losses.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import json
import math
import os
import random
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import llama
import ram as ramlib
from checkpoint import (load_model, load_optimizer, load_shards, read_checkpoint, save_checkpoint, save_shards,
                        shards_dir, state_dicts)
from configurator import configure_or_exit, pick_device, pick_dtype, settings_of
from data import TASKS, filler_tokens, get_tokenizer, sample_batch, stack
from eval_passkey import passkey_cell
from model import CHUNK_ALIGNS, Block, ModelConfig, Transformer
from pipeline import SCHEDULES, Pipeline, PipelineError, reduce_step

# -----------------------------------------------------------------------------
# run
out_dir = "out"
init_from = "scratch"     # 'scratch', 'resume' (out_dir/ckpt.pt, with its settings) or a Llama checkpoint dir
freeze_base = False       # train only what CoMeT adds: memories, compression and readout embeddings (S5)
base = ""                 # resuming a frozen-base run whose base model moved: its path now
seed = 1337
device = "auto"           # auto | cpu | cuda
dtype = "auto"            # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
compile = False           # torch.compile each decoder block
threads = 0               # torch CPU threads; 0 = torch's default
batch_threads = 2         # CPU, fp32, one process, no compile: the batch's rows in this many slices (at most one per
                          # thread), each slice's forward and backward on its own thread, the threads sharing the
                          # cores (at d 128 on 2 cores faster than both on the whole batch: docs/passkey20.md); 1: off
eval_interval = 300       # iterations between passkey evaluations (and at the end)
eval_trials = 40          # sequences per evaluation, at the longest training length, spread over 5 depths
ckpt_interval = 300       # iterations between checkpoints (and at the end)
ckpt_shards = False       # weights and AdamW states as shards, each rank writing its own (out_dir/ckpt-<iter>.dcp,
                          # named by ckpt.pt), not gathered by rank 0: full fine-tunes of 8B (docs/scale.md)
pipeline = False          # split every sequence by chunks over the torchrun ranks (S7); needs torchrun
pipeline_schedule = "wavefront"  # wavefront (S7) | naive (a rank waits until the previous one finished)
pipeline_timeout = 60.0   # seconds a rank waits for another before every rank stops with an error
dp = 1                    # data-parallel ranks under torchrun (FSDP2: weights, gradients, AdamW states sharded);
                          # each reads batch_size sequences; pipeline=True: world size = pp x dp (docs/scale.md)
# model (ModelConfig)
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 128
ffn_hidden = 320
rope_theta = 10000.0
tie_embeddings = True
chunk_size = 64           # 0: a plain decoder (the full-attention baseline)
n_global = 16
stride = 8
temp_budget = 32
adapter_rank = 8
global_gate = True        # False: each chunk overwrites the global memory (ablation, RMT-like)
window = 0                # chunk_size=0 only: tokens see the last `window` positions (sliding-window baseline)
method = "comet"          # comet (and its baselines) | ram (S9) | truncate (sees only RAM's budget); ram.SETTINGS
# data (S8)
task = "passkey"          # passkey (S8) | facts, recall (several facts hidden, one asked: RAM) | needle (data.py)
filler = "grass"          # grass (S8's repeated sentences) | a text file: real English, 80% train / 20% held out
tokenizer = "auto"        # auto (bytes; a Llama's own) | bytes | gpt2 (if cached) | a .tiktoken file | tokenizer.model
digits = 5                # passkey length
min_len = 128             # shortest training sequence, tokens
max_len = 768             # longest training sequence ("training length"), tokens (512 before issue 20: 80% at 1M)
curriculum = 0.5          # the longest length ramps from min_len to max_len over this share of the run; 0: off
edge_depths = 0.2         # share of training sequences with the key exactly at depth 0 or 1, the rest uniform
                          # (max_len 512: 0.1 gave 98.6 / 96.2 / 98.2% at 1x / 4x / 16x, 0.2 100 / 99.8 / 99.8%)
chunk_align = "mixed"     # where chunks start (model.chunk_spans): left, from the first token (as a context is read
                          # before its question is known) | right, the last chunk ends with the answer (as
                          # eval_passkey and sample read a prompt, and ask from a saved state) | mixed: each
                          # iteration one or the other, half and half (`batch_align`; docs/passkey20.md). The
                          # evaluations during training read right-aligned unless chunk_align is left
lm_weight = 0.1           # loss = NLL(answer) + lm_weight * NLL(other tokens); 0: answer tokens only
# optimizer
batch_size = 16
max_iters = 2000          # 1,800 at max_len 512 before issue 20, then 1,600 at 768 (batch_threads pays for most)
lr = 1.5e-3
memory_lr_mult = 5.0      # memory modules and compression/readout embeddings train at lr * this (S5)
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
warmup = 0.03             # share of the run spent warming up
min_lr = 0.02             # final lr as a share of lr (cosine decay)
grad_clip = 1.0           # 0: off
bptt_chunks = 0           # truncate BPTT every k chunks; 0: through the whole sequence
checkpoint_activations = False  # keep only each layer-over-chunk step's inputs, recompute the rest in backward
# -----------------------------------------------------------------------------
DEFAULTS = {**settings_of(globals()), **ramlib.SETTINGS}  # RAM's own settings (segment, keep_ratio, ...) too
MODEL_KEYS = tuple(f.name for f in fields(ModelConfig) if f.name in DEFAULTS)  # the settings above that shape it
MEMORY_KEYS = ("chunk_size", "n_global", "stride", "temp_budget", "adapter_rank", "global_gate", "window")
dp_rank = 0  # this process's place along "dp" (main sets it under torchrun): which slice of every batch it reads
previous_shards = None  # ckpt_shards: the directory the last checkpoint file named (`checkpoint` keeps it one more)


def get_lr(it: int) -> float:
    """Linear warmup, then cosine decay to min_lr * lr."""
    n_warm = max(1, round(warmup * max_iters))
    if it < n_warm:
        return lr * (it + 1) / n_warm
    progress = (it - n_warm) / max(1, max_iters - n_warm)
    return lr * (min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def get_samples(enc, it: int) -> tuple[list, int]:
    """Iteration it's task sequences (data.Passkey) and their length. Curriculum: the length is uniform
    in [min_len, hi], hi ramping from min_len to max_len."""
    rng = random.Random(seed * 1_000_003 + it)
    ramp = min(1.0, it / (curriculum * max_iters)) if curriculum else 1.0
    length = rng.randint(min_len, round(min_len + ramp * (max_len - min_len)))
    rows = sample_batch(enc, batch_size * dp, length, rng.randrange(2**62), digits, task=task,
                        filler=filler_tokens(enc, filler, "train"), edges=edge_depths)  # dp > 1: this rank's slice
    return rows[dp_rank * batch_size:(dp_rank + 1) * batch_size], length


def batch_align(it: int) -> str:
    """Iteration it's chunk plan (model.chunk_spans): chunk_align's, or for "mixed" right-aligned when a coin
    drawn from the iteration alone says so (the same iterations for every seed), else left."""
    if chunk_align != "mixed":
        return chunk_align
    return "right" if random.Random(it * 7919 + 17).random() < 0.5 else "left"


def lm_batch(samples: list, device: str, keep: int, align: str) -> tuple[tuple, int]:
    """(inputs, targets, answer mask over targets), all (B, L-1), and the chunk plan to read them with; and the
    input token count. keep > 0: only the sequences' last `keep` tokens (the truncated baseline)."""
    tokens, answer = stack(samples)
    tokens, answer = torch.from_numpy(tokens[:, -keep:]).to(device), torch.from_numpy(answer[:, -keep:]).to(device)
    return (tokens[:, :-1], tokens[:, 1:], answer[:, 1:], align), tokens[:, :-1].numel()


def passkey_loss(logits, targets, answer, whole=None):
    """Mean NLL on the answer tokens + lm_weight * mean NLL on every other real token.
    whole: the answer mask of the whole batch when logits cover only a pipeline rank's tokens or a slice of the
    rows; the means then divide by the whole batch's counts, so the shares add up to the loss."""
    whole = answer if whole is None else whole
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
    loss = nll[answer].sum() / whole.sum()
    return loss + lm_weight * nll[~answer].sum() / (~whole).sum() if lm_weight else loss


def lm_loss(model: Transformer, batch: tuple, pipe: Pipeline | None, rows: slice = slice(None)
            ) -> tuple[torch.Tensor, dict]:
    """`passkey_loss` of the model reading the batch's `rows`, as their share of the whole batch's loss, in one
    process; or the whole batch over the pipeline's ranks (S7: this rank's tokens; its loss share is their sum
    over the whole batch's counts)."""
    x, y, answer, align = batch
    if pipe is None:
        logits, _ = model(x[rows], bptt_chunks=bptt_chunks, align=align)
        return passkey_loss(logits, y[rows], answer[rows], whole=answer), {}
    logits, span = pipe.forward(model, x, bptt_chunks, align)
    return passkey_loss(logits, y[:, span], answer[:, span], whole=answer), {}


class Method(NamedTuple):
    """What the training loop asks of a method, and nothing more."""
    batch: Callable  # (task samples, chunk plan) -> (batch on the device, tokens it reads)
    loss: Callable   # (model, batch[, rows]) -> (loss to backpropagate, dict of floats to log)
    slices: int = 1  # > 1: loss takes a slice of the batch's rows, and `forward_backward` runs them on threads


def pick_method(pipe: Pipeline | None, dev: str, slices: int = 1) -> Method:
    """CoMeT and its baselines read whole sequences (in `slices` row slices); RAM and the truncated decoder
    come from ram.py."""
    cfg = ramlib.config_of(globals())  # RAM's settings (ram.SETTINGS): segment, keep_ratio, ...
    if method == "ram":
        return Method(lambda s, align: ramlib.train_batch(s, cfg.segment, dev),
                      lambda m, b: ramlib.train_loss(m, b, lm_weight))
    keep = (lambda s: ramlib.truncate_keep(s, cfg)) if method == "truncate" else (lambda s: 0)
    return Method(lambda s, align: lm_batch(s, dev, keep(s), align),
                  lambda m, b, rows=slice(None): lm_loss(m, b, pipe, rows), slices if pipe is None else 1)


def batch_slices(dev: str, precision: torch.dtype, pipe: Pipeline | None, verbose: bool = False) -> int:
    """How many slices `forward_backward` cuts a batch into: batch_threads for CoMeT and its baselines in one
    process on CPU in fp32 without torch.compile (compiling from several threads at once is not safe), at most
    one per torch thread; the slices' threads then share those threads (intra-op threads divided among them)."""
    if torch.device(dev).type != "cpu" or precision != torch.float32 or compile or pipe or method == "ram":
        return 1
    slices = min(batch_threads, torch.get_num_threads())  # check_settings: batch_threads >= 1
    torch.set_num_threads(max(1, torch.get_num_threads() // slices))
    if verbose and slices > 1:
        print(f"each batch in {slices} slices, each on its own thread with {torch.get_num_threads()} "
              "intra-op thread(s)")
    return slices


@functools.cache
def thread_pool(n: int) -> ThreadPoolExecutor:
    """The threads that run a batch's slices, started once and kept."""
    return ThreadPoolExecutor(n, thread_name_prefix="batch-slice")


def forward_backward(model, train: Method, batch, autocast) -> tuple[torch.Tensor, dict]:
    """Forward + backward of one batch: its loss and the dict to log. Several slices (batch_threads): each
    slice's gradients on its own thread (torch.autograd.grad), added up in slice order, so that a run stays
    deterministic; fp32 only, since autocast is per thread."""
    if train.slices == 1:
        with autocast:
            loss, parts = train.loss(model, batch)
        loss.backward()  # over the pipeline: the wavefront in reverse, memory gradients sent back (S7)
        return loss, parts
    params = [p for p in model.parameters() if p.requires_grad]
    n = batch[0].size(0)
    bounds = [n * i // train.slices for i in range(train.slices + 1)]

    def one(rows: slice) -> tuple[torch.Tensor, tuple]:
        loss, _ = train.loss(model, batch, rows)  # this slice's share of the batch's loss
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    done = list(thread_pool(train.slices).map(one, [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]))
    for i, p in enumerate(params):  # None: a parameter this batch does not reach, as backward() leaves it
        grads = [g[i] for _, g in done if g[i] is not None]
        p.grad = functools.reduce(torch.add, grads) if grads else None
    return functools.reduce(torch.add, [loss for loss, _ in done]), {}


def make_optimizer(model: Transformer, fused: bool) -> torch.optim.AdamW:
    """AdamW with the memory parameters at memory_lr_mult x lr (S5); decay only on matrices."""
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # a frozen base (freeze_base)
            continue
        groups.setdefault((model.is_memory_param(name), p.dim() >= 2), []).append(p)
    return torch.optim.AdamW(
        [dict(params=ps, lr_mult=memory_lr_mult if mem else 1.0, weight_decay=weight_decay if decay else 0.0)
         for (mem, decay), ps in groups.items()], lr=lr, betas=(beta1, beta2), fused=fused)


def evaluate(model, enc, pipe: Pipeline | None) -> float:
    """Exact-match accuracy on the task at max_len over 5 depths (fixed trials, never seen in training)."""
    with pipe.gathered() if pipe else contextlib.nullcontext():  # sharded: every dp rank evaluates alike
        return _evaluate(model, enc)


def _evaluate(model, enc) -> float:
    model.eval()
    per_depth = max(1, eval_trials // 5)
    correct = sum(passkey_cell(model, enc, max_len, d, per_depth, 10**9 + 10 * seed + k, digits, task=task,
                               method=method, ram=ramlib.config_of(globals()),
                               align="left" if chunk_align == "left" else "right",
                               filler=filler_tokens(enc, filler, "heldout"))
                  for k, d in enumerate((0.0, 0.25, 0.5, 0.75, 1.0)))
    model.train()
    return correct / (5 * per_depth)


def build_model(config: dict, enc, ckpt: dict | None, dev: str, verbose: bool):
    """Resume: the checkpoint's model (a frozen-base run's memories on their base model). Scratch: the
    settings' model. A Llama directory: its weights plus new memories (llama.py); the settings then record
    the loaded shape."""
    ram, path = config["method"] == "ram", os.path.join(config["out_dir"], "ckpt.pt")
    if ckpt is not None and "base" in ckpt:  # a frozen base: the checkpoint holds only the memories
        ckpt["base"]["base_path"] = config["base"] or ckpt["base"]["base_path"]  # later checkpoints: where it is now
        model = llama.attach_memories(ckpt["base"]["base_path"], ckpt["model"], ckpt["base"], path, device=dev)
        model.train()
    elif ckpt is not None and ckpt.get("shards"):  # ckpt_shards: `start` loads each rank's pieces once sharded
        model = Transformer(ModelConfig(**ckpt["model_args"]), verbose)
    elif ckpt is not None:
        model, _ = ramlib.load_ram(path, dev, ckpt) if ram else load_model(path, dev, ckpt)
        model.train()
    elif config["init_from"] == "scratch":
        # a plain decoder (chunk_size=0) sees whole sequences: its RoPE table must cover max_len
        cfg = ModelConfig(vocab_size=enc.n_vocab, block_size=max(config["max_len"], 1024),
                          **{k: config[k] for k in MODEL_KEYS})
        model = ramlib.RAM(cfg, ramlib.config_of(config), verbose) if ram else Transformer(cfg, verbose)
    else:
        model = llama.load_llama(config["init_from"], device=dev, **{k: config[k] for k in MEMORY_KEYS})
        config.update({k: getattr(model.config, k) for k in MODEL_KEYS})
        if verbose:
            base, mem = model.param_counts()
            print(f"loaded {config['init_from']}: {base / 1e6:.1f}M parameters + {mem / 1e6:.2f}M new memory "
                  "parameters")
    if enc.n_vocab > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {enc.n_vocab} ids, the model's vocabulary only {model.config.vocab_size}")
    if config["freeze_base"]:  # bf16 autocast: the frozen base held in bf16 (the memories stay fp32)
        bf16 = pick_dtype(config["dtype"], dev) == torch.bfloat16
        llama.freeze_base(model, torch.bfloat16 if bf16 else None)
    model.checkpoint_activations = config["checkpoint_activations"]
    return model.to(dev)


def check_settings(config: dict, enc) -> None:
    """Settings that only fail deep inside a run: one clear error now instead."""
    c = config
    problems = [f"{k}={c[k]} must be positive"
                for k in ("batch_size", "batch_threads", "max_iters", "max_len", "digits") if c[k] <= 0]
    problems += [text for bad, text in (
        (not 0 < c["min_len"] <= c["max_len"], f"need 0 < min_len={c['min_len']} <= max_len={c['max_len']}"),
        (not 0 <= c["curriculum"] <= 1, f"curriculum={c['curriculum']} must lie in [0, 1]"),
        (not 0 <= c["edge_depths"] <= 1, f"edge_depths={c['edge_depths']} must lie in [0, 1]"),
        (c["freeze_base"] and not c["chunk_size"], "freeze_base=True trains only the memories: it needs "
                                                   "chunk_size > 0"),
        (c["pipeline"] and not c["chunk_size"], "pipeline=True splits sequences by chunks: it needs chunk_size > 0"),
        (c["dp"] < 1 or (c["dp"] > 1 and (not c["chunk_size"] or c["method"] != "comet")),
         f"dp={c['dp']} must be >= 1; dp > 1 shards CoMeT (chunk_size > 0, method=comet)"),
        (c["ckpt_shards"] and c["method"] != "comet", "ckpt_shards=True writes CoMeT's shards: it needs method=comet"),
        (c["checkpoint_activations"] and (not c["chunk_size"] or c["method"] != "comet"),
         "checkpoint_activations recomputes CoMeT's layer-over-chunk steps: it needs chunk_size > 0, method=comet"),
        (c["pipeline_schedule"] not in SCHEDULES, f"pipeline_schedule={c['pipeline_schedule']!r} must be wavefront "
                                                   "or naive"),
        (c["pipeline_timeout"] <= 0, f"pipeline_timeout={c['pipeline_timeout']} must be positive"),
        (c["chunk_align"] not in (*CHUNK_ALIGNS, "mixed"),
         f"chunk_align={c['chunk_align']!r} must be left, right or mixed"),
        (c["task"] not in TASKS, f"task={c['task']!r} must be one of {', '.join(TASKS)}"),
        (c["method"] not in ramlib.METHODS, f"method={c['method']!r} must be comet, ram or truncate")) if bad]
    if problems:
        raise ValueError(problems[0])
    pick_dtype(c["dtype"], "cpu")  # auto, float32 or bfloat16, before torchrun joins (the device: main)
    filler_tokens(enc, c["filler"], "heldout")  # a missing or too short text file
    (sample,) = sample_batch(enc, 1, c["min_len"], 0, c["digits"], task=c["task"],  # is min_len too short?
                             filler=filler_tokens(enc, c["filler"], "train"))
    ramlib.config_of(c)  # RAM's settings (segment, ...): the evaluation reads them whatever the method
    if c["method"] != "comet":
        ramlib.check_settings(c, len(sample.question))


# what a checkpoint saved before a setting existed was trained with
PREDATED = {"edge_depths": 0.1, "batch_threads": 1, "chunk_align": "left"}


def resume_settings(ckpt: dict, out: str) -> dict:
    """The checkpoint's settings, then this command line's; the model and its data cannot change."""
    missing = [k for k in ("optimizer", "iter_num", "config", "rng") if k not in ckpt]
    if missing:
        raise ValueError(f"it is not a training checkpoint (missing {', '.join(missing)})")
    config = configure_or_exit({**DEFAULTS, **PREDATED, **ckpt["config"]})
    saved = ckpt["config"]
    frozen = (*MODEL_KEYS, *ramlib.FROZEN.get(saved.get("method"), ()), "method", "tokenizer", "freeze_base")
    changed = [k for k in frozen if config[k] != saved.get(k, DEFAULTS[k])]
    if changed:
        was = ", ".join(f"{k}={saved.get(k, DEFAULTS[k])!r}" for k in changed)
        raise ValueError(f"{', '.join(changed)} cannot change when resuming (the weights were trained with {was})")
    return {**config, "out_dir": out}  # it lives where it was found, wherever it was first written


def read_settings() -> tuple[dict, dict | None]:
    """The run's settings (defaults, config files, command line; a resumed run's own) and the checkpoint
    it resumes, if any. Never overwrites a checkpoint: a new run into a used out_dir is an error."""
    config = configure_or_exit(DEFAULTS)
    ckpt_path, ckpt = os.path.join(config["out_dir"], "ckpt.pt"), None
    if config["init_from"] == "resume":
        try:
            ckpt = read_checkpoint(ckpt_path)
            config = resume_settings(ckpt, config["out_dir"])
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot resume: {e}")
    elif config["init_from"] != "scratch" and not llama.is_pretrained(config["init_from"]):
        raise SystemExit(f"error: init_from={config['init_from']!r} must be 'scratch', 'resume', a Llama "
                         "checkpoint directory or a .gguf file")
    elif os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} exists: continue it with --init_from=resume, or train into "
                         "another --out_dir, or delete it first")
    if config["tokenizer"] == "auto":  # resolved here, so that the checkpoint records the real one
        config["tokenizer"] = config["init_from"] if llama.is_pretrained(config["init_from"]) else "bytes"
    return config, ckpt


def start(model, optimizer, ckpt: dict | None, master: bool) -> tuple[int, float | None]:
    """Resume (optimizer and RNG state, the log cut back to the checkpoint, a torn line dropped) or start a
    fresh log; compile. Returns (first iteration to run, last accuracy)."""
    iter_num, acc, log_path = 0, None, os.path.join(out_dir, "log.jsonl")
    if master:
        os.makedirs(out_dir, exist_ok=True)
    if ckpt is not None:
        if ckpt.get("shards"):  # the weights too: each rank reads the pieces of its shards
            global previous_shards
            previous_shards = ckpt["shards"]
            try:
                load_shards(model, optimizer, shards_dir(os.path.join(out_dir, "ckpt.pt"), ckpt),
                            ckpt["optimizer"]["param_groups"])
            except ValueError as e:  # damaged shards: every rank
                raise SystemExit(f"error: cannot resume: {e}")
        else:
            load_optimizer(model, optimizer, ckpt["optimizer"], ckpt.get("optimizer_by_name", False))
        torch.set_rng_state(ckpt["rng"]["torch"])
        iter_num, acc = ckpt["iter_num"], ckpt.get("passkey_acc")
        if master and os.path.exists(log_path):
            with open(log_path) as f:
                kept = [line for line in f if line.endswith("\n") and json.loads(line)["iter"] < iter_num]
            with open(log_path, "w") as f:
                f.writelines(kept)
        if master:
            print(f"resuming from {os.path.join(out_dir, 'ckpt.pt')} at iteration {iter_num}")
    elif master and os.path.exists(log_path):
        os.remove(log_path)
    if compile:
        for block in model.modules():
            if isinstance(block, Block):
                block.compile(dynamic=True)
    return iter_num, acc


def train_step(model, optimizer, train: Method, pipe: Pipeline | None, autocast, enc, it: int,
               stop: list) -> tuple[dict, int, bool]:
    """One iteration: learning rate, batch, forward + backward, all-reduce (pipeline), clip, AdamW.
    Returns (the log record, tokens read, whether to stop after this step: a Ctrl-C so far, on any rank)."""
    lr_now = get_lr(it)
    for group in optimizer.param_groups:
        group["lr"] = lr_now * group["lr_mult"]
    samples, length = get_samples(enc, it)
    batch, tokens = train.batch(samples, batch_align(it))
    optimizer.zero_grad(set_to_none=True)
    loss, parts = forward_backward(model, train, batch, autocast)
    loss, halt = reduce_step(pipe, model, loss, bool(stop))
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return dict(iter=it, loss=loss, lr=lr_now, len=length, **parts), tokens, halt


def checkpoint(model, optimizer, it: int, acc: float | None, config: dict, path: str, base: dict | None,
               master: bool) -> None:
    """Everything a run needs to resume exactly, written atomically (checkpoint.save_checkpoint) by the master.
    Sharded (dp > 1): every rank calls it, their shards gathered whole (the same file as one process writes,
    the optimizer keyed by parameter name), or with ckpt_shards each rank's shards written by that rank into
    a directory the file names. A frozen pretrained base (base: llama.base_header) is not written again: the
    checkpoint holds only the memories and names the base, and memories.safetensors beside it is what to
    ship (a few MB, no optimizer)."""
    global previous_shards
    out, shards = os.path.dirname(path), f"ckpt-{it:08d}.dcp" if config["ckpt_shards"] else None
    if shards:  # a directory per iteration: the file names the last complete one (a crash keeps the previous)
        weights, by_name = {}, True
        opt = dict(param_groups=save_shards(model, optimizer, os.path.join(out, shards)))
    else:
        weights, opt, by_name = state_dicts(model, optimizer, trained_only=bool(base))  # base: memories alone
    if not master:
        return
    extra = {"ram_args": asdict(model.ram)} if isinstance(model, ramlib.RAM) else {"base": base} if base else {}
    save_checkpoint(dict(model=weights, optimizer=opt, optimizer_by_name=by_name, model_args=asdict(model.config),
                         iter_num=it, config=config, passkey_acc=acc, rng=dict(torch=torch.get_rng_state()),
                         shards=shards, **extra), path)
    keep = {shards, previous_shards}  # and the previous ones, which a reader may have open
    previous_shards = shards
    for old in glob.glob(os.path.join(glob.escape(out), "ckpt-*.dcp")):
        if os.path.basename(old) not in keep:
            shutil.rmtree(old, ignore_errors=True)
    if base:
        llama.save_memories(weights, os.path.join(out, "memories.safetensors"), base, config)


def join_ranks(dev: str) -> tuple[Pipeline | None, str, bool]:
    """Under torchrun (pipeline=True or dp > 1): this process's place in the (pp, dp) grid, its device
    (cuda:N) and whether it is the master (rank 0: logs, prints, writes checkpoints); the shortest sequence
    must split over a pipeline's ranks. One process: (None, dev, True)."""
    global dp_rank
    if not (pipeline or dp > 1):
        return None, dev, True
    pipe = Pipeline.from_env(dev, pipeline_schedule, pipeline_timeout, math.ceil((min_len - 1) / chunk_size),
                             threads, dp)
    if not pipeline and pipe.world > 1:
        raise ValueError(f"{pipe.world * dp} processes, dp={dp}: without pipeline=True every process is a dp "
                         f"rank (--dp={pipe.world * dp}); or split sequences too with --pipeline=True")
    dp_rank = pipe.dp_rank  # the batch slice `get_samples` reads
    return pipe, pipe.device, torch.distributed.get_rank() == 0


def main() -> None:
    config, ckpt = read_settings()
    globals().update(config)
    try:
        enc = get_tokenizer(tokenizer)
        check_settings(config, enc)
        pipe, dev, master = join_ranks(pick_device(device))
        precision = pick_dtype(dtype, dev)  # bf16: autocast, the weights stay fp32
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        model = build_model(config, enc, ckpt, dev, verbose=master)
        base = (ckpt or {}).get("base") or (llama.base_header(init_from, model)
                                            if freeze_base and llama.is_pretrained(init_from) else None)
        if base and ckpt_shards:
            raise ValueError("ckpt_shards=True is for full fine-tunes: a frozen base's checkpoint is its "
                             "memories alone, a few MB in one file; drop --ckpt_shards")
    except (OSError, TypeError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if pipe:
        pipe.broadcast_parameters(model)  # every rank holds rank 0's weights, whatever happened before
        pipe.shard(model, torch.bfloat16 if precision == torch.bfloat16 else None)  # dp > 1: FSDP2
        # over "dp", before the optimizer sees the parameters; bf16: weights gathered in bf16, fp32 masters
    autocast = torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=precision == torch.bfloat16)
    optimizer = make_optimizer(model, fused=torch.device(dev).type == "cuda")
    train = pick_method(pipe, dev, batch_slices(dev, precision, pipe, verbose=master))
    iter_num, acc = start(model, optimizer, ckpt, master)
    ckpt_path, log_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.jsonl")
    stop = []  # Ctrl-C: finish the step, checkpoint, exit
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    t0, n_tok = time.perf_counter(), 0
    bar = tqdm(total=max_iters, initial=iter_num, unit="it", dynamic_ncols=True, disable=not master)
    model.train()
    try:
        with open(log_path, "a") if master else contextlib.nullcontext() as log:
            for it in range(iter_num, max_iters):
                record, tokens, halt = train_step(model, optimizer, train, pipe, autocast, enc, it, stop)
                n_tok += tokens
                done = it + 1 == max_iters
                if (eval_interval and (it + 1) % eval_interval == 0) or done:
                    with autocast:  # as training computes (a bf16 frozen base needs it)
                        record["passkey_acc"] = acc = evaluate(model, enc, pipe)  # every rank: no one waits
                save = (ckpt_interval and (it + 1) % ckpt_interval == 0) or done or halt
                if master:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if save:  # every rank (sharded: the shards are gathered, or each rank writes its own)
                    try:
                        checkpoint(model, optimizer, it + 1, acc, config, ckpt_path, base, master)
                    except (OSError, ValueError) as e:  # a full disk, say: the previous checkpoint stays
                        raise SystemExit(f"error: cannot write the checkpoint at iteration {it + 1}: {e}")
                if master:
                    tok_s = n_tok / (time.perf_counter() - t0)  # evaluations included: what a run really gets
                    bar.set_postfix(loss=f"{record['loss']:.3f}", len=record["len"], tok_s=f"{tok_s:,.0f}",
                                    acc="-" if acc is None else f"{acc:.0%}")
                    bar.update()
                if pipe and save:  # the others wait for rank 0's checkpoint (maybe large) without a short timeout
                    pipe.barrier("wait for rank 0 to write its checkpoint", max(600.0, pipeline_timeout))
                if halt:
                    if master:
                        bar.write(f"interrupted: checkpoint at iteration {it + 1} in {ckpt_path}; "
                                  "continue with --init_from=resume")
                    break
    except PipelineError as e:  # a rank died, raised or hung: all stop
        raise SystemExit(f"error: {e}")
    bar.close()
    if pipe:
        torch.distributed.destroy_process_group()
    if master:
        print(f"done: {ckpt_path}, {task} accuracy at {max_len} tokens: {acc}")


if __name__ == "__main__":
    main()
