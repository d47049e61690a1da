"""Passkey retrieval accuracy (SPEC S8) over a grid of lengths x depths, streamed with constant memory.

    python eval_passkey.py --ckpt out/ckpt.pt --lengths 1024,65536,1048576 --depths 0,0.5,1 --trials 2 \
        --json out/passkey.json
    python eval_passkey.py --ckpt out/ram/ckpt.pt --method ram --keep_ratio 0.125   # RAM (S9) at 8x
    python eval_passkey.py --inspect --lengths 1024 --depths 0.3 --png docs/inspect  # inside the memories
    python eval_passkey.py --ckpt docs/smollm2/memories.safetensors --dtype bfloat16   # memories on SmolLM2
    python eval_passkey.py --init_from model.gguf --chunk_size 0 --filler out/data/paul_graham_essays.txt
    python eval_passkey.py --ckpt out/smollm2/ckpt.pt --perplexity --lengths 512,2048   # the language model
    python eval_passkey.py --lengths 1048576 --depths 0.5 --trials 1 --state out/pk1m.state --asks 10

Each trial is a fresh sequence of the task (passkey; facts or recall: several facts, one asked; needle); the model
reads the context by its method, then decodes the answer greedily. A trial counts when every answer
token is right (exact match). Methods: comet streams the context through the memories (S6) in pieces
(a chunk_size=0 checkpoint is then plain full attention); ram compresses it for the question (S9,
ram.py); truncate gives a plain decoder (or a RAM checkpoint's decoder) only the last tokens of the
context that fit RAM's budget. With --state, comet reads each context once, writes its stream state to that
file, and answers the question `asks` times, each from the state loaded again (stream.load_state).
"""
from __future__ import annotations

import dataclasses
import json as jsonlib
import math
import os
import random
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import ram as ramlib
from checkpoint import write_atomically
from configurator import configure_or_exit, settings_of
from data import TASKS, by_shape, filler_tokens, make_sample
from inspection import ascii_view, record, save_figures
from model import CHUNK_ALIGNS
from sample import check_fits, open_for_inference, peak_memory_mib, set_block_size
from stream import check_state_path, generate, load_state, new_stream, read_first_chunk, save_state, stream

# -----------------------------------------------------------------------------
ckpt = "out/ckpt.pt"            # checkpoint written by train.py, or trained memories (memories.safetensors)
base = ""                       # trained memories: their base model's path, if not where they were trained
init_from = ""                  # instead: a Llama directory or .gguf file, as pretrained (chunk_size=0) or with
chunk_size = 0                  #   untrained memories (chunk_size > 0; n_global = temp_budget = 0: the
n_global = 16                   #   chunk-local baseline, every chunk alone)
temp_budget = 32
stride = 8
tokenizer = "auto"              # with init_from: auto = its own
dtype = "auto"                  # auto (init_from: bf16 weights on CUDA, else fp32) | float32 | bfloat16: autocast,
                                #   the weights stay fp32, as train.py (about 3x faster on a CPU with AMX)
filler = "auto"                 # auto (as trained) | grass | a text file; its held-out 20% is read
perplexity = False              # instead: perplexity of the held-out filler's last ppl_tail tokens at each
ppl_tail = 256                  #   length, over `trials` evenly spaced windows
method = "auto"                 # auto (as trained) | comet | ram | truncate
chunk_align = "right"           # comet: where chunks start (model.chunk_spans): right, each prompt and its answer end
                                #   a chunk (whatever the model trained with) | left, from the first token (before
                                #   issue 20: answers that crossed a chunk border were mostly missed)
