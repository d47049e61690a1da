"""Passkey retrieval accuracy (docs/design.md, S8) over a grid of lengths x depths, streamed at constant memory.

    python eval_passkey.py                                # the model of out/ckpt.pt, else the shipped one
    python eval_passkey.py --ckpt out/ckpt.pt --lengths 1024,65536,1048576 --depths 0,0.5,1 --trials 2 \
        --json out/passkey.json
    python eval_passkey.py --ckpt docs/smollm2/frozen_recipe/memories.safetensors --dtype bfloat16   # memories on SmolLM2
    python eval_passkey.py --init_from model.gguf --chunk_size 0 --filler out/data/paul_graham_essays.txt
    python eval_passkey.py --ckpt out/smollm2/ckpt.pt --perplexity --lengths 512,2048   # the language model
    python eval_passkey.py --lengths 1048576 --depths 0.5 --trials 1 --state out/pk1m.state --asks 10

Each trial is a fresh sequence: a passkey hidden at a depth of the filler, then the question; the model reads it
(stream.ask: in pieces, the chunks cut so that the answer ends one, unless chunk_align=left) and decodes the answer
greedily. A trial counts when every answer token is right. A chunk_size=0 checkpoint is plain full attention. With
--state, the model reads each context once, writes its stream state to that file, and answers the question `asks`
times, each from the state loaded again. Also what every inference script shares: `open_model`.
"""
from __future__ import annotations

import json as jsonlib
import math
import os
import random
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import load_model, read_checkpoint, safetensors_format, write_atomically
from configurator import (JSON, PNG, check_output, configure_or_exit, parse_list, peak_memory_mib, pick_device,
                          pick_dtype, settings_of)
from data import by_shape, filler_tokens, get_tokenizer, make_passkey
from llama import MEMORIES_FORMAT, attach_memories, load_llama, read_memories
from model import CHUNK_ALIGNS, MEMORY_SETTINGS, Transformer
from stream import ask, check_state_path, generate, load_state, read, save_state

# -----------------------------------------------------------------------------
ckpt = ""                       # train.py's checkpoint, a model file, or trained memories (memories.safetensors);
                                #   "": out/ckpt.pt once a run has written it, else the shipped default model
base_path = ""                  # trained memories: their base model's path, if not where they were trained
init_from = ""                  # instead: a Llama directory or .gguf file, as pretrained (chunk_size=0) or with
chunk_size = 0                  #   untrained memories (chunk_size > 0; n_global = temp_budget = 0: the
n_global = 16                   #   chunk-local baseline, every chunk alone)
temp_budget = 32
stride = 8
sink_token = -1                 #   with init_from: a sink row of this token in front of every chunk (-1: none)
tokenizer = "auto"              # with init_from: auto = its own
dtype = "auto"                  # auto (init_from: bf16 weights on CUDA, else fp32) | float32 | bfloat16: autocast,
                                #   the weights stay fp32, as train.py
filler = "auto"                 # auto (as trained) | grass | a text file; its held-out 20% is read
perplexity = False              # instead: perplexity of the held-out filler's last ppl_tail tokens at each
ppl_tail = 256                  #   length, over `trials` evenly spaced windows
chunk_align = "right"           # where chunks start: right (each prompt and its answer end a chunk) | left
block_size = 0                  # plain decoders (full attention): longest input; 0 = as trained
lengths = ""                    # comma-separated token counts; "" -> 1x, 4x, 16x the training length
depths = "0,0.25,0.5,0.75,1"    # relative depths of the passkey sentence in the filler
trials = 20                     # sequences per cell
seed = 1234                     # trials are reproducible from it (and differ from training data)
piece = 65536                   # tokens streamed per call; any value gives the same result
state = ""                      # write each context's stream state to this file, answer from it loaded again,
asks = 1                        #   this many times (read once, ask many times; the time of each is shown)
json = ""                       # write the results to this JSON file
png = ""                        # heatmap PNG (needs matplotlib); "" -> next to --json if given
device = "auto"                 # auto | cpu | cuda
threads = 0                     # torch CPU threads; 0 = torch's default
# -----------------------------------------------------------------------------
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "default.safetensors")


