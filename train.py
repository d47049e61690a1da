"""Train CoMeT on passkey retrieval (docs/design.md, S8), nanoGPT style.

    python train.py                                  # the default job: tiny CoMeT, CPU, passkey
    python train.py config/NAME.py --batch_size=32   # a config file, then overrides
    python train.py --init_from=resume               # continue out_dir/ckpt.pt exactly where it stopped
    python train.py config/finetune_llama.py --init_from=/path/to/Llama-3.2-1B   # memories on a pretrained model
    torchrun --standalone --nproc_per_node=2 train.py --pipeline=True   # each sequence split over 2 ranks (S7)

The baselines are this model with other settings (chunk_size=0: full attention; window=48: a sliding window). RAM
trains through its own entry point (python -m ram.train_ram), which hands `main` its model, batches and loss.
Batches are a pure function of (seed, iteration): a resumed run sees the same data and, on CPU, the same losses.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import llama
from checkpoint import load_model, load_training, read_run, save_training, write_atomically
from configurator import pick_device, pick_dtype, settings_of
from data import filler_tokens, get_tokenizer, make_passkey, sample_batch, stack
from memory import fifo_chunks
from model import CHUNK_ALIGNS, MEMORY_SETTINGS, Block, ModelConfig, Transformer
from pipeline import SCHEDULES, Pipeline, PipelineError, cpu_slices, join, reduce_step, sliced_backward

# -----------------------------------------------------------------------------
# run
out_dir = "out"
init_from = "scratch"     # scratch | resume (out_dir/ckpt.pt, with its settings) | a Llama checkpoint dir or .gguf
freeze_base = False       # train only what CoMeT adds: memories, compression and readout embeddings (S5)
unfreeze = ""             # with freeze_base: base weights that train too; attention = q/k/v/o and attention norms
readout_init = "mean"     # new memories on a pretrained model: mean (+ a little noise) | apart (orthogonal directions)
base_path = ""            # resuming a frozen-base run whose base model has moved: where it is now
seed = 1337
device = "auto"           # auto | cpu | cuda
dtype = "auto"            # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
compile = False           # torch.compile each decoder block
threads = 0               # torch CPU threads; 0 = torch's default
batch_threads = 2         # CPU, fp32, one process: each batch in this many row slices, each on its own thread
eval_interval = 300       # iterations between passkey evaluations (and at the end)
eval_trials = 40          # sequences per evaluation, at the longest training length, over 5 depths
ckpt_interval = 300       # iterations between checkpoints (and at the end)
ckpt_shards = False       # weights and AdamW states as shards, each rank writing its own (docs/scale.md)
pipeline = False          # split every sequence by chunks over the torchrun ranks (S7)
pipeline_schedule = "wavefront"  # wavefront (S7) | naive (a rank waits until the previous one has finished)
pipeline_timeout = 60.0   # seconds a rank waits for another before every rank stops with an error
dp = 1                    # data-parallel ranks under torchrun (FSDP2); world size = pp x dp (docs/scale.md)
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
gate_bias = 0.0           # the gate's bias at init; 0: none, as in the paper (g ~ 0.5); 3: g ~ 0.95 keeps the state
sink_token = -1           # a token id: a sink row of it at position 0 in every chunk (S2); -1: none, as in the paper
window = 0                # chunk_size=0 only: tokens see the last `window` positions (sliding-window baseline)
# data (S8)
filler = "grass"          # grass (S8's repeated sentences) | a text file: real English, 80% train / 20% held out
tokenizer = "auto"        # auto (bytes; a Llama's own) | bytes | gpt2 (if cached) | a .tiktoken file | tokenizer.model
digits = 5                # passkey length
min_len = 128             # shortest training sequence, tokens
max_len = 768             # longest training sequence (the "training length"), tokens
curriculum = 0.5          # the longest length ramps from min_len to max_len over this share of the run; 0: off
edge_depths = 0.2         # share of training sequences with the key exactly at depth 0 or 1, the rest uniform
far_keys = 0.0            # share of training sequences with the key beyond the FIFO's reach: only the global memory
                          # can carry it to the question (`far_depth`); 0: off
chunk_align = "mixed"     # where chunks start: left (the first token) | right (the answer ends a chunk) | mixed (each
                          # iteration one or the other); the evaluation reads right-aligned unless this is left
lm_weight = 0.1           # loss = NLL(answer) + lm_weight * NLL(other tokens); 0: answer tokens only
loss_chunk = 0            # > 0: the output layer and the loss this many tokens at a time, each recomputed in backward,
                          # so the logits (tokens x vocabulary) never exist whole; 0: all at once
# optimizer
batch_size = 16
max_iters = 2000
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
DEFAULTS = settings_of(globals())
MODEL_KEYS = tuple(f.name for f in fields(ModelConfig) if f.name in DEFAULTS)  # the settings above that shape it


class Recipe(NamedTuple):
    """What the loop asks of what it trains: train.py's own is CoMeT (and its baselines) on passkeys,
    ram/train_ram.py's RAM or any model on RAM's tasks."""
    model: torch.nn.Module
    batch: Callable      # iteration -> (the batch on the device, the tokens it reads, its sequences' length)
    loss: Callable       # (model, batch[, rows]) -> (this share of the batch's loss, a dict of floats to log)
    evaluate: Callable   # model -> exact-match accuracy
    record: dict = {}    # what the checkpoint keeps beside the weights (a frozen base's header, RAM's settings)
    slices: int = 1      # > 1: loss takes a slice of the batch's rows (a CPU's threads share the batch)


def get_lr(it: int) -> float:
    """Linear warmup, then cosine decay to min_lr * lr."""
    n_warm = max(1, round(warmup * max_iters))
    if it < n_warm:
        return lr * (it + 1) / n_warm
    progress = (it - n_warm) / max(1, max_iters - n_warm)
    return lr * (min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def get_samples(enc, it: int, dp_rank: int = 0, make: Callable = make_passkey) -> tuple[list, int]:
    """Iteration it's task sequences (this dp rank's slice of batch_size x dp) and their length, uniform in
    [min_len, hi] with hi ramping from min_len to max_len (the curriculum)."""
    rng = random.Random(seed * 1_000_003 + it)
    ramp = min(1.0, it / (curriculum * max_iters)) if curriculum else 1.0
    length = rng.randint(min_len, round(min_len + ramp * (max_len - min_len)))
    deepest = far_depth(length) if far_keys else 0.0  # 0: too short to hold a key beyond reach, drawn as without
    rows = sample_batch(enc, batch_size * dp, length, rng.randrange(2**62), digits, filler=filler_tokens(
        enc, filler, "train"), edges=edge_depths, make=make, far=(far_keys, deepest) if deepest else (0, 0))
    return rows[dp_rank * batch_size:(dp_rank + 1) * batch_size], length


def far_depth(length: int) -> float:
    """The deepest key depth beyond the FIFO's reach in a sequence of `length` tokens: before the question's chunk
    and the temp_budget / n_compression chunks the FIFO holds (and the key's sentence and the question, ~64)."""
    reach = chunk_size * (1 + fifo_chunks(chunk_size, stride, temp_budget)) + 64
    return max(0.0, 1 - reach / length)


def batch_align(it: int) -> str:
    """Iteration it's chunk plan: chunk_align's; "mixed": right when a coin drawn from the iteration says so."""
    if chunk_align != "mixed":
        return chunk_align
    return "right" if random.Random(it * 7919 + 17).random() < 0.5 else "left"


def lm_batch(samples: list, device: str, align: str, keep: int = 0) -> tuple[tuple, int]:
    """(inputs, targets, answer mask over targets) (B, L-1) each and the chunk plan, and the input token count.
    keep > 0: only the sequences' last `keep` tokens (RAM's truncated baseline)."""
    tokens, answer = stack(samples)
    tokens, answer = torch.from_numpy(tokens[:, -keep:]).to(device), torch.from_numpy(answer[:, -keep:]).to(device)
    return (tokens[:, :-1], tokens[:, 1:], answer[:, 1:], align), tokens[:, :-1].numel()


def passkey_loss(logits, targets, answer, whole=None):
    """Mean NLL on the answer tokens + lm_weight * mean NLL on every other real token. whole: the whole batch's
    answer mask when logits cover a slice of it (a pipeline rank's tokens, a thread's rows): the shares add up."""
    return weigh(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets),
                 answer, whole)