task = "auto"                   # auto (as trained) | passkey | facts | recall | needle
keep_ratio = 0.0                # ram/truncate: share of the context read closely; 0 = as trained
block_size = 0                  # plain decoders (full attention, RAM, truncate): longest input; 0 = as trained
lengths = ""                    # comma-separated token counts; "" -> 1x, 4x, 16x the training length
depths = "0,0.25,0.5,0.75,1"    # relative depths of the passkey sentence (asked fact) in the filler
trials = 20                     # sequences per cell
seed = 1234                     # trials are reproducible from it (and differ from training data)
piece = 65536                   # tokens streamed per call; any value gives the same result
state = ""                      # comet: write each context's stream state to this file, answer from it loaded
asks = 1                        #   again, this many times (read once, ask many times; the time of each is shown)
json = ""                       # write the results to this JSON file
png = ""                        # heatmap PNG (needs matplotlib); "" -> next to --json if given
inspect = False                 # instead: one sequence (first length and depth) through CoMeT, its memories shown
device = "auto"                 # auto | cpu | cuda
threads = 0                     # torch CPU threads; 0 = torch's default
# -----------------------------------------------------------------------------


@torch.no_grad()
def passkey_cell(model, enc, length: int, depth: float, trials: int, seed: int, digits: int = 5,
                 piece: int = 65536, task: str = "passkey", method: str = "comet",
                 ram: ramlib.RAMConfig | None = None, filler: np.ndarray | None = None,
                 tokens_right: list | None = None, state_file: str = "", asks: int = 1,
                 seconds: dict | None = None, align: str = "left") -> int:
    """Number of `trials` sequences of `length` tokens whose answer the model gives exactly.
    ram: RAM's settings (segment, keep_ratio) for method ram (its keep_ratio) and truncate (the budget).
    filler: the filler's token ids (data.filler_tokens; None: S8's repeated sentences).
    tokens_right: if given, each answer position's count of right greedy tokens is added to it (a list of
    ints, one per answer token): partial recall that exact match does not show.
    state_file (comet): the context's stream state is written there and the question asked `asks` times, each
    from the file loaded again; seconds gets the time of reading, saving and asking added (and the file size).
    align (comet): where chunks start (model.chunk_spans over the prompt and the answer's tokens it reads back,
    as training cuts a sequence); "right" closes a short first chunk, so that the question and its answer end a
    chunk."""
    rng = random.Random(seed)
    samples = [make_sample(task, enc, length, depth, rng, digits, filler) for _ in range(trials)]
    device = next(model.parameters()).device
    correct = 0
    for (n_context, _, n_answer), group in by_shape(samples).items():  # BPE may vary these token counts
        answers = torch.from_numpy(np.stack([s.answer for s in group])).to(device)
        if method == "ram":
            ((query, context, _, _),) = ramlib.groups(group, model.ram.segment, device)
            out = model.answer(query, context, n_answer, ram.keep_ratio if ram else None)
            correct += count(out, answers, tokens_right)
            continue
        if isinstance(model, ramlib.RAM):  # truncate: RAM's decoder alone, on the context's last tokens
            model = model.decoder
        n_prompt = length - n_answer
        start = n_context - ramlib.budget(n_context, ram or ramlib.RAMConfig()) if method == "truncate" else 0
        stop, t0 = n_context if state_file else n_prompt, now(device)  # --state: ask after saving
        state = new_stream(model, len(group))
        if method == "comet":  # the chunk plan: maybe a short first chunk, read and closed now
            stop_first = min(stop - (not state_file), model.config.chunk_size)  # generate() needs a prompt token
            first = torch.from_numpy(np.stack([s.tokens(0, stop_first) for s in group]))
            state, start = read_first_chunk(model, first.to(device), n_prompt + n_answer - 1, align)
        for a in range(start, stop, piece):
            b = min(a + piece, stop)
            idx = torch.from_numpy(np.stack([s.tokens(a, b) for s in group])).to(device)
            if b < n_prompt:
                _, state = stream(model, idx, state)
            else:
                out, state = generate(model, idx, n_answer, temperature=0, state=state)
        if state_file:
            question = torch.from_numpy(np.stack([s.tokens(n_context, n_prompt) for s in group])).to(device)
            out = ask_from_state(model, enc, state, n_context, question, n_answer, state_file, asks,
                                 seconds if seconds is not None else {}, now(device) - t0)
        correct += count(out, answers, tokens_right)
    return correct


