"""Streaming inference (SPEC S6): read a context of any length chunk by chunk at constant memory, then generate.

    state = new_stream(model, batch=1)
    logits, state = stream(model, context, state)   # any number of tokens, in as many calls as you like
    tokens, state = generate(model, prompt, 50, temperature=0.8, top_k=40, state=state)

Every completed chunk is closed: run whole, with its compression and readout rows, through
`Transformer.forward_chunk`, which updates every layer's memories. The tokens after the last closed chunk
form the open chunk; each call extends it through its KV cache, running only its new rows. A plain decoder
(chunk_size=0) is one open chunk of up to block_size tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from memory import MemoryState
from model import Transformer


@dataclass(frozen=True)
class StreamState:
    """Everything streaming inference keeps: constant size, whatever the context length."""
    memory: tuple[MemoryState, ...]         # per layer, after the last closed chunk
    tokens: Tensor                          # (B, n_open) tokens of the open chunk, n_open < chunk_size
    cache: tuple[tuple[Tensor, Tensor], ...]  # per layer (k, v) of [G; T; open chunk]; () while it is empty


def new_stream(model: Transformer, batch: int = 1) -> StreamState:
    """The state before the first token: empty memories, an empty open chunk."""
    device = model.tok_embeddings.weight.device
    return StreamState(model.empty_memory(batch), torch.zeros(batch, 0, dtype=torch.long, device=device), ())


@torch.no_grad()
def stream(model: Transformer, idx: Tensor, state: StreamState) -> tuple[Tensor, StreamState]:
    """S6: feed any number of tokens (B, n). Each completed chunk is closed (run whole with its readout
    and compression tokens, memories updated); the rest extends the open chunk through its KV cache.
    Returns the next-token logits after the last token (B, V) and the new state."""
    cfg = model.config
    limit = cfg.chunk_size if cfg.comet else cfg.block_size  # the plain decoder is one open chunk
    h = None
    while idx.size(1):
        take = min(idx.size(1), limit - state.tokens.size(1))
        if take == 0:
            raise ValueError(f"plain decoder: context longer than block_size={cfg.block_size}")
        tokens, idx = torch.cat([state.tokens, idx[:, :take]], 1), idx[:, take:]
        if cfg.comet and tokens.size(1) == cfg.chunk_size:  # close: its open part is recomputed once
            h, memory = model.forward_chunk(tokens, state.memory, closed=True)
            state = StreamState(memory, tokens[:, :0], ())
        else:
            h, state = _extend_open_chunk(model, tokens, state)
    if h is None:
        raise ValueError("stream() needs at least one token")
    return model.output(model.norm(h[:, -1])), state


def _extend_open_chunk(model: Transformer, tokens: Tensor, state: StreamState) -> tuple[Tensor, StreamState]:
    """Run only the new rows of the open chunk (now `tokens`), attending to the cached rows. An open layout
    is a prefix of every longer one (chunk_layout), so the new rows are the longer layout's last rows."""
    n_prefix = state.memory[0].prefix_len
    old = model.layout(state.tokens.size(1), False, n_prefix)
    new = model.layout(tokens.size(1), False, n_prefix)
    h = model.embed_chunk(tokens, new)[:, old.length:]  # new rows: maybe a compression token, then tokens
    cache = []
    for l, mem in enumerate(state.memory):
        h, kv, _ = model.layer_step(l, h, mem, new, state.cache[l] if state.cache else None)
        cache.append(kv)
    return h, StreamState(state.memory, tokens, tuple(cache))


@torch.no_grad()
def generate(model: Transformer, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, state: StreamState | None = None) -> tuple[Tensor, StreamState]:
    """Stream the prompt idx (B, n) of any length, then sample max_new_tokens (temperature 0: greedy).
    Returns the new tokens (B, max_new_tokens) and the stream state after them."""
    logits, state = stream(model, idx, state or new_stream(model, idx.size(0)))
    out = []
    for _ in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            nxt = torch.multinomial(F.softmax(logits, -1), 1)
        out.append(nxt)
        logits, state = stream(model, nxt, state)
    return torch.cat(out, 1) if out else idx[:, :0], state