def chunked_nll(model, h, targets, piece: int):
    """Per-token NLL (B, N) of the final states h (B, N, C): the norm, the output layer and the softmax `piece` tokens
    at a time, each recomputed in backward, so the logits (B, N, V) never exist whole (4k tokens x 49k: 0.8 GB)."""
    def nll(h, t):
        return F.cross_entropy(model.output(model.norm(h)).flatten(0, 1).float(), t.flatten(), reduction="none")
    return torch.cat([checkpoint(nll, h[:, a:a + piece], targets[:, a:a + piece], use_reentrant=False).view(
        h.size(0), -1) for a in range(0, h.size(1), piece)], 1)


def weigh(nll, answer, whole=None):
    """`passkey_loss` of per-token NLLs (B, N)."""
    whole = answer if whole is None else whole
    loss = nll[answer].sum() / whole.sum()
    return loss + lm_weight * nll[~answer].sum() / (~whole).sum() if lm_weight else loss


def lm_loss(model, batch: tuple, pipe: Pipeline | None, rows: slice = slice(None)) -> tuple[torch.Tensor, dict]:
    """`passkey_loss` of the model reading the batch's `rows`, or the whole batch over the pipeline (S7)."""
    x, y, answer, align = batch
    if pipe is None and loss_chunk:
        return weigh(chunked_nll(model, model.hidden(x[rows], bptt_chunks, align), y[rows], loss_chunk), answer[rows],
                     answer), {}
    if pipe is None:
        logits, _ = model(x[rows], bptt_chunks=bptt_chunks, align=align)
        return passkey_loss(logits, y[rows], answer[rows], whole=answer), {}
    logits, span = pipe.forward(model, x, bptt_chunks, align)
    return passkey_loss(logits, y[:, span], answer[:, span], whole=answer), {}


