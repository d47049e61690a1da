"""Passkey retrieval accuracy (SPEC S8) over a grid of lengths x depths, streamed with constant memory.

    python eval_passkey.py --ckpt out/ckpt.pt --lengths 1024,65536,1048576 --depths 0,0.5,1 --trials 2 \
        --json out/passkey.json

Each trial is a fresh passkey sequence; the context is streamed through the memories (S6) in pieces,
then the answer is decoded greedily. A trial counts when every answer token is right (exact match).
"""
from __future__ import annotations

import json as jsonlib
import os
import random
import resource
import time

import numpy as np
import torch
from tqdm import tqdm

from data import make_passkey

# -----------------------------------------------------------------------------
ckpt = "out/ckpt.pt"            # checkpoint written by train.py
lengths = ""                    # comma-separated token counts; "" -> 1x, 4x, 16x the training length
depths = "0,0.25,0.5,0.75,1"    # relative depths of the passkey sentence in the filler
trials = 20                     # sequences per cell
seed = 1234                     # trials are reproducible from it (and differ from training data)
piece = 65536                   # tokens streamed per call; any value gives the same result
json = ""                       # write the results to this JSON file
png = ""                        # heatmap PNG (needs matplotlib); "" -> next to --json if given
device = "auto"                 # auto | cpu | cuda
threads = 0                     # torch CPU threads; 0 = torch's default
# -----------------------------------------------------------------------------


@torch.no_grad()
def passkey_cell(model, enc, length: int, depth: float, trials: int, seed: int, digits: int = 5,
                 piece: int = 65536) -> int:
    """Number of `trials` passkey sequences of `length` tokens whose key the model retrieves exactly."""
    rng = random.Random(seed)
    samples = [make_passkey(enc, length, depth, rng, digits) for _ in range(trials)]
    device = model.tok_embeddings.weight.device
    correct = 0
    for n_answer in sorted({len(s.answer) for s in samples}):  # a BPE key may take more or fewer tokens
        group = [s for s in samples if len(s.answer) == n_answer]
        n_prompt = length - n_answer
        state = model.new_stream(len(group))
        for a in range(0, n_prompt, piece):
            b = min(a + piece, n_prompt)
            idx = torch.from_numpy(np.stack([s.tokens(a, b) for s in group])).to(device)
            if b < n_prompt:
                _, state = model.stream(idx, state)
            else:
                out, state = model.generate(idx, n_answer, temperature=0, state=state)
        answers = torch.from_numpy(np.stack([s.answer for s in group])).to(device)
        correct += int((out == answers).all(1).sum())
    return correct


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def ascii_heatmap(grid: np.ndarray, lens: list[int], deps: list[float], trials: int) -> str:
    """Rows = lengths, columns = depths, cells = accuracy in % with a shade for the eye."""
    shade = lambda a: "█" if a >= 95 else "▓" if a >= 75 else "▒" if a >= 50 else "░" if a > 0 else " "
    lines = [f"passkey accuracy (%), {trials} trials per cell",
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


def main() -> None:
    from checkpoint import check_fits, open_for_inference
    from configurator import configure_or_exit, settings_of

    cfg = configure_or_exit(settings_of(globals()))
    try:
        if cfg["trials"] <= 0 or cfg["piece"] <= 0:
            raise ValueError(f"trials={cfg['trials']} and piece={cfg['piece']} must be positive")
        model, enc, train, dev = open_for_inference(cfg)
        lens = [int(x) for x in cfg["lengths"].split(",")] if cfg["lengths"] else \
            [train.get("max_len", 512) * m for m in (1, 4, 16)]
        deps = [float(x) for x in cfg["depths"].split(",")]
        for d in deps:
            make_passkey(enc, min(lens), d, random.Random(0), train.get("digits", 5))  # bad depth, too short
        check_fits(model, max(lens))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    digits = train.get("digits", 5)
    print(f"evaluating {cfg['ckpt']} (trained to {train.get('max_len', '?')} tokens) on {dev}: "
          f"{len(lens)} lengths x {len(deps)} depths x {cfg['trials']} trials")
    grid, cells, peaks = np.zeros((len(lens), len(deps))), [], {}
    bar = tqdm(total=sum(lens) * len(deps) * cfg["trials"], unit="tok", unit_scale=True)
    for i, n in enumerate(lens):
        t0 = time.perf_counter()
        for j, d in enumerate(deps):
            c = passkey_cell(model, enc, n, d, cfg["trials"], cfg["seed"] + 1000 * i + j, digits, cfg["piece"])
            grid[i, j] = 100 * c / cfg["trials"]
            cells.append(dict(length=n, depth=d, correct=c, trials=cfg["trials"], accuracy=grid[i, j] / 100))
            bar.update(n * cfg["trials"])
        tok_s = n * len(deps) * cfg["trials"] / (time.perf_counter() - t0)
        peaks[n] = peak_memory_mib(dev)
        bar.write(f"length {n:>9,}: mean accuracy {grid[i].mean():5.1f}%  {tok_s:9,.0f} tok/s  "
                  f"peak memory so far {peaks[n]:7.1f} MiB")
    bar.close()
    print(ascii_heatmap(grid, lens, deps, cfg["trials"]))
    if cfg["json"]:
        os.makedirs(os.path.dirname(os.path.abspath(cfg["json"])), exist_ok=True)
        with open(cfg["json"], "w") as f:
            jsonlib.dump(dict(ckpt=cfg["ckpt"], device=dev, cells=cells,
                              peak_memory_mib={str(k): v for k, v in peaks.items()}), f, indent=1)
        print(f"wrote {cfg['json']}")
    png_path = cfg["png"] or (os.path.splitext(cfg["json"])[0] + ".png" if cfg["json"] else "")
    if png_path:
        print(f"wrote {png_path}" if save_png(grid, lens, deps, png_path) else "no PNG: matplotlib is not installed")


if __name__ == "__main__":
    main()