def checkpoint_path(ckpt: str) -> str:
    """The file --ckpt names; "": out/ckpt.pt once a run has written it, else the shipped default model."""
    return ckpt or ("out/ckpt.pt" if os.path.exists("out/ckpt.pt") else SHIPPED)


def open_model(cfg: dict) -> tuple[Transformer, object, dict, str]:
    """What every inference script opens: trained memories (a memories file) on their base model (cfg["base_path"],
    else the path they record); a Llama directory or GGUF file (cfg["init_from"]) with new, untrained memories if
    cfg["chunk_size"] > 0; or train.py's checkpoint or a model file (cfg["ckpt"]; "": out/ckpt.pt once a run has
    written it, else the shipped model). Returns (model, tokenizer, training settings, device); ValueError/OSError."""
    dev = pick_device(cfg["device"])
    dtype = pick_dtype(cfg.get("dtype", "auto"), dev)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    path = checkpoint_path(cfg["ckpt"])
    memories = path.endswith(".safetensors") and safetensors_format(path) == MEMORIES_FORMAT  # llama.save_memories
    if cfg.get("init_from") and not memories:
        sizes = {k: cfg[k] for k in MEMORY_SETTINGS if k in cfg}  # the untrained memories asked for
        model = load_llama(cfg["init_from"], dtype, dev, **sizes)
        return model, get_tokenizer(cfg["init_from"] if cfg["tokenizer"] == "auto" else cfg["tokenizer"]), {}, dev
    if memories:
        tensors, header = read_memories(path)
    else:
        ckpt = read_checkpoint(path) if not path.endswith(".safetensors") else None
        if ckpt is None or "base" not in ckpt:
            model, ckpt = load_model(path, dev, ckpt)
            train = ckpt.get("config", {})
            return model, get_tokenizer(train.get("tokenizer", "bytes")), train, dev
        tensors, header = ckpt["model"], {**ckpt["base"], "settings": ckpt["config"]}  # memories on a frozen base
    base = cfg.get("base_path") or header["base_path"]  # the base is read again, from where it is now
    trained = header["settings"].get("tokenizer", "auto")  # the base's own, or the one the training named
    enc = get_tokenizer(base if trained in ("auto", header["base_path"]) else trained)
    return attach_memories(base, tensors, header, path, dtype, dev), enc, header["settings"], dev


def set_block_size(model: torch.nn.Module, block_size: int) -> None:
    """Let a plain decoder (or each of RAM's) read up to block_size positions, e.g. beyond its training length: RoPE
    has no weights, only a longer table (the positions beyond training were never seen)."""
    for m in model.modules():
        if isinstance(m, Transformer):
            m.config.block_size = block_size
            m.build_rope(m.tok_embeddings.weight.device)


def check_fits(model: Transformer, n_tokens: int) -> None:
    """A plain decoder (chunk_size=0) cannot read past its block_size; CoMeT streams any length."""
    if not model.config.comet and n_tokens > model.config.block_size:
        raise ValueError(f"this checkpoint is a plain decoder (chunk_size=0): {n_tokens:,} tokens are more than its "
                         f"block_size={model.config.block_size:,}; --block_size={n_tokens} lets it try (positions "
                         "beyond its training length were never trained)")