def ask_from_state(model, enc, state, n_read: int, question: torch.Tensor, n_answer: int, path: str, asks: int,
                   seconds: dict, read: float) -> torch.Tensor:
    """Write the state after the context (n_read tokens) to path, then `asks` times: load it and answer the
    question (B, n) greedily. Returns the last answer (B, n_answer); the times go into seconds."""
    t0 = now(question.device)
    kib = save_state(path, model, state, enc, n_read) / 1024
    t1 = now(question.device)
    for _ in range(asks):
        loaded, _ = load_state(path, model, enc)
        out, _ = generate(model, question, n_answer, temperature=0, state=loaded)
    for k, v in dict(read=read, reads=1, save=t1 - t0, ask=now(question.device) - t1, asks=asks, kib=kib).items():
        seconds[k] = v if k == "kib" else seconds.get(k, 0) + v
    return out


def now(device) -> float:
    """perf_counter once the device's queued work is done (a GPU runs ahead of Python)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def count(out: torch.Tensor, answers: torch.Tensor, tokens_right: list | None) -> int:
    """Rows of out (B, n) equal to answers (B, n); per-position right tokens added to tokens_right."""
    right = out == answers
    if tokens_right is not None:  # groups with answers of other token counts (BPE) add up by position
        per = right.sum(0).tolist()
        tokens_right.extend([0] * (len(per) - len(tokens_right)))
        for i, n in enumerate(per):
            tokens_right[i] += n
    return int(right.all(1).sum())


@torch.no_grad()
def held_out_perplexity(model, ids: np.ndarray, length: int, tail: int, windows: int) -> float:
    """exp(mean NLL) of the last `tail` tokens of `windows` evenly spaced windows of `length` tokens of `ids`,
    each read whole by the model's forward (CoMeT: chunk by chunk through its memories, chunks from the first
    token; a plain decoder: full attention), so the context before the tail is what differs between models."""
    if not 0 < tail < length <= len(ids):
        raise ValueError(f"perplexity needs 0 < ppl_tail={tail} < length={length} <= {len(ids):,} held-out tokens")
    device = next(model.parameters()).device
    nll = []
    for a in np.linspace(0, len(ids) - length, windows).astype(int):
        x = torch.from_numpy(ids[a:a + length]).to(device)[None]  # (1, length)
        logits, _ = model(x)
        nll.append(F.cross_entropy(logits[0, -tail - 1:-1].float(), x[0, -tail:]))
    return math.exp(torch.stack(nll).mean().item())


def ascii_heatmap(grid: np.ndarray, lens: list[int], deps: list[float], trials: int) -> str:
    """Rows = lengths, columns = depths, cells = accuracy in % with a shade for the eye."""
    shade = lambda a: "█" if a >= 95 else "▓" if a >= 75 else "▒" if a >= 50 else "░" if a > 0 else " "
    lines = [f"accuracy (%), {trials} trials per cell",
             "   length | " + " ".join(f"{d:>5.0%}" for d in deps) + " |  mean"]
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
    ax.set_xlabel("passkey depth")
    ax.set_ylabel("context length (tokens)")
    for i, row in enumerate(grid):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.0f}", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def decoder_rows(how: str, ram: ramlib.RAMConfig, enc, task: str, length: int, digits: int,
                 filler: np.ndarray | None = None) -> int:
    """Rows a plain decoder reads for a sequence of `length` tokens: all of them (comet), or the
    compressed/truncated context + question + answer (ram, truncate)."""
    if how == "comet":
        return length
    s = make_sample(task, enc, length, 0.5, random.Random(0), digits, filler)
    return ramlib.budget(s.n_context, ram) + len(s.question) + len(s.answer)


def resolve(cfg: dict, model, train: dict) -> tuple[str, str]:
    """(method, task): as asked, or as the checkpoint was trained; one clear error for a mismatch."""
    trained = "ram" if isinstance(model, ramlib.RAM) else train.get("method", "comet")
    how = trained if cfg["method"] == "auto" else cfg["method"]
    what = train.get("task", "passkey") if cfg["task"] == "auto" else cfg["task"]
    if how not in ramlib.METHODS or what not in TASKS:
        raise ValueError(f"method={how!r} must be comet, ram or truncate; task={what!r} one of {', '.join(TASKS)}")
    if (how == "ram" and trained != "ram") or (how == "comet" and trained == "ram"):
        raise ValueError(f"method={how} needs {'a RAM' if how == 'ram' else 'a CoMeT or plain decoder'} "
                         f"checkpoint; {cfg['ckpt']} was trained with method={trained}")
    if how == "truncate" and model.config.comet:  # a RAM checkpoint's decoder is a plain decoder
        raise ValueError("method=truncate needs a plain decoder (chunk_size=0) or RAM checkpoint")
    return how, what


def inspect_one(model, enc, task: str, length: int, depth: float, seed: int, digits: int, prefix: str,
                filler: np.ndarray | None = None) -> None:
    """Print what the memories do over one sequence (inspection.py) and save its figures at `prefix`_*.png."""
    s = make_sample(task, enc, length, depth, random.Random(seed), digits, filler)
    ins = record(model, torch.from_numpy(s.tokens())[None].to(next(model.parameters()).device))
    C, (a, b) = model.config.chunk_size, s.evidence
    # mark the chunk that holds the end of the answer's first mention (the key's digits), else the sentence's start
    n = len(s.answer)
    hit = [i for i in range(len(s.sentence) - n + 1) if (s.sentence[i:i + n] == s.answer).all()]
    mark = (a + hit[0] + n - 1) // C if hit else a // C
    span = f"{a // C}" + ("" if a // C == (b - 1) // C else f"-{(b - 1) // C}")
    print(f"one {task} sequence of {length:,} tokens in chunks of {C} from its first token: the answer's sentence "
          f"at tokens {a}-{b - 1} (chunk {span}), the question from token {s.n_context} (chunk {s.n_context // C}); "
          f"* marks chunk {mark}, where the answer is first read\n")
    print(ascii_view(ins, mark))
    guess = ins.logits[0, -len(s.answer) - 1:-1].argmax(-1).tolist()  # teacher-forced, as training scores it
    print(f"\nanswer (argmax at each answer position): {enc.decode(guess)!r}, "
          f"expected {enc.decode(s.answer.tolist())!r}")
    if prefix:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        paths = save_figures(ins, prefix, mark)
        print("\n".join(f"wrote {p}" for p in paths) or "no PNG: matplotlib is not installed")


def write_json(path: str, result: dict) -> None:
    """Write `result` to path atomically, readable by everyone (results are for reading)."""
    write_atomically(path, lambda f: f.write(jsonlib.dumps(result, indent=1).encode()), mode=0o644)


def run_perplexity(model, held: np.ndarray, lens: list[int], cfg: dict, record: dict) -> None:
    """Print (and write to --json) the perplexity of the held-out filler's last ppl_tail tokens at each length."""
    rows = []
    for n in tqdm(lens, unit="length"):
        t0 = time.perf_counter()
        rows.append(dict(length=n, tail=cfg["ppl_tail"], windows=cfg["trials"],
                         perplexity=held_out_perplexity(model, held, n, cfg["ppl_tail"], cfg["trials"])))
        tqdm.write(f"length {n:>7,}: perplexity of the last {cfg['ppl_tail']} tokens {rows[-1]['perplexity']:8.3f} "
                   f"({cfg['trials']} windows, {n * cfg['trials'] / (time.perf_counter() - t0):,.0f} tok/s)")
    if cfg["json"]:
        write_json(cfg["json"], dict(**record, perplexity=rows))
        print(f"wrote {cfg['json']}")


