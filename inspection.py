"""See inside CoMeT's memories: per layer and chunk, the global memory's gates (S3), what the FIFO
temporary memory holds (S4), and how much attention a chunk's tokens give to G, T and their own chunk.

    python inspection.py                                   # one passkey sequence through the default model
    python inspection.py --ckpt out/ckpt.pt --length 1024 --depth 0.3 --png docs/inspect   # ASCII + 3 PNGs

`record` runs the ordinary chunk loop (`Transformer.chunks`, as the forward does) with forward hooks: one reads
each global memory's gate, one recomputes each attention call's weights from the call's own inputs.
The fast SDPA path is untouched, so the logits equal the model's without inspection (a test checks it).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor

from checkpoint import write_atomically
from configurator import PNG, check_output, configure_or_exit, settings_of
from data import filler_tokens, make_passkey
from eval_passkey import open_model
from model import Transformer

# -----------------------------------------------------------------------------
ckpt = ""                 # train.py's checkpoint, a model file or trained memories; "": out/ckpt.pt, else the shipped
base_path = ""            # trained memories: their base model's path, if not where they were trained
length = 1024             # the passkey sequence's tokens
depth = 0.3               # where its passkey sits
seed = 1234
filler = "auto"           # auto (as trained) | grass | a text file (its held-out part)
png = "out/inspect"       # figures at png_gates.png, png_attention.png, png_fifo.png; "" = none
device = "auto"
threads = 0
# -----------------------------------------------------------------------------

GROUPS = ("G", "T", "local")  # key groups of an extended chunk [G; T; chunk rows] (S2); a sink row counts as local


@dataclass(frozen=True)
class Inspection:
    """What one sequence did to the memories. Chunk t's gate is the one that wrote chunk t into the
    global memory; its attention and FIFO are what chunk t saw (the memories after chunks 0..t-1)."""
    logits: Tensor                  # (B, N, V): as model(idx)
    gates: Tensor                   # (n_layer, n_chunks, n_global): per slot, batch mean; nan = no gate used
    share: Tensor                   # (n_layer, n_chunks, 3): attention of real tokens to G, T, local rows
    fifo: tuple[tuple[tuple[int, ...], ...], ...]  # per layer, per chunk: source chunk of each FIFO slot it saw
    chunk_size: int


def attention_weights(attn, x: Tensor, rope, past=None, n_prefix: int = 0, window: int = 0) -> Tensor:
    """The softmax weights (B, nh, T, S) that `attn` (model.Attention) applies to these inputs (its forward's);
    window > 0: the sliding-window baseline's (ModelConfig.window)."""
    q, k, _, _ = attn.project(x, rope, past, n_prefix)
    T, S = q.size(2), k.size(2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    seen = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # causal, bottom-right aligned
    if window:
        seen &= ~seen.tril(S - T - window)  # the sliding-window baseline: the last `window` positions
    return scores.masked_fill(~seen, float("-inf")).softmax(-1)


def fifo_sources(before: tuple[int, ...], old: Tensor, new: Tensor, chunk: int) -> tuple[int, ...]:
    """Source chunks of the slots of the queue `new` (B, n, C), read off the queue itself: its oldest
    rows are the newest rows of `old` that survived (matched exactly), the rest came from `chunk`."""
    kept = next(k for k in range(min(old.size(1), new.size(1)), -1, -1)
                if torch.equal(new[:, :k], old[:, old.size(1) - k:]))
    return before[len(before) - kept:] + (chunk,) * (new.size(1) - kept)


@torch.no_grad()
def record(model: Transformer, idx: Tensor) -> Inspection:
    """Run idx (B, N) chunk by chunk from empty memories, as model.forward does, and record the memories."""
    cfg = model.config
    if not cfg.comet:
        raise ValueError("inspection looks at CoMeT's memories: this model is a plain decoder (chunk_size=0)")
    weights, gates = {}, {}
    hooks = [block.attention.register_forward_hook(
        lambda m, args, out, l=l: weights.__setitem__(l, attention_weights(m, *args)))  # no window: CoMeT
        for l, block in enumerate(model.layers)]
    hooks += [mem.global_mem.register_forward_hook(lambda m, args, out, l=l: gates.__setitem__(l, out[2]))
              for l, mem in enumerate(model.memories) if mem.global_mem is not None]
    queue = {}  # layer -> its FIFO update in this chunk: (old queue, new queue)
    hooks += [mem.temp_mem.register_forward_hook(lambda m, args, out, l=l: queue.__setitem__(l, (args[1], out)))
              for l, mem in enumerate(model.memories) if mem.temp_mem is not None]
    n_chunks = math.ceil(idx.size(1) / cfg.chunk_size)
    gate_t = torch.full((cfg.n_layer, n_chunks, cfg.n_global), float("nan"))
    share = torch.zeros(cfg.n_layer, n_chunks, len(GROUPS))
    before, hs, fifo = model.empty_memory(idx.size(0)), [], [[()] for _ in range(cfg.n_layer)]
    try:
        for t, (h, memory) in enumerate(model.chunks(idx)):  # the hooks fired while chunk t ran
            for l, (old, new) in queue.items():  # S4: chunk t's compression slots joined, the oldest may have left
                fifo[l].append(fifo_sources(fifo[l][-1], old, new, t))
            hs.append(h)
            lay = model.layout(h.size(1), h.size(1) == cfg.chunk_size)
            rows, s = lay.tokens - lay.n_sink, lay.n_sink  # the sink row runs its own attention call first (S2)
            for l, m in enumerate(before):  # chunk t saw the memories after chunk t-1
                n_g, n_t = m.global_memory.size(1), m.temp_memory.size(1)
                w = weights[l][:, :, rows].sum(2) / len(rows)  # (B, nh, S): mean over the real tokens' rows
                g, t_ = w[..., s:s + n_g].sum(-1), w[..., s + n_g:s + n_g + n_t].sum(-1)  # keys [sink; G; T; chunk]
                share[l, t] = torch.stack([g, t_, w.sum(-1) - g - t_], -1).mean((0, 1))  # the sink counts as local
                if gates.get(l) is not None:
                    gate_t[l, t] = gates[l].mean(0)[:, 0]
            before = memory
            weights.clear()
            gates.clear()
            queue.clear()
    finally:
        for hook in hooks:
            hook.remove()
    logits = model.output(model.norm(torch.cat(hs, 1)))
    fifo = tuple(tuple((f + [()] * n_chunks)[:n_chunks]) for f in fifo)  # no FIFO: every chunk saw an empty one
    return Inspection(logits, gate_t, share, fifo, cfg.chunk_size)


def ascii_view(ins: Inspection, mark: int | None = None) -> str:
    """The gates, attention shares and FIFO as text; `mark`: a chunk to flag (e.g. the passkey's), '*'."""
    L, n = ins.share.shape[:2]
    head = "            chunk " + "".join(f"{t:>4}{'*' if t == mark else ' '}" for t in range(n))
    out = ["global-memory gate, mean over slots (1: keep the old memory, 0: write this chunk; - none)", head]
    for l in range(L):
        g = ins.gates[l].nanmean(-1) if ins.gates.size(-1) else torch.full((n,), float("nan"))
        out.append(f"  layer {l:<2}        " + "".join("   - " if v != v else f"{v:5.2f}" for v in g.tolist()))
    out += ["", "attention of each chunk's tokens to the global memory G, the FIFO T and their own chunk (with a sink "
            "row, if any) (%)", head]
    for l in range(L):
        for i, name in enumerate(GROUPS):
            out.append(f"  layer {l:<2} {name:<6} " + "".join(f"{100 * v:5.0f}" for v in ins.share[l, :, i].tolist()))
    same = all(f == ins.fifo[0] for f in ins.fifo)
    for l, fifo in enumerate(ins.fifo[:1] if same else ins.fifo):
        out += ["", f"FIFO (temporary memory) of {'every layer' if same else f'layer {l}'} as each chunk sees it: "
                "slots, and how many came from each earlier chunk"]
        for t, src in enumerate(fifo):
            counts = ", ".join(f"{s}{'*' if s == mark else ''}: {src.count(s)}" for s in sorted(set(src)))
            out.append(f"  chunk {t:>3}{'*' if t == mark else ' '} {len(src):>3} slots  {counts or '(empty)'}")
    return "\n".join(out)


FIGURES = ("gates", "attention", "fifo")


def save_figures(ins: Inspection, prefix: str, mark: int | None = None) -> list[str]:
    """PNGs prefix_gates.png, prefix_attention.png, prefix_fifo.png; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    L, n = ins.share.shape[:2]
    paths = []

    def finish(fig, axes, name):
        for ax in axes:
            if mark is not None:
                ax.axvline(mark, color="red", ls="--", lw=1)
        axes[-1].set_xlabel("chunk" + ("" if mark is None else f" (red: the passkey's chunk, {mark})"))
        write_atomically(f"{prefix}_{name}.png", lambda f: fig.savefig(f, format="png", dpi=110), mode=0o644)
        plt.close(fig)
        paths.append(f"{prefix}_{name}.png")

    if not ins.gates.isnan().all():
        fig, axes = plt.subplots(L, 1, figsize=(1.5 + 0.35 * n, 1.2 + 1.3 * L), sharex=True, squeeze=False,
                                 layout="constrained")
        for l, ax in enumerate(axes[:, 0]):
            im = ax.imshow(ins.gates[l].T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                           interpolation="nearest")
            ax.set_ylabel(f"layer {l}\nslot")
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="gate (1 = keep old memory)")
        axes[0, 0].set_title("global-memory gate per slot")
        finish(fig, list(axes[:, 0]), "gates")
    fig, axes = plt.subplots(L, 1, figsize=(1.5 + 0.35 * n, 1.2 + 1.3 * L), sharex=True, squeeze=False,
                                 layout="constrained")
    for l, ax in enumerate(axes[:, 0]):
        bottom = torch.zeros(n)
        for i, name in enumerate(GROUPS):
            ax.bar(range(n), ins.share[l, :, i].numpy(), bottom=bottom.numpy(), label=name, width=0.9)
            bottom += ins.share[l, :, i]
        ax.set_ylabel(f"layer {l}")
        ax.set_ylim(0, 1)
    axes[0, 0].set_title("share of attention of a chunk's tokens")
    axes[0, 0].legend(loc="upper right", fontsize=7, ncol=3)
    finish(fig, list(axes[:, 0]), "attention")
    budget = max(map(len, ins.fifo[0]), default=0)
    if budget:  # layer 0's FIFO (every layer's fills and evicts alike)
        grid = torch.full((budget, n), float("nan"))
        for t, src in enumerate(ins.fifo[0]):
            grid[:len(src), t] = torch.tensor(src, dtype=torch.float)
        fig, ax = plt.subplots(figsize=(1.5 + 0.35 * n, 3.5), layout="constrained")
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=n - 1)
        if mark is not None:
            hit = (grid == mark).nonzero()
            ax.scatter(hit[:, 1], hit[:, 0], marker="x", color="red", s=12)
        fig.colorbar(im, ax=ax, label="source chunk of the slot")
        ax.set_ylabel("FIFO slot (oldest at top)")
        ax.set_title("layer 0's temporary memory as each chunk sees it"
                     + ("" if mark is None else " (x: the passkey's)"))
        finish(fig, [ax], "fifo")
    return paths


def main() -> None:
    """One passkey sequence, chunked from its first token, through the model: the memories shown as text (the
    chunk that first reads the key marked *) and as figures; then the argmax answer, teacher-forced."""
    cfg = configure_or_exit(settings_of(globals()))
    try:
        for name in FIGURES if cfg["png"] else ():
            check_output(f"{cfg['png']}_{name}.png", "--png", PNG)
        model, enc, train, _ = open_model({**cfg, "init_from": "", "dtype": "float32"})
        held = filler_tokens(enc, train.get("filler", "grass") if cfg["filler"] == "auto" else cfg["filler"], "heldout")
        s = make_passkey(enc, cfg["length"], cfg["depth"], random.Random(cfg["seed"]), train.get("digits", 5), held)
        ins = record(model, torch.from_numpy(s.tokens())[None].to(next(model.parameters()).device))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    C, (a, b) = model.config.chunk_size, s.evidence
    n = len(s.answer)  # the chunk that holds the end of the key's first mention, else the sentence's start
    hit = [i for i in range(len(s.sentence) - n + 1) if (s.sentence[i:i + n] == s.answer).all()]
    mark = (a + hit[0] + n - 1) // C if hit else a // C
    print(f"one passkey sequence of {cfg['length']:,} tokens in chunks of {C}: the key's sentence at tokens {a}-{b - 1}, "
          f"the question from token {s.n_context}; * marks chunk {mark}, where the key is first read\n")
    print(ascii_view(ins, mark))
    guess = ins.logits[0, -n - 1:-1].argmax(-1).tolist()  # teacher-forced, as training scores it
    print(f"\nanswer (argmax at each answer position): {enc.decode(guess)!r}, expected {enc.decode(s.answer.tolist())!r}")
    if cfg["png"]:
        print("\n".join(f"wrote {p}" for p in save_figures(ins, cfg["png"], mark)) or "no PNG: matplotlib is not installed")


if __name__ == "__main__":
    main()
