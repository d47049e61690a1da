"""Train CoMeT on the passkey task (SPEC S8), nanoGPT style; or, to compare, RAM (S9) or a baseline.

    python train.py                                  # the default job: tiny CoMeT, CPU, passkey
    python train.py config/NAME.py --batch_size=32   # config file, then overrides
    python train.py --init_from=resume               # continue out_dir/ckpt.pt exactly where it stopped
    python train.py config/finetune_llama.py --init_from=/path/to/Llama-3.2-1B   # memories on a pretrained model
    torchrun --standalone --nproc_per_node=2 train.py --pipeline=True   # each sequence split over 2 ranks (S7)

Batches are a pure function of (seed, iteration), so a resumed run sees the same data as an
uninterrupted one and, on CPU, produces the same losses.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import load_model, read_checkpoint, save_checkpoint
from configurator import configure_or_exit, pick_device, settings_of
from data import TASKS, get_tokenizer, sample_batch, stack
from eval_passkey import passkey_cell
import llama
from model import Block, ModelConfig, Transformer
from pipeline import Pipeline, PipelineError, rank_chunks
import ram as ramlib

# -----------------------------------------------------------------------------
# run
out_dir = "out"
init_from = "scratch"     # 'scratch', 'resume' (out_dir/ckpt.pt, with its settings) or a Llama checkpoint dir
freeze_base = False       # train only what CoMeT adds: memories, compression and readout embeddings (S5)
seed = 1337
device = "auto"           # auto | cpu | cuda
dtype = "auto"            # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
compile = False           # torch.compile each decoder block
threads = 0               # torch CPU threads; 0 = torch's default
eval_interval = 300       # iterations between passkey evaluations (and at the end)
eval_trials = 40          # sequences per evaluation, at the longest training length, spread over 5 depths
ckpt_interval = 300       # iterations between checkpoints (and at the end)
pipeline = False          # split every sequence by chunks over the torchrun ranks (S7); needs torchrun
pipeline_schedule = "wavefront"  # wavefront (S7) | naive (a rank waits until the previous one finished)
pipeline_timeout = 60.0   # seconds a rank waits for another before every rank stops with an error
# model (ModelConfig)
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 128
ffn_hidden = 320
rope_theta = 10000.0
tie_embeddings = True
chunk_size = 64
n_global = 16
stride = 8
temp_budget = 32
adapter_rank = 8
global_gate = True        # False: each chunk overwrites the global memory (ablation, RMT-like)
window = 0                # chunk_size=0 only: tokens see the last `window` positions (sliding-window baseline)
# RAM (S9) and its truncated baseline: method=ram|truncate, with chunk_size=0
method = "comet"          # comet (chunk_size=0: full attention) | ram (S9) | truncate (sees only RAM's budget)
segment = 50              # RAM: tokens per segment
keep_ratio = 0.25         # RAM: share of the context read closely (0.25 ~ 4x compression); truncate: same budget
ram_shared = True         # RAM: encoder and decoder share weights
contrast_weight = 0.1     # RAM: lambda of the InfoNCE term. The paper's 1 kept this tiny model's answer at chance
                          # for 1,200 steps: the InfoNCE gradient dominated the clipped step (docs/ram.md)
temperature = 0.05        # RAM: InfoNCE temperature
# data (S8)
task = "passkey"          # passkey (S8) | facts (several facts hidden, the question asks for one)
tokenizer = "auto"        # auto (bytes; a Llama's own) | bytes | gpt2 (if cached) | a .tiktoken file | tokenizer.model
digits = 5                # passkey length
min_len = 128             # shortest training sequence, tokens
max_len = 512             # longest training sequence ("training length"), tokens
curriculum = 0.5          # the longest length ramps from min_len to max_len over this share of the run; 0: off
lm_weight = 0.1           # loss = NLL(answer) + lm_weight * NLL(other tokens); 0: answer tokens only
# optimizer
batch_size = 16
max_iters = 1800
lr = 1.5e-3
memory_lr_mult = 5.0      # memory modules and compression/readout embeddings train at lr * this (S5)
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
warmup = 0.03             # share of the run spent warming up
min_lr = 0.02             # final lr as a share of lr (cosine decay)
grad_clip = 1.0           # 0: off
bptt_chunks = 0           # truncate BPTT every k chunks; 0: through the whole sequence
# -----------------------------------------------------------------------------
DEFAULTS = settings_of(globals())
MODEL_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "rope_theta", "tie_embeddings",
              "chunk_size", "n_global", "stride", "temp_budget", "adapter_rank", "global_gate", "window")
RAM_KEYS = {"segment": "segment", "keep_ratio": "keep_ratio", "ram_shared": "shared",
            "contrast_weight": "contrast_weight", "temperature": "temperature"}  # setting -> RAMConfig field


def get_lr(it: int) -> float:
    """Linear warmup, then cosine decay to min_lr * lr."""
    n_warm = max(1, round(warmup * max_iters))
    if it < n_warm:
        return lr * (it + 1) / n_warm
    progress = (it - n_warm) / max(1, max_iters - n_warm)
    return lr * (min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def get_batch(enc, it: int, device: str):
    """Iteration it's batch and its sequence length. comet: inputs, targets and the answer mask over
    targets, all (B, L-1). truncate: the same with only the last `budget` context tokens. ram: (query, context, answer,
    positives) tensors per shape (ram.groups). Curriculum: the length is uniform in [min_len, hi], hi
    ramping from min_len to max_len."""
    rng = random.Random(seed * 1_000_003 + it)
    ramp = min(1.0, it / (curriculum * max_iters)) if curriculum else 1.0
    length = rng.randint(min_len, round(min_len + ramp * (max_len - min_len)))
    samples = sample_batch(enc, batch_size, length, rng.randrange(2**62), digits, task=task)
    if method == "ram":
        return ramlib.groups(samples, segment, device), length
    tokens, answer = stack(samples)
    if method == "truncate":  # the context's last tokens that fit RAM's budget, then question and answer
        n_context = min(s.n_context for s in samples)  # rows with a shorter question/answer keep a few more
        keep = length - n_context + ramlib.budget(n_context, ram_config())
        tokens, answer = tokens[:, -keep:], answer[:, -keep:]
    tokens, answer = torch.from_numpy(tokens).to(device), torch.from_numpy(answer).to(device)
    return (tokens[:, :-1], tokens[:, 1:], answer[:, 1:]), length


def ram_config_of(config: dict) -> ramlib.RAMConfig:
    return ramlib.RAMConfig(**{field: config[key] for key, field in RAM_KEYS.items()})


def ram_config() -> ramlib.RAMConfig:
    return ram_config_of(globals())


def passkey_loss(logits, targets, answer, whole=None):
    """Mean NLL on the answer tokens + lm_weight * mean NLL on every other real token.
    whole: the answer mask of the whole batch when logits cover only a pipeline rank's tokens; the
    means then divide by the whole batch's counts, so the ranks' losses add up to the loss."""
    whole = answer if whole is None else whole
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
    loss = nll[answer].sum() / whole.sum()
    return loss + lm_weight * nll[~answer].sum() / (~whole).sum() if lm_weight else loss


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


def train_step(model, pipe, autocast, batch, stop: bool) -> tuple[float, float, dict]:
    """Forward + backward of one batch, in one process or over the pipeline's ranks (S7).
    Returns (loss, number of ranks asking to stop, RAM's loss terms for the log)."""
    parts = {}
    with autocast:
        if method == "ram":  # one term per shape of rows, weighted by its rows
            n, loss = sum(g[0].size(0) for g in batch), 0.0
            for g in batch:
                term, terms = model.loss(*g, lm_weight=lm_weight)
                loss = loss + term * (g[0].size(0) / n)
                for k, v in terms.items():
                    parts[k] = parts.get(k, 0.0) + v.item() * (g[0].size(0) / n)
        elif pipe is None:
            x, y, answer = batch
            logits, _ = model(x, bptt_chunks=bptt_chunks)
            loss = passkey_loss(logits, y, answer)
        else:  # this rank's tokens; its loss share is their sum over the whole batch's counts
            x, y, answer = batch
            logits, span = pipe.forward(model, x, bptt_chunks)
            loss = passkey_loss(logits, y[:, span], answer[:, span], whole=answer)
    loss.backward()  # over the pipeline: the wavefront in reverse, memory gradients sent back (S7)
    if pipe is None:
        return loss.item(), float(stop), parts
    return *pipe.all_reduce(model, loss, flag=float(stop)), parts  # gradients, loss, stop requests of every rank


def batch_tokens(batch) -> int:
    """Tokens in a batch: inputs (comet, truncate), or question + context + answer (ram)."""
    return sum(t.numel() for g in batch for t in g[:3]) if method == "ram" else batch[0].numel()


def evaluate(model, enc) -> float:
    """Exact-match accuracy on the task at max_len over 5 depths (fixed trials, never seen in training)."""
    model.eval()
    per_depth = max(1, eval_trials // 5)
    correct = sum(passkey_cell(model, enc, max_len, d, per_depth, 10**9 + 10 * seed + k, digits, task=task,
                               method=method, ram=ram_config())
                  for k, d in enumerate((0.0, 0.25, 0.5, 0.75, 1.0)))
    model.train()
    return correct / (5 * per_depth)


def build_model(config: dict, enc, ckpt: dict | None, dev: str, verbose: bool) -> Transformer:
    """Resume: the checkpoint's model. Scratch: the settings' model. A Llama directory: its weights plus
    new memories (llama.py); the settings then record the loaded shape."""
    if ckpt is not None:
        model, _ = load_model(os.path.join(config["out_dir"], "ckpt.pt"), dev, ckpt)
        model.train()
    elif config["init_from"] == "scratch":
        # a plain decoder (chunk_size=0) sees whole sequences: its RoPE table must cover max_len
        cfg = ModelConfig(vocab_size=enc.n_vocab, block_size=max(config["max_len"], 1024),
                          **{k: config[k] for k in MODEL_KEYS})
        model = ramlib.RAM(cfg, ram_config(), verbose) if config["method"] == "ram" else Transformer(cfg, verbose)
    else:
        comet = {k: config[k] for k in ("chunk_size", "n_global", "stride", "temp_budget", "adapter_rank",
                                        "global_gate", "window")}
        model = llama.load_llama(config["init_from"], device=dev, **comet)
        config.update({k: getattr(model.config, k) for k in MODEL_KEYS})
        if verbose:
            base, mem = model.param_counts()
            print(f"loaded {config['init_from']}: {base / 1e6:.1f}M parameters + {mem / 1e6:.2f}M new memory "
                  "parameters")
    if enc.n_vocab > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {enc.n_vocab} ids, the model's vocabulary only {model.config.vocab_size}")
    if config["freeze_base"]:
        llama.freeze_base(model)
    return model.to(dev)


def check_settings(config: dict) -> None:
    """Settings that only fail deep inside a run: one clear error now instead."""
    for key in ("batch_size", "max_iters", "max_len", "digits"):
        if config[key] <= 0:
            raise ValueError(f"{key}={config[key]} must be positive")
    if not 0 < config["min_len"] <= config["max_len"]:
        raise ValueError(f"need 0 < min_len={config['min_len']} <= max_len={config['max_len']}")
    if not 0 <= config["curriculum"] <= 1:
        raise ValueError(f"curriculum={config['curriculum']} must lie in [0, 1]")
    if config["device"] not in ("auto", "cpu", "cuda") and not config["device"].startswith("cuda:"):
        raise ValueError(f"device={config['device']!r} must be auto, cpu or cuda")
    if config["dtype"] not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype={config['dtype']!r} must be auto, float32 or bfloat16")
    if config["freeze_base"] and not config["chunk_size"]:
        raise ValueError("freeze_base=True trains only the memories: it needs chunk_size > 0")
    if config["pipeline"] and not config["chunk_size"]:
        raise ValueError("pipeline=True splits sequences by chunks: it needs chunk_size > 0")
    if config["pipeline_schedule"] not in ("wavefront", "naive"):
        raise ValueError(f"pipeline_schedule={config['pipeline_schedule']!r} must be wavefront or naive")
    if config["pipeline_timeout"] <= 0:
        raise ValueError(f"pipeline_timeout={config['pipeline_timeout']} must be positive")
    if config["task"] not in TASKS:
        raise ValueError(f"task={config['task']!r} must be one of {', '.join(TASKS)}")
    if config["method"] not in ramlib.METHODS:
        raise ValueError(f"method={config['method']!r} must be comet, ram or truncate")
    if config["method"] != "comet":
        if config["chunk_size"]:
            raise ValueError(f"method={config['method']} reads with a plain decoder: set chunk_size=0")
        if config["pipeline"] or config["init_from"] not in ("scratch", "resume"):
            raise ValueError(f"method={config['method']} trains from scratch in one process (no pipeline, "
                             "no Llama init_from)")
        ram_config_of(config)  # segment, keep_ratio, ...: one clear error now


def resume_settings(ckpt: dict, out: str) -> dict:
    """The checkpoint's settings, then this command line's; the model and its data cannot change."""
    missing = [k for k in ("optimizer", "iter_num", "config", "rng") if k not in ckpt]
    if missing:
        raise ValueError(f"it is not a training checkpoint (missing {', '.join(missing)})")
    config = configure_or_exit({**DEFAULTS, **ckpt["config"]})
    saved = ckpt["config"]
    ram_keys = {"ram": tuple(RAM_KEYS), "truncate": ("segment", "keep_ratio")}.get(saved.get("method"), ())
    changed = [k for k in (*MODEL_KEYS, *ram_keys, "method", "tokenizer") if config[k] != saved.get(k, DEFAULTS[k])]
    if changed:
        was = ", ".join(f"{k}={saved.get(k, DEFAULTS[k])!r}" for k in changed)
        raise ValueError(f"{', '.join(changed)} cannot change when resuming (the weights were trained with {was})")
    return {**config, "out_dir": out}  # it lives where it was found, wherever it was first written


def pretrained(path: str) -> bool:
    """A Llama checkpoint directory or GGUF file to start from (llama.load_llama reads both)."""
    return os.path.isdir(path) or (path.endswith(".gguf") and os.path.isfile(path))


def main() -> None:
    config = configure_or_exit(DEFAULTS)
    ckpt_path = os.path.join(config["out_dir"], "ckpt.pt")
    ckpt = None
    if config["init_from"] == "resume":
        try:
            ckpt = read_checkpoint(ckpt_path)
            config = resume_settings(ckpt, config["out_dir"])
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot resume: {e}")
    elif config["init_from"] != "scratch" and not pretrained(config["init_from"]):
        raise SystemExit(f"error: init_from={config['init_from']!r} must be 'scratch', 'resume', a Llama "
                         "checkpoint directory or a .gguf file")
    elif os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} exists: continue it with --init_from=resume, or train into "
                         "another --out_dir, or delete it first")
    if config["tokenizer"] == "auto":  # resolved here, so that the checkpoint records the real one
        config["tokenizer"] = config["init_from"] if pretrained(config["init_from"]) else "bytes"
    globals().update(config)

    try:
        check_settings(config)
        enc = get_tokenizer(tokenizer)
        (sample,) = sample_batch(enc, 1, min_len, 0, digits, task=task)  # fail now if min_len is too short
        if method == "ram" and segment + len(sample.question) > max(max_len, 1024):
            raise ValueError(f"segment={segment} + the question's {len(sample.question)} tokens exceed the "
                             f"decoder's {max(max_len, 1024)} positions: use a shorter segment")
    except (OSError, TypeError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    dev = pick_device(device)
    pipe = None
    if pipeline:
        try:
            pipe = Pipeline.from_env(dev, pipeline_schedule, pipeline_timeout)
            rank_chunks(math.ceil((min_len - 1) / chunk_size), 0, pipe.world)  # the shortest batch must split
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        dev = pipe.device
        if dev == "cpu" and not threads:
            torch.set_num_threads(1)  # one core per rank: oversubscribed cores slow gloo runs badly
    master = pipe is None or pipe.rank == 0  # logs, prints and writes checkpoints
    cuda = torch.device(dev).type == "cuda"  # dev may be cuda:N (a pipeline rank)
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and cuda and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(torch.device(dev).type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        model = build_model(config, enc, ckpt, dev, verbose=master)
    except (OSError, TypeError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    optimizer = make_optimizer(model, fused=cuda)
    iter_num, acc, log_path = 0, None, os.path.join(out_dir, "log.jsonl")
    if master:
        os.makedirs(out_dir, exist_ok=True)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        iter_num, acc = ckpt["iter_num"], ckpt.get("passkey_acc")
        if master and os.path.exists(log_path):  # drop what was logged after the checkpoint (and a torn line)
            with open(log_path) as f:
                kept = [line for line in f if line.endswith("\n") and json.loads(line)["iter"] < iter_num]
            with open(log_path, "w") as f:
                f.writelines(kept)
        if master:
            print(f"resuming from {ckpt_path} at iteration {iter_num}")
    elif master and os.path.exists(log_path):
        os.remove(log_path)
    if pipe:
        pipe.broadcast_parameters(model)  # every rank holds rank 0's weights, whatever happened before
    if compile:
        for block in model.modules():
            if isinstance(block, Block):
                block.compile(dynamic=True)

    def checkpoint(it: int, acc: float | None) -> None:
        extra = dict(ram_args=asdict(model.ram)) if method == "ram" else {}
        save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                             model_args=asdict(model.config), iter_num=it, config=config, passkey_acc=acc,
                             rng=dict(torch=torch.get_rng_state()), **extra), ckpt_path)

    stop = []  # Ctrl-C: finish the step, checkpoint, exit
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    t0, n_tok = time.perf_counter(), 0
    bar = tqdm(total=max_iters, initial=iter_num, unit="it", dynamic_ncols=True, disable=not master)
    model.train()
    try:
        with open(log_path, "a") if master else contextlib.nullcontext() as log:
            for it in range(iter_num, max_iters):
                lr_now = get_lr(it)
                for group in optimizer.param_groups:
                    group["lr"] = lr_now * group["lr_mult"]
                batch, length = get_batch(enc, it, dev)
                optimizer.zero_grad(set_to_none=True)
                loss, stops, parts = train_step(model, pipe, autocast, batch, bool(stop))
                # ranks stop together, on what they all-reduced (a Ctrl-C during the step counts next step)
                halt = stops > 0 if pipe else bool(stop)
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                n_tok += batch_tokens(batch)
                record = dict(iter=it, loss=loss, lr=lr_now, len=length, **parts)
                done = it + 1 == max_iters
                if (eval_interval and (it + 1) % eval_interval == 0) or done:
                    record["passkey_acc"] = acc = evaluate(model, enc)  # every rank: no one waits for rank 0
                save = (ckpt_interval and (it + 1) % ckpt_interval == 0) or done or halt
                if master:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    if save:
                        checkpoint(it + 1, acc)
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