class Setup(NamedTuple):
    """What an evaluation reads: the model and how, on what lengths, depths and filler."""
    model: object
    enc: object
    train: dict             # the training settings (empty for a bare pretrained model)
    device: str
    autocast: object        # bf16 autocast, or a no-op
    how: str                # comet | ram | truncate
    what: str               # passkey | facts | recall | needle (data.TASKS)
    ram: ramlib.RAMConfig
    lens: list
    deps: list
    held: np.ndarray | None  # held-out filler tokens; None: S8's repeated sentences
    record: dict            # what the JSON says of the model read
    align: str              # comet: where chunks start (model.chunk_spans)


def prepare(cfg: dict) -> Setup:
    """Open the model (sample.open_for_inference), resolve method, task, lengths, depths and filler, and check
    that every length fits; one ValueError/OSError for anything wrong."""
    if cfg["trials"] <= 0 or cfg["piece"] <= 0 or cfg["block_size"] < 0:
        raise ValueError(f"trials={cfg['trials']} and piece={cfg['piece']} must be positive, block_size >= 0")
    bf16 = cfg["dtype"] == "bfloat16"  # autocast: the weights stay fp32, as train.py
    model, enc, train, dev = open_for_inference({**cfg, "dtype": "float32"} if bf16 else cfg)
    how, what = resolve(cfg, model, train)
    align = cfg["chunk_align"]
    if align not in CHUNK_ALIGNS:
        raise ValueError(f"chunk_align={align!r} must be right or left")
    if cfg["state"] and (how != "comet" or cfg["perplexity"] or cfg["inspect"]):
        raise ValueError(f"--state reads each passkey context once into a stream state: it needs method comet (not "
                         f"{how}), and neither --perplexity nor --inspect")
    if cfg["asks"] < 1 or cfg["asks"] > 1 and not cfg["state"]:
        raise ValueError(f"asks={cfg['asks']}: the times each question is asked from a saved state, >= 1, "
                         "and more than 1 only with --state FILE")
    if cfg["state"]:
        check_state_path(cfg["state"])
    trained = model.ram if how == "ram" else ramlib.RAMConfig(segment=train.get("segment", 50),
                                                               keep_ratio=train.get("keep_ratio", 0.25))
    ram = dataclasses.replace(trained, keep_ratio=cfg["keep_ratio"] or trained.keep_ratio)
    if cfg["block_size"]:
        if model.config.comet:
            raise ValueError("block_size only applies to plain decoders: CoMeT reads any length")
        set_block_size(model, cfg["block_size"])
    lens = [int(x) for x in cfg["lengths"].split(",")] if cfg["lengths"] else \
        [train.get("max_len", 512) * m for m in (1, 4, 16)]
    deps = [float(x) for x in cfg["depths"].split(",")]
    filler = train.get("filler", "grass") if cfg["filler"] == "auto" else cfg["filler"]
    held = filler_tokens(enc, filler, "heldout")
    for d in deps:  # bad depth, too short
        make_sample(what, enc, min(lens), d, random.Random(0), train.get("digits", 5), held)
    check_fits(model, max(lens), decoder_rows(how, ram, enc, what, max(lens), train.get("digits", 5), held))
    source = cfg["init_from"] if cfg["init_from"] and not cfg["ckpt"].endswith(".safetensors") else cfg["ckpt"]
    record = dict(model=source, base=cfg["base"] or None, filler=filler, device=dev, dtype="bfloat16 autocast" if bf16
                  else str(next(model.parameters()).dtype).removeprefix("torch."),
                  **{k: getattr(model.config, k) for k in ("chunk_size", "n_global", "temp_budget", "stride")})
    autocast = torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=bf16)
    return Setup(model, enc, train, dev, autocast, how, what, ram, lens, deps, held, record, align)