def eval_samples(enc, make: Callable = make_passkey) -> list[list]:
    """The evaluation's fixed sequences, never trained on: eval_trials at max_len, a list for each of 5 depths."""
    rngs = [random.Random(10**9 + 10 * seed + k) for k in range(5)]
    return [[make(enc, max_len, depth, rng, digits, filler_tokens(enc, filler, "heldout"))
             for _ in range(max(1, eval_trials // 5))] for depth, rng in zip((0.0, 0.25, 0.5, 0.75, 1.0), rngs)]


@torch.no_grad()
def evaluate(model, enc, make: Callable = make_passkey, keep: Callable = lambda samples: 0) -> float:
    """Exact match on `eval_samples`, teacher-forced: greedy decoding gives the answer exactly when the argmax is
    right at every answer position, which one forward shows. Chunks cut as the evaluation reads (right-aligned
    unless chunk_align is left); keep as in `lm_batch`."""
    model.eval()
    correct, trials = 0, eval_samples(enc, make)
    align = "left" if chunk_align == "left" else "right"
    for samples in trials:
        (x, y, answer, _), _ = lm_batch(samples, next(model.parameters()).device, align, keep(samples))
        n = int(answer.sum(1).max())  # the answers end every row; keep the last n states of each chunk
        states = [h[:, -n:] for h, _ in model.chunks(x, align=align)] if model.config.comet else \
            [model.run_blocks(model.tok_embeddings(x))[0][:, -n:]]
        right = model.output(model.norm(torch.cat(states, 1)[:, -n:])).argmax(-1) == y[:, -n:]
        correct += int((right | ~answer[:, -n:]).all(1).sum())
    model.train()
    return correct / sum(map(len, trials))


def build_model(config: dict, enc, ckpt: dict | None, dev: str) -> tuple[Transformer, dict]:
    """The checkpoint's model (a frozen-base run's: its memories on their base), the settings' model, or a Llama's
    weights with new memories (the settings then record its shape); and what the checkpoint records of a base."""
    path = os.path.join(config["out_dir"], "ckpt.pt")
    if ckpt is not None and "base" in ckpt:
        ckpt["base"]["base_path"] = config["base_path"] or ckpt["base"]["base_path"]  # where it is now
        model = llama.attach_memories(ckpt["base"]["base_path"], ckpt["model"], {**ckpt["base"], "settings": ckpt[
            "config"]}, path, device=dev)
    elif ckpt is not None:  # ckpt_shards: the weights come in `start`, once the model is sharded
        model = Transformer(ModelConfig(**ckpt["model_args"])) if ckpt.get("shards") else load_model(path, dev, ckpt)[0]
    elif config["init_from"] == "scratch":  # a plain decoder (chunk_size=0) needs RoPE up to max_len
        model = Transformer(ModelConfig(vocab_size=enc.n_vocab, block_size=max(config["max_len"], 1024),
                                        **{k: config[k] for k in MODEL_KEYS}))
    else:
        model = llama.load_llama(config["init_from"], device=dev, readout_init=config["readout_init"],
                                 **{k: config[k] for k in (*MEMORY_SETTINGS, "window")})
        config.update({k: getattr(model.config, k) for k in MODEL_KEYS})
    if enc.n_vocab > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {enc.n_vocab} ids, the model's vocabulary only {model.config.vocab_size}")
    if config["freeze_base"]:  # under bf16 autocast the frozen base is held in bf16 (the memories stay fp32)
        llama.freeze_base(model, torch.bfloat16 if pick_dtype(config["dtype"], dev) == torch.bfloat16 else None,
                          config["unfreeze"])
    model.checkpoint_activations = config["checkpoint_activations"]
    base = (ckpt or {}).get("base") or (llama.base_header(config["init_from"], model) if config["freeze_base"]
                                        and llama.is_pretrained(config["init_from"]) else None)
    return model.train().to(dev), {"base": base} if base else {}


def passkey_recipe(config: dict, enc, ckpt: dict | None, dev: str, pipe: Pipeline | None) -> Recipe:
    """CoMeT and its baselines on passkeys: whole sequences, in batch_threads row slices on a CPU."""
    model, record = build_model(config, enc, ckpt, dev)

    def batch(it: int) -> tuple:
        samples, length = get_samples(enc, it, pipe.dp_rank if pipe else 0)
        return (*lm_batch(samples, dev, batch_align(it)), length)

    return Recipe(model, batch, lambda m, b, rows=slice(None): lm_loss(m, b, pipe, rows), lambda m: evaluate(m, enc),
                  record, config["batch_threads"] if pipe is None else 1)


def check_settings(c: dict, enc) -> None:
    """Settings that would only fail deep inside a run: one clear error now instead."""
    problems = [text for bad, text in (  # the ranges of numbers: configurator.RULES
        (c["min_len"] > c["max_len"], f"min_len={c['min_len']} must be <= max_len={c['max_len']}"),
        (c["chunk_align"] not in (*CHUNK_ALIGNS, "mixed"), f"chunk_align={c['chunk_align']!r}: left, right or mixed"),
        (c["pipeline_schedule"] not in SCHEDULES, f"pipeline_schedule={c['pipeline_schedule']!r}: wavefront or naive"),
        (c["init_from"] not in ("scratch", "resume") and not llama.is_pretrained(c["init_from"]),
         f"init_from={c['init_from']!r} must be scratch, resume, a Llama checkpoint directory or a .gguf file"),
        (c["unfreeze"] not in llama.UNFREEZE or c["unfreeze"] and not c["freeze_base"],
         f"unfreeze={c['unfreeze']!r} must be '' or attention, and goes with freeze_base=True"),
        (c["readout_init"] not in llama.READOUT_INITS, f"readout_init={c['readout_init']!r} must be mean or apart"),
        (c["freeze_base"] and c["ckpt_shards"], "ckpt_shards=True is for full fine-tunes: a frozen base's checkpoint "
                                                "is its memories alone, a few MB in one file; drop --ckpt_shards"),
        *((c[k] and not c["chunk_size"], f"{k}={c[k]} works on CoMeT's chunks: it needs chunk_size > 0")
          for k in ("freeze_base", "pipeline", "checkpoint_activations", "far_keys") + ("dp",) * (c["dp"] > 1)),
        (c["loss_chunk"] and (c["pipeline"] or c["dp"] > 1), "loss_chunk works in one process: drop it with "
                                                               "pipeline=True or dp > 1"),
        (c["sink_token"] >= enc.n_vocab, f"sink_token={c['sink_token']} is not a token of this tokenizer (ids below "
                                          f"{enc.n_vocab}): choose one, e.g. 0, or -1 for no sink row"),
    ) if bad]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not c["pipeline"] and c["dp"] == 1:  # every process would train the same run into one out_dir
        problems.append(f"WORLD_SIZE={world} (torchrun): give --dp={world} or --pipeline=True; or unset RANK and "
                        "WORLD_SIZE left over from torchrun")
    if problems:
        raise ValueError(problems[0])
    pick_dtype(c["dtype"], "cpu")  # auto, float32 or bfloat16, before torchrun joins (the device: `prepare`)
    filler_tokens(enc, c["filler"], "heldout")  # a missing or too short text file
    make_passkey(enc, c["min_len"], 0.5, random.Random(0), c["digits"], filler_tokens(enc, c["filler"], "train"))


def prepare(config: dict, ckpt: dict | None, setup: Callable):
    """The tokenizer, the settings checked, the ranks joined (torchrun), the device and `setup`'s recipe; one clear
    error for anything wrong. Returns (recipe, pipeline or None, device, compute dtype, whether this is rank 0)."""
    if "WORLD_SIZE" in os.environ:  # under torchrun: each rank's lines as they come, before the launcher's own
        sys.stdout.reconfigure(line_buffering=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"error: rank {os.environ.get('RANK')} stopped by the "
                                                           "launcher (another rank failed, or it was stopped)"))
    try:
        enc = get_tokenizer(tokenizer)
        check_settings(config, enc)
        pipe = join(pick_device(device), pipeline_schedule, pipeline_timeout, math.ceil((min_len - 1) / chunk_size),
                    threads, dp, pipeline) if pipeline or dp > 1 else None
        dev = pipe.device if pipe else pick_device(device)
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        recipe = setup(config, enc, ckpt, dev, pipe)
    except (OSError, TypeError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    return recipe, pipe, dev, pick_dtype(dtype, dev), not pipe or torch.distributed.get_rank() == 0


def start(model, optimizer, ckpt: dict | None, master: bool) -> tuple[int, float | None, list[str]]:
    """Resume (sharded weights, optimizer and RNG state; the log cut back to the checkpoint, a torn line dropped) or
    start a fresh log; compile. Returns (the first iteration, the last accuracy, the shards resumed from)."""
    log_path, path = os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "ckpt.pt")
    os.makedirs(out_dir, exist_ok=True)
    if ckpt is not None:
        try:
            load_training(path, model, optimizer, ckpt)
        except ValueError as e:  # damaged shards: every rank
            raise SystemExit(f"error: cannot resume: {e}")
        print(f"resuming from {path} at iteration {ckpt['iter_num']}") if master else None
    if master and ckpt is not None and os.path.exists(log_path):  # (a new run's out_dir holds no log: read_run)
        with open(log_path, encoding="utf-8", errors="replace") as f:
            records = [(line, logged_iter(line)) for line in f]
        lines = [line for line, i in records if i is not None and i < ckpt["iter_num"]]
        damaged = sum(i is None for _, i in records)
        if damaged:
            print(f"warning: {log_path}: {damaged} damaged line(s) dropped (a crash mid-write, or edited by hand)")
        write_atomically(log_path, lambda f: f.write("".join(lines).encode()), mode=0o644)
    if compile:
        for block in (m for m in model.modules() if isinstance(m, Block)):
            block.compile(dynamic=True)
    if ckpt is None:
        return 0, None, []
    kept = sorted(p.name for p in Path(out_dir).glob("ckpt-*.dcp") if p.name != ckpt.get("shards"))  # this run's
    return ckpt["iter_num"], ckpt.get("passkey_acc"), kept + [ckpt["shards"]] * bool(ckpt.get("shards"))


def logged_iter(line: str) -> int | None:
    """The iteration of a whole line of log.jsonl; None for a torn or damaged one."""
    try:
        record = json.loads(line) if line.endswith("\n") else None
        return record["iter"] if isinstance(record, dict) and type(record.get("iter")) is int else None
    except json.JSONDecodeError:
        return None


def train_step(model, optimizer, recipe: Recipe, pipe: Pipeline | None, autocast, it: int, stop: list
               ) -> tuple[dict, int, bool]:
    """One iteration: learning rate, batch, forward + backward (slices on threads, or the pipeline's all-reduce),
    clip, AdamW. Returns (the log record, the tokens read, whether to stop after it: a Ctrl-C on any rank)."""
    for group in optimizer.param_groups:
        group["lr"] = get_lr(it) * group["lr_mult"]
    batch, tokens, length = recipe.batch(it)
    optimizer.zero_grad(set_to_none=True)
    if recipe.slices > 1:  # fp32 only: autocast is per thread
        loss, parts = sliced_backward(lambda rows: recipe.loss(model, batch, rows)[0], batch[0].size(0), recipe.slices,
                                      [p for p in model.parameters() if p.requires_grad]), {}
    else:
        with autocast:
            loss, parts = recipe.loss(model, batch)
        loss.backward()  # over the pipeline: the wavefront in reverse, memory gradients sent back (S7)
    loss, halt = reduce_step(pipe, model, loss, bool(stop))
    if not math.isfinite(loss):  # before the step: the weights and the last checkpoint stay as they were
        last = os.path.join(out_dir, "ckpt.pt")
        raise SystemExit(f"error: the loss at iteration {it} is {loss}: stopped before updating the weights; " + (
            f"{last} keeps the last checkpoint (resume it with a lower --lr)" if os.path.exists(last) else
            "no checkpoint yet: train into a new --out_dir with a lower --lr"))
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return dict(iter=it, loss=loss, lr=get_lr(it), len=length, **parts), tokens, halt


def save(model, optimizer, recipe: Recipe, it: int, acc: float | None, config: dict, master: bool, kept: list[str]
         ) -> list[str]:
    """A checkpoint at iteration `it` (every rank calls it); a frozen base's is its memories alone, also written as
    out_dir/memories.safetensors, the file to ship (llama.save_memories). Returns the shards kept."""
    state = dict(iter_num=it, config=config, passkey_acc=acc, rng=dict(torch=torch.get_rng_state()), **recipe.record)
    base = recipe.record.get("base")
    try:
        weights, kept = save_training(os.path.join(out_dir, "ckpt.pt"), model, optimizer, state, ckpt_shards,
                                      bool(base), master, kept)
    except (OSError, ValueError) as e:  # a full disk, say: the previous checkpoint stays
        raise SystemExit(f"error: cannot write the checkpoint at iteration {it}: {e}")
    if master and base:
        llama.save_memories(weights, os.path.join(out_dir, "memories.safetensors"), base, config)
    return kept


def main(setup: Callable = passkey_recipe, defaults: dict = DEFAULTS, frozen: tuple = ()) -> None:
    """A run: settings, `setup`'s model and recipe, then the loop: log, evaluations, checkpoints, and on Ctrl-C the
    step finished, a checkpoint, stop. frozen: settings of `setup`'s own that a resumed run cannot change."""
    config, ckpt = read_run(defaults, (*MODEL_KEYS, *frozen, "tokenizer", "freeze_base", "unfreeze"))
    if config["tokenizer"] == "auto":  # resolved here, so that the checkpoint records the real one
        config["tokenizer"] = config["init_from"] if llama.is_pretrained(config["init_from"]) else "bytes"
    globals().update(config)
    recipe, pipe, dev, precision, master = prepare(config, ckpt, setup)
    model = recipe.model
    if master:
        memory = sum(p.numel() for name, p in model.named_parameters() if model.is_memory_param(name))
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {memory / 1e6:.3f}M of "
              "them CoMeT's memories (S5)")
    if pipe:  # every rank starts from rank 0's weights; dp > 1: FSDP2 (bf16: gathered in bf16), before the optimizer
        pipe.broadcast_parameters(model)
        pipe.shard(model, torch.bfloat16 if precision == torch.bfloat16 else None)
    autocast = torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=precision == torch.bfloat16)
    optimizer = make_optimizer(model, fused=torch.device(dev).type == "cuda")
    recipe = recipe._replace(slices=cpu_slices(recipe.slices, dev, precision, compile) if recipe.slices > 1 else 1)
    iter_num, acc, kept = start(model, optimizer, ckpt, master)
    stop = []  # Ctrl-C: finish the step, checkpoint, exit
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    t0, n_tok = time.perf_counter(), 0
    bar = tqdm(total=max_iters, initial=iter_num, unit="it", dynamic_ncols=True, disable=not master)
    with open(os.path.join(out_dir, "log.jsonl"), "a") if master else contextlib.nullcontext() as log:
        for it in range(iter_num, max_iters):
            try:
                record, tokens, halt = train_step(model, optimizer, recipe, pipe, autocast, it, stop)
                if (eval_interval and (it + 1) % eval_interval == 0) or it + 1 == max_iters:  # every rank
                    with autocast, pipe.gathered() if pipe else contextlib.nullcontext():
                        record["passkey_acc"] = acc = recipe.evaluate(model)
                if master:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if (ckpt_interval and (it + 1) % ckpt_interval == 0) or it + 1 == max_iters or halt:
                    kept = save(model, optimizer, recipe, it + 1, acc, config, master, kept)
                    if pipe:  # the others wait for rank 0's checkpoint (maybe large) without a short timeout
                        pipe.barrier("wait for rank 0 to write its checkpoint", max(600.0, pipeline_timeout))
            except (PipelineError, SystemExit) as e:  # a rank died, raised or hung; a loss not finite: all stop
                bar.close()  # the bar's last line before the message
                raise SystemExit(f"error: {e}" if isinstance(e, PipelineError) else e.code) from None
            n_tok += tokens  # the evaluations' time included: what a run really gets
            bar.set_postfix(loss=f"{record['loss']:.3f}", len=record["len"], acc="-" if acc is None else f"{acc:.0%}",
                            tok_s=f"{n_tok / (time.perf_counter() - t0):,.0f}")
            bar.update()
            if halt:
                bar.write(f"interrupted: checkpoint at iteration {it + 1} in {out_dir}/ckpt.pt; continue with "
                          "--init_from=resume") if master else None
                break
    bar.close()
    if pipe:
        torch.distributed.destroy_process_group()
    if master:
        print(f"done: {out_dir}/ckpt.pt, accuracy at {max_len} tokens: {acc}")


def make_optimizer(model, fused: bool) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (not a frozen base's): the memories at memory_lr_mult x lr (S5), weight
    decay on matrices only."""
    groups: dict = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((model.is_memory_param(name), p.dim() >= 2), []).append(p)
    return torch.optim.AdamW([dict(params=ps, lr_mult=memory_lr_mult if mem else 1.0, weight_decay=weight_decay
                                   if matrix else 0.0) for (mem, matrix), ps in groups.items()],
                             lr=lr, betas=(beta1, beta2), fused=fused)


if __name__ == "__main__":
    main()