def now(device) -> float:
    """perf_counter once the device's queued work is done (a GPU runs ahead of Python)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def passkey_cell(model: Transformer, samples: list, align: str = "left", piece: int = 65536,
                 tokens_right: list | None = None, enc=None, state_file: str = "", asks: int = 1,
                 seconds: dict | None = None) -> int:
    """How many of `samples` (data.Passkey) the model answers exactly, read by `stream.ask` as `align` says.
    tokens_right: each answer position's count of right tokens is added to it (partial recall exact match hides).
    state_file: each context's stream state is written there (enc names its tokenizer) and the question asked
    `asks` times, each from the file loaded again; seconds gets the times of reading, saving and asking added."""
    device, correct = next(model.parameters()).device, 0
    for (n_context, _, n_answer), group in by_shape(samples).items():  # BPE may vary these token counts
        answers = torch.from_numpy(np.stack([s.answer for s in group])).to(device)
        tokens = lambda a, b: torch.from_numpy(np.stack([s.tokens(a, b) for s in group])).to(device)
        n_prompt, t0 = group[0].length - n_answer, now(device)
        if not state_file:
            out, _ = ask(model, tokens, n_prompt, n_answer, align=align, piece=piece)
        else:  # the context, its chunks cut for what follows; then the question asked from the saved state
            state = read(model, tokens, n_context, None, align, n_prompt - n_context + n_answer - 1, piece)
            out = ask_from_state(model, enc, state, n_context, tokens(n_context, n_prompt), n_answer, state_file,
                                 asks, seconds if seconds is not None else {}, now(device) - t0)
        correct += count_right(out == answers, tokens_right)
    return correct


def count_right(right: torch.Tensor, tokens_right: list | None) -> int:
    """Rows of right (B, n_answer: token matches) all right; each answer position's count of right tokens is added
    to tokens_right (groups with answers of other token counts add up by position)."""
    if tokens_right is not None:
        tokens_right.extend([0] * (right.size(1) - len(tokens_right)))
        for i, n in enumerate(right.sum(0).tolist()):
            tokens_right[i] += n
    return int(right.all(1).sum())


def ask_from_state(model, enc, state, n_read: int, question: torch.Tensor, n_answer: int, path: str, asks: int,
                   seconds: dict, read_s: float) -> torch.Tensor:
    """Write the state after the context (n_read tokens) to path, then `asks` times: load it and answer the question
    (B, n) greedily. Returns the last answer (B, n_answer); the times go into seconds."""
    t0 = now(question.device)
    kib = save_state(path, model, state, enc, n_read) / 1024
    t1 = now(question.device)
    for _ in range(asks):
        loaded, _ = load_state(path, model, enc)
        out, _ = generate(model, question, n_answer, temperature=0, state=loaded)
    for k, v in dict(read=read_s, reads=1, save=t1 - t0, ask=now(question.device) - t1, asks=asks, kib=kib).items():
        seconds[k] = v if k == "kib" else seconds.get(k, 0) + v
    return out


@torch.no_grad()
def held_out_perplexity(model, ids: np.ndarray, length: int, tail: int, windows: int) -> float:
    """exp(mean NLL) of the last `tail` tokens of `windows` evenly spaced windows of `length` tokens of `ids`, each
    read whole by the model's forward (CoMeT: chunk by chunk from the first token; a plain decoder: full attention),
    so that the context before the tail is what differs between models."""
    if not 0 < tail < length <= len(ids):
        raise ValueError(f"perplexity needs 0 < ppl_tail={tail} < length={length} <= {len(ids):,} held-out tokens")
    device, nll = next(model.parameters()).device, []
    for a in np.linspace(0, len(ids) - length, windows).astype(int):
        x = torch.from_numpy(ids[a:a + length]).to(device)[None]  # (1, length)
        logits, _ = model(x)
        nll.append(F.cross_entropy(logits[0, -tail - 1:-1].float(), x[0, -tail:]))
    return math.exp(torch.stack(nll).mean().item())


def ascii_heatmap(grid: np.ndarray, lens: list[int], deps: list[float], trials: int) -> str:
    """Rows = lengths, columns = depths, cells = accuracy in % with a shade for the eye."""
    shade = lambda a: "█" if a >= 95 else "▓" if a >= 75 else "▒" if a >= 50 else "░" if a > 0 else " "
    lines = [f"accuracy (%), {trials} trials per cell", "   length | " + " ".join(f"{d:>5.0%}" for d in deps) + " |  mean"]
    for n, row in zip(lens, grid):
        lines.append(f"{n:>9,} | " + " ".join(f"{shade(a)}{a:>4.0f}" for a in row) + f" | {row.mean():5.1f}")
    return "\n".join(lines)


def save_png(grid: np.ndarray, lens: list[int], deps: list[float], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(deps), 1.0 + 0.5 * len(lens)))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(deps)), [f"{d:.0%}" for d in deps])
    ax.set_yticks(range(len(lens)), [f"{n:,}" for n in lens])
    ax.set(xlabel="passkey depth", ylabel="context length (tokens)")
    for i, row in enumerate(grid):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.0f}", ha="center", va="center")
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120), mode=0o644)
    plt.close(fig)
    return True


def png_path(cfg: dict) -> str:
    """Where the heatmap goes: --png, else beside --json, else nowhere ("")."""
    return cfg.get("png") or (os.path.splitext(cfg["json"])[0] + ".png" if cfg["json"] else "")


def write_json(path: str, result: dict) -> None:
    """Write `result` to path atomically, readable by everyone (results are for reading)."""
    write_atomically(path, lambda f: f.write(jsonlib.dumps(result, indent=1).encode()), mode=0o644)


class Setup(NamedTuple):
    """What an evaluation reads: the model, the lengths, depths and filler, and how to make a trial."""
    model: object
    enc: object
    train: dict              # the training settings (empty for a bare pretrained model)
    device: str
    autocast: object         # bf16 autocast, or a no-op
    lens: list
    deps: list
    held: np.ndarray | None  # held-out filler tokens; None: S8's repeated sentences
    record: dict             # what the JSON says of the model and how it was read
    make: Callable = make_passkey  # one trial: (enc, length, depth, rng, digits, filler) -> data.Passkey


def prepare(cfg: dict, opened: tuple | None = None, make: Callable = make_passkey,
            rows: Callable[[int], int] = lambda n: n) -> Setup:
    """Open the model (`open_model`, unless `opened` brings it) and check the settings: lengths, depths and filler
    that make trials, lengths the model can read (rows(n): what it reads of n tokens); one ValueError/OSError."""
    if cfg["chunk_align"] not in CHUNK_ALIGNS:  # numbers: their ranges are configurator.RULES
        raise ValueError(f"chunk_align={cfg['chunk_align']!r} must be right or left")
    lens = parse_list("lengths", cfg["lengths"]) if cfg["lengths"] else None
    deps = parse_list("depths", cfg["depths"], float)
    for flag, path, kind in (("--json", cfg["json"], JSON), ("--png" if cfg.get("png") else "--json", png_path(cfg),
                                                             PNG)):
        if path:  # before any long work, not after it
            check_output(path, flag, kind)
    if cfg.get("asks", 1) < 1 or cfg.get("asks", 1) > 1 and not cfg.get("state"):
        raise ValueError(f"asks={cfg['asks']}: the times each question is asked from a saved state, >= 1, "
                         "and more than 1 only with --state FILE")
    if cfg.get("state"):
        if cfg.get("perplexity"):
            raise ValueError("--state saves each passkey context's stream state: it does not go with --perplexity")
        check_state_path(cfg["state"], "state")  # before a long read, not after
    bf16 = cfg["dtype"] == "bfloat16"  # autocast: the weights stay fp32, as train.py
    model, enc, train, dev = opened or open_model({**cfg, "dtype": "float32"} if bf16 else cfg)
    if cfg["block_size"]:
        if model.config.comet:
            raise ValueError("block_size only applies to plain decoders: CoMeT reads any length")
        set_block_size(model, cfg["block_size"])
    lens = lens or [train.get("max_len", 512) * m for m in (1, 4, 16)]
    filler = train.get("filler", "grass") if cfg["filler"] == "auto" else cfg["filler"]
    held = filler_tokens(enc, filler, "heldout")
    for d in deps:  # a bad depth, a length too short
        make(enc, min(lens), d, random.Random(0), train.get("digits", 5), held)
    check_fits(getattr(model, "decoder", model), rows(max(lens)))
    record = dict(model=cfg["init_from"] or checkpoint_path(cfg["ckpt"]), base=cfg["base_path"] or None, filler=filler,
                  device=dev, dtype="bfloat16 autocast" if bf16 else str(next(model.parameters()).dtype)[6:],
                  chunk_align=cfg["chunk_align"] if model.config.comet else None,
                  **{k: getattr(model.config, k) for k in MEMORY_SETTINGS})
    autocast = torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=bf16)
    return Setup(model, enc, train, dev, autocast, lens, deps, held, record, make)


def grid(r: Setup, cfg: dict, cell: Callable[[list, list, dict], int]) -> None:
    """Every length x depth: `trials` sequences made from the seed, cell(samples, tokens_right, seconds) counting the
    right answers; the speed and peak memory of each length; the JSON written after each length (a run killed
    midway keeps what it measured), then the heatmap (ASCII, and PNG if asked)."""
    digits, lens, deps, trials_n = r.train.get("digits", 5), r.lens, r.deps, cfg["trials"]
    accuracy, cells, peaks, speeds, states = np.zeros((len(lens), len(deps))), [], {}, {}, {}
    bar = tqdm(total=sum(lens) * len(deps) * trials_n, unit="tok", unit_scale=True)
    for i, n in enumerate(lens):
        t0, seconds = time.perf_counter(), {}
        for j, d in enumerate(deps):
            rng, tokens_right = random.Random(cfg["seed"] + 1000 * i + j), []
            samples = [r.make(r.enc, n, d, rng, digits, r.held) for _ in range(trials_n)]
            with r.autocast:
                c = cell(samples, tokens_right, seconds)
            accuracy[i, j] = 100 * c / trials_n
            cells.append(dict(length=n, depth=d, correct=c, trials=trials_n, accuracy=c / trials_n,
                              tokens_right=tokens_right))
            bar.update(n * trials_n)
        speeds[n], peaks[n] = n * len(deps) * trials_n / (time.perf_counter() - t0), peak_memory_mib(r.device)
        bar.write(f"length {n:>9,}: mean accuracy {accuracy[i].mean():5.1f}%  {speeds[n]:9,.0f} tok/s  peak memory "
                  f"so far {peaks[n]:7.1f} MiB")
        if seconds:  # --state: per batch of trials, reading the context once, then each question from the file
            states[n] = dict(reads=seconds["reads"], s_per_read=seconds["read"] / seconds["reads"], asks=seconds["asks"],
                             s_per_save=seconds["save"] / seconds["reads"], state_kib=seconds["kib"],
                             s_per_ask=seconds["ask"] / seconds["asks"])
            bar.write(f"  per batch of trials: read in {states[n]['s_per_read']:.2f} s, a state file of "
                      f"{seconds['kib']:,.1f} KiB written in {states[n]['s_per_save']:.3f} s, then "
                      f"{states[n]['s_per_ask']:.3f} s per asking from it (loaded again each time)")
        if cfg["json"]:
            write_json(cfg["json"], dict(**r.record, cells=cells, tok_s={str(k): v for k, v in speeds.items()},
                                         state={str(k): v for k, v in states.items()},
                                         peak_memory_mib={str(k): v for k, v in peaks.items()}))
    bar.close()
    print(ascii_heatmap(accuracy, lens, deps, trials_n))
    png = png_path(cfg)
    if png:
        print(f"wrote {png}" if save_png(accuracy, lens, deps, png) else "no PNG: matplotlib is not installed")


def main() -> None:
    cfg = configure_or_exit(settings_of(globals()))
    try:
        r = prepare(cfg)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if cfg["perplexity"]:
        if r.held is None:
            raise SystemExit("error: --perplexity reads held-out real text: give --filler=a text file")
        rows = []
        for n in tqdm(r.lens, unit="length"):
            with r.autocast:
                ppl = held_out_perplexity(r.model, r.held, n, cfg["ppl_tail"], cfg["trials"])
            rows.append(dict(length=n, tail=cfg["ppl_tail"], windows=cfg["trials"], perplexity=ppl))
            tqdm.write(f"length {n:>7,}: perplexity of the last {cfg['ppl_tail']} tokens {ppl:8.3f}")
        return write_json(cfg["json"], dict(**r.record, perplexity=rows)) if cfg["json"] else None
    print(f"evaluating {r.record['model']} (trained to {r.train.get('max_len', '?')} tokens) on {r.device}: "
          f"{len(r.lens)} lengths x {len(r.deps)} depths x {cfg['trials']} trials")
    try:
        grid(r, cfg, lambda samples, right, seconds: passkey_cell(r.model, samples, cfg["chunk_align"], cfg["piece"],
                                                                  right, r.enc, cfg["state"], cfg["asks"], seconds))
    except OSError as e:  # --state: a disk that fills up
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