def main() -> None:
    cfg = configure_or_exit(settings_of(globals()))
    try:
        r = prepare(cfg)
        if cfg["perplexity"]:
            if r.held is None or r.how != "comet":
                raise ValueError("--perplexity reads held-out real text with the model's own forward: give "
                                 "--filler=a text file, and a CoMeT or plain decoder (not --method ram/truncate)")
            with r.autocast:
                return run_perplexity(r.model, r.held, r.lens, cfg, r.record)
        if cfg["inspect"]:
            if r.how != "comet" or not r.model.config.comet:
                raise ValueError(f"--inspect looks inside CoMeT's memories; {cfg['ckpt']} has none (it is "
                                 f"{'a RAM model' if r.how == 'ram' else 'a plain decoder, chunk_size=0'})")
            return inspect_one(r.model, r.enc, r.what, r.lens[0], r.deps[0], cfg["seed"], r.train.get("digits", 5),
                               cfg["png"] or "out/inspect", r.held)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    digits, lens, deps = r.train.get("digits", 5), r.lens, r.deps
    reads = f", keep_ratio {r.ram.keep_ratio}" if r.how in ("ram", "truncate") else ""
    print(f"evaluating {r.record['model']} (trained to {r.train.get('max_len', '?')} tokens) on {r.device}: "
          f"{r.what} task, method {r.how}{reads}, {len(lens)} lengths x {len(deps)} depths x {cfg['trials']} trials")
    grid, cells, peaks, speeds, states = np.zeros((len(lens), len(deps))), [], {}, {}, {}
    bar = tqdm(total=sum(lens) * len(deps) * cfg["trials"], unit="tok", unit_scale=True)
    for i, n in enumerate(lens):
        t0, seconds = time.perf_counter(), {}
        for j, d in enumerate(deps):
            tokens_right = []
            try:
                with r.autocast:
                    c = passkey_cell(r.model, r.enc, n, d, cfg["trials"], cfg["seed"] + 1000 * i + j, digits,
                                     cfg["piece"], r.what, r.how, r.ram, r.held, tokens_right, cfg["state"],
                                     cfg["asks"], seconds, r.align)
            except OSError as e:  # --state: a disk that fills up
                raise SystemExit(f"error: {e}") from None
            grid[i, j] = 100 * c / cfg["trials"]
            cells.append(dict(length=n, depth=d, correct=c, trials=cfg["trials"], accuracy=grid[i, j] / 100,
                              tokens_right=tokens_right))
            bar.update(n * cfg["trials"])
        speeds[n] = n * len(deps) * cfg["trials"] / (time.perf_counter() - t0)
        peaks[n] = peak_memory_mib(r.device)
        bar.write(f"length {n:>9,}: mean accuracy {grid[i].mean():5.1f}%  {speeds[n]:9,.0f} tok/s  "
                  f"peak memory so far {peaks[n]:7.1f} MiB")
        if seconds:  # --state: per batch of trials, reading the context once, then each question from the file
            k = seconds["reads"]  # batches of trials read, each once
            states[n] = dict(reads=k, s_per_read=seconds["read"] / k, s_per_save=seconds["save"] / k,
                             state_kib=seconds["kib"], asks=seconds["asks"], s_per_ask=seconds["ask"] / seconds["asks"])
            bar.write(f"  per batch of trials: read in {states[n]['s_per_read']:.2f} s, a state file of "
                      f"{seconds['kib']:,.1f} KiB written in {states[n]['s_per_save']:.3f} s, then "
                      f"{states[n]['s_per_ask']:.3f} s per asking from it (loaded again each time)")
        if cfg["json"]:  # after every length: a long run killed midway keeps what it measured
            chunked = r.how == "comet" and r.model.config.comet  # where chunks start matters only then
            write_json(cfg["json"], dict(**r.record, chunk_align=r.align if chunked else None, task=r.what,
                                         method=r.how, keep_ratio=r.ram.keep_ratio if r.how in ("ram", "truncate")
                                         else None, cells=cells, tok_s={str(k): v for k, v in speeds.items()},
                                         state={str(k): v for k, v in states.items()},
                                         peak_memory_mib={str(k): v for k, v in peaks.items()}))
    bar.close()
    print(ascii_heatmap(grid, lens, deps, cfg["trials"]))
    if cfg["json"]:
        print(f"wrote {cfg['json']}")
    png_path = cfg["png"] or (os.path.splitext(cfg["json"])[0] + ".png" if cfg["json"] else "")
    if png_path:
        print(f"wrote {png_path}" if save_png(grid, lens, deps, png_path) else "no PNG: matplotlib is not installed")


if __name__ == "__main__":
    main()
