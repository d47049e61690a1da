"""nanocomet model: a small Llama-style decoder that also runs as CoMeT (SPEC S1-S6).

Reading order: config -> RoPE -> attention -> MLP -> block -> chunk layout (S2) -> model -> streaming (S6).
With chunk_size=0 the model is an ordinary causal decoder. With chunk_size>0 the sequence is cut into
chunks and every layer carries its own global and temporary memory (memory.py) from chunk to chunk.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from memory import LayerMemory, MemoryState


@dataclass
class ModelConfig:
    vocab_size: int = 256          # real tokens (compression/readout tokens are extra embeddings, S2)
    n_layer: int = 4
    n_head: int = 4                # query heads
    n_kv_head: int | None = None   # key/value heads (grouped-query attention); None -> n_head
    n_embd: int = 128              # model width d
    ffn_hidden: int | None = None  # SwiGLU hidden width; None -> 8/3 * n_embd rounded up to a multiple of 32
    rope_theta: float = 10000.0    # RoPE base
    rope_factor: float = 1.0       # Llama 3.1 RoPE scaling ("llama3"): long wavelengths / factor; 1 = off
    rope_low_freq: float = 1.0     #   wavelengths above original_context / low_freq are scaled fully
    rope_high_freq: float = 4.0    #   wavelengths below original_context / high_freq are kept
    rope_original_context: int = 8192  # the context the model was pretrained with before scaling
    norm_eps: float = 1e-5         # RMSNorm epsilon
    tie_embeddings: bool = True    # output projection shares the token embedding matrix
    block_size: int = 1024         # plain decoder only: longest sequence (length of its RoPE table)
    window: int = 0                # plain decoder only: a token attends to the last `window` positions; 0 = all
    # CoMeT (S2-S5). chunk_size=0: plain decoder. n_global=0 / temp_budget=0: that memory is off.
    chunk_size: int = 64           # real tokens per chunk
    n_global: int = 16             # global-memory slots = readout tokens per chunk (S3)
    stride: int = 8                # real tokens per compression token (S2)
    temp_budget: int = 32          # temporary-memory FIFO capacity in slots (S4)
    adapter_rank: int = 8          # rank of the memories' residual low-rank adapters (S3)
    global_gate: bool = True       # False: the global memory is overwritten by each chunk (RMT-like ablation)
    init_std: float | None = None  # weight init std; None -> sqrt(2 / (5 * n_embd)) (small init, width-aware)

    def __post_init__(self):
        _check_types(self)
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "rope_theta",
                     "rope_factor", "rope_low_freq", "rope_high_freq", "rope_original_context", "norm_eps",
                     "block_size", "stride", "adapter_rank", "init_std"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig: {name}={getattr(self, name)} must be positive")
        for name in ("chunk_size", "n_global", "temp_budget", "window"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelConfig: {name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None:
            self.ffn_hidden = 32 * math.ceil(8 * self.n_embd / 3 / 32)
        if self.init_std is None:
            self.init_std = math.sqrt(2 / (5 * self.n_embd))
        if self.n_embd % self.n_head:
            raise ValueError(f"ModelConfig: n_head={self.n_head} must divide n_embd={self.n_embd}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"ModelConfig: n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head size n_embd/n_head={self.head_dim} must be even for RoPE")
        if self.rope_factor != 1 and self.rope_high_freq <= self.rope_low_freq:
            raise ValueError(f"ModelConfig: rope_high_freq={self.rope_high_freq} must exceed "
                             f"rope_low_freq={self.rope_low_freq}")
        if self.chunk_size and self.window:
            raise ValueError(f"ModelConfig: window={self.window} is a plain-decoder baseline: it needs chunk_size=0")
        if self.chunk_size and self.stride > self.chunk_size:
            raise ValueError(f"ModelConfig: stride={self.stride} must be <= chunk_size={self.chunk_size} "
                             "(one compression token per `stride` tokens of a chunk)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def comet(self) -> bool:
        return self.chunk_size > 0

    @property
    def n_compression(self) -> int:
        """Compression tokens in one closed chunk (0 without a temporary memory)."""
        return math.ceil(self.chunk_size / self.stride) if self.comet and self.temp_budget else 0

    def memory_slots(self, n_closed: int) -> tuple[int, int]:
        """(global, temporary) slots of every layer's memory after `n_closed` closed chunks (S3, S4):
        what a pipeline rank (S7) receives before its first chunk, known without looking at data."""
        return (self.n_global if n_closed else 0), min(self.temp_budget, n_closed * self.n_compression)

    @property
    def max_positions(self) -> int:
        """Longest sequence one attention call sees: one extended chunk [G, T, X, R] (S2), or block_size."""
        if not self.comet:
            return self.block_size
        return self.n_global + self.temp_budget + self.chunk_size + self.n_compression + self.n_global


def _check_types(cfg) -> None:
    """One clear error for a wrong type (`n_layer='4'`, `chunk_size=64.0`); ints are fine for floats."""
    for f in fields(cfg):
        v, kind = getattr(cfg, f.name), str(f.type)
        base = kind.removesuffix(" | None")
        ok = (v is None and base != kind) or (
            isinstance(v, bool) if base == "bool" else
            isinstance(v, (int, float)) and not isinstance(v, bool) if base == "float" else
            isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            raise TypeError(f"{type(cfg).__name__}: {f.name} must be {kind}, got {v!r} ({type(v).__name__})")


# --- RoPE -------------------------------------------------------------------------------------------

def rope_table(cfg: ModelConfig, length: int, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin (length, head_dim) for positions 0..length-1, in the rotate-half layout (HF's):
    dimension i pairs with i + head_dim/2."""
    hs = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float32, device=device) / hs)
    if cfg.rope_factor != 1:  # Llama 3.1: slow down long wavelengths, blend the band in between
        wavelen = 2 * math.pi / inv_freq
        ratio = cfg.rope_original_context / wavelen  # how many periods fit in the original context
        blend = ((ratio - cfg.rope_low_freq) / (cfg.rope_high_freq - cfg.rope_low_freq)).clamp(0, 1)
        inv_freq = (1 - blend) * inv_freq / cfg.rope_factor + blend * inv_freq
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # (length, hs/2)
    angles = torch.cat([angles, angles], -1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, nh, T, hs) by the angles of its T positions, cos/sin (T, hs)."""
    x1, x2 = x.chunk(2, -1)
    rotated = torch.cat([-x2, x1], -1)
    return (x * cos + rotated * sin).to(x.dtype)


# --- Transformer block ------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.window = cfg.window
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def _heads(self, x: Tensor, n: int) -> Tensor:
        return x.view(x.size(0), x.size(1), n, self.head_dim).transpose(1, 2)  # (B, n, T, hs)

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor], past: tuple[Tensor, Tensor] | None = None,
                n_prefix: int = 0) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        """x (B, n_prefix + T, C): normed rows. The first n_prefix are memory rows [G; T] (S2), of which
        only keys and values are needed; the T rows after them (or after the `past` keys/values
        (B, n_kv, S0, hs) of the same sequence) also query. Positions count keys: S0, S0+1, ...
        Returns q (B, nh, T, hs), k and v (B, nh, S, hs) with GQA heads repeated, and the cache (k, v)."""
        S0, L = 0 if past is None else past[0].size(2), x.size(1)
        cos, sin = rope[0][S0:S0 + L], rope[1][S0:S0 + L]
        q = apply_rope(self._heads(self.wq(x[:, n_prefix:]), self.n_head), cos[n_prefix:], sin[n_prefix:])
        k = apply_rope(self._heads(self.wk(x), self.n_kv_head), cos, sin)  # (B, n_kv, L, hs)
        v = self._heads(self.wv(x), self.n_kv_head)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)  # (B, n_kv, S0+L, hs)
        kv = (k, v)
        if self.n_kv_head != self.n_head:  # GQA: each key/value head serves n_head/n_kv_head query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, 1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, 1)
        return q, k, v, kv

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], past: tuple[Tensor, Tensor] | None = None,
                n_prefix: int = 0):
        """Rows as in `project` -> (output of the T query rows (B, T, C), cache (k, v))."""
        q, k, v, kv = self.project(x, rope, past, n_prefix)
        B, T, S = q.size(0), q.size(2), k.size(2)
        if self.window:  # the sliding-window baseline
            y = sliding_window_attention(q, k, v, self.window)
        elif S == T or T == 1:  # plain causal square, or one new row that sees everything
            y = F.scaled_dot_product_attention(q, k, v, is_causal=S == T and T > 1)
        else:  # causal, aligned to the bottom right (is_causal aligns top left)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=_lower_right_causal(T, S, x.device))
        return self.wo(y.transpose(1, 2).reshape(B, T, -1)), kv


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, block: int = 256) -> Tensor:
    """Causal attention where the query at position p sees only keys p-window+1..p. q (B, nh, T, hs) are
    the last T of the S keys. Queries go in blocks, each with just the keys its window reaches, so work
    and memory grow with T * (block + window), not T * S."""
    T, S = q.size(2), k.size(2)
    out = []
    for a in range(0, T, block):
        b = min(a + block, T)
        lo, hi = max(0, S - T + a - window + 1), S - T + b  # keys the block's first and last queries reach
        qpos = torch.arange(S - T + a, hi, device=q.device)[:, None]
        kpos = torch.arange(lo, hi, device=q.device)[None]
        mask = (kpos <= qpos) & (kpos > qpos - window)  # (b - a, hi - lo)
        out.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask))
    return torch.cat(out, 2)


def _lower_right_causal(T: int, S: int, device: torch.device):
    """Mask for T queries after S-T earlier keys: query i sees keys 0..S-T+i. On CUDA a CausalBias, which
    flash/efficient kernels apply without a (T, S) tensor; on CPU a bool mask (faster there), kept when
    small, as CoMeT's chunks use only a few shapes."""
    if device.type == "cuda":
        return causal_lower_right(T, S)
    if T * S <= 1 << 20:
        return _bool_mask(T, S, device)
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


@functools.lru_cache(maxsize=32)
def _bool_mask(T: int, S: int, device: torch.device) -> Tensor:
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)
        self.w3 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], past: tuple[Tensor, Tensor] | None = None,
                prefix: Tensor | None = None):
        """x (B, T, C) -> (x, (k, v) of past + prefix + these rows). prefix (B, n, C): memory rows [G; T]
        in front of x (S2). Their own outputs would be overwritten at the next layer, so they only give
        keys and values (one projection together with x's rows)."""
        rows = x if prefix is None else torch.cat([prefix, x], 1)
        a, kv = self.attention(self.attention_norm(rows), rope, past, rows.size(1) - x.size(1))
        x = x + a
        return x + self.feed_forward(self.ffn_norm(x)), kv


# --- S2: the extended chunk -------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkLayout:
    """Rows of one chunk after its memory prefix [G; T]: real tokens X with a compression token after
    every `stride` of them, then R readout tokens. Index tensors are rows of the chunk (prefix excluded)."""
    order: Tensor        # (L,) row -> index into cat(token embeddings, compression tokens, readout tokens)
    tokens: Tensor       # (n,) rows of the real tokens
    compression: Tensor  # (n_c,) rows of the compression tokens
    readout: Tensor      # (n_r,) rows of the readout tokens
    closed: bool         # a closed chunk updates the memories; an open one (still generating) does not

    @property
    def length(self) -> int:
        return self.order.numel()


@functools.lru_cache(maxsize=256)
def chunk_layout(n_tokens: int, stride: int, n_readout: int, closed: bool, device: torch.device) -> ChunkLayout:
    """S2, the one owner of the chunk layout. stride=0: no compression tokens (temporary memory off).

    A closed chunk of n tokens gets ceil(n/stride) compression tokens (the last one after a short final
    group) and n_readout readout tokens. An open chunk gets neither readout tokens nor a trailing
    compression token, so an open layout is a prefix of every longer open layout (the KV cache relies on it).
    """
    j = torch.arange(n_tokens)
    if stride:
        n_comp = math.ceil(n_tokens / stride) if closed else max(n_tokens - 1, 0) // stride
        k = torch.arange(n_comp)
        tokens = j + j // stride                          # token j follows j // stride compression tokens
        comp = (k + 1).mul(stride).clamp(max=n_tokens) + k  # after token min((k+1)*stride, n) - 1
    else:
        n_comp, tokens, comp = 0, j, j[:0]
    readout = n_tokens + n_comp + torch.arange(n_readout if closed else 0)
    order = torch.cat([tokens, comp, readout]).argsort()
    return ChunkLayout(order.to(device), tokens.to(device), comp.to(device), readout.to(device), closed)


# --- the model --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamState:
    """Everything streaming inference (S6) keeps: constant size, whatever the context length."""
    memory: tuple[MemoryState, ...]         # per layer, after the last closed chunk
    tokens: Tensor                          # (B, n_open) tokens of the open chunk, n_open < chunk_size
    cache: tuple[tuple[Tensor, Tensor], ...]  # per layer (k, v) of [G; T; open chunk]; () while it is empty


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, verbose: bool = True):
        super().__init__()
        self.config = cfg = config
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if cfg.comet:  # S5: the parameters CoMeT adds
            self.memories = nn.ModuleList(
                LayerMemory(cfg.n_embd, cfg.n_global, cfg.temp_budget, cfg.adapter_rank, cfg.norm_eps, cfg.global_gate)
                for _ in range(cfg.n_layer))
            if cfg.temp_budget:
                self.compression_emb = nn.Parameter(torch.empty(1, cfg.n_embd))
            if cfg.n_global:
                self.readout_emb = nn.Parameter(torch.empty(cfg.n_global, cfg.n_embd))
        self.build_rope()
        self.init_weights()
        if verbose:
            base, mem = self.param_counts()
            print(f"model: {base / 1e6:.2f}M base parameters + {mem / 1e6:.3f}M memory parameters "
                  f"({100 * mem / base:.1f}%)")

    def build_rope(self, device=None) -> None:
        """(Re)compute the RoPE table, e.g. after building the model on the meta device."""
        # S2: positions restart at 0 in every chunk, so the table never exceeds one extended chunk
        cos, sin = rope_table(self.config, self.config.max_positions, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, names: set[str] | None = None) -> None:
        """Normal(init_std) everywhere, residual outputs scaled by 1/sqrt(2*n_layer) (GPT-2), norms at 1,
        and the adapters' up-projections at 0 so the memories start as the identity (S5). `names`: only
        these parameters (e.g. the memories added to a pretrained model).
        NOTE: GPT-2's fixed 0.02 is too small for a tiny model: on the passkey task it stayed at chance
        for 1,400 steps where sqrt(2/(5d)) (0.056 at d=128) started copying within 150."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if names is not None and name not in names:
                continue
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("adapter.up.weight"):
                nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=std)

    @staticmethod
    def is_memory_param(name: str) -> bool:
        """Parameters CoMeT adds to the decoder (S5): the memory modules, compression and readout tokens."""
        return name.startswith(("memories.", "compression_emb", "readout_emb"))

    def param_counts(self) -> tuple[int, int]:
        """(base decoder parameters, memory parameters) — the second matches `memory_param_count` (S5)."""
        mem = sum(p.numel() for n, p in self.named_parameters() if self.is_memory_param(n))
        return sum(p.numel() for p in self.parameters()) - mem, mem

    @property
    def rope(self) -> tuple[Tensor, Tensor]:
        return self.rope_cos, self.rope_sin

    def empty_memory(self, batch: int) -> tuple[MemoryState, ...]:
        w = self.tok_embeddings.weight
        return tuple(MemoryState.empty(batch, self.config.n_embd, w.device, w.dtype) for _ in self.layers)

    def layout(self, n_tokens: int, closed: bool) -> ChunkLayout:
        cfg = self.config
        stride = cfg.stride if cfg.comet and cfg.temp_budget else 0
        return chunk_layout(n_tokens, stride, cfg.n_global if cfg.comet else 0, closed, self.rope_cos.device)

    def run_blocks(self, h: Tensor, past: list | None = None) -> tuple[Tensor, list]:
        """Plain decoder: rows h (B, T, C) through every block, after the rows whose keys/values `past`
        holds (one (k, v) per layer), if given. Returns the last block's output (before the final norm)
        and each layer's keys/values so far."""
        cache = []
        for l, block in enumerate(self.layers):
            h, kv = block(h, self.rope, None if past is None else past[l])
            cache.append(kv)
        return h, cache

    def embed_chunk(self, idx: Tensor, layout: ChunkLayout) -> Tensor:
        """Token ids (B, n) -> the chunk's input rows (B, L, C) with compression and readout tokens in place."""
        B = idx.size(0)
        parts = [self.tok_embeddings(idx)]  # (B, n, C)
        if layout.compression.numel():
            parts.append(self.compression_emb.expand(B, layout.compression.numel(), -1))
        if layout.readout.numel():
            parts.append(self.readout_emb.expand(B, -1, -1))
        return torch.cat(parts, 1)[:, layout.order]

    def layer_step(self, l: int, h: Tensor, mem: MemoryState, layout: ChunkLayout,
                   past: tuple[Tensor, Tensor] | None = None):
        """S1, the unit of work: layer l over one chunk's rows h (B, L, C), given layer l's memory.

        `past` holds the keys/values of earlier rows of an open chunk (generation); without it the rows
        start right after the memory prefix. Returns (layer output, keys/values, memory for the next
        chunk); the memory only changes when the layout is closed."""
        prefix = mem.prefix() if past is None and mem.prefix_len else None  # S2: inject this layer's G and T
        h, kv = self.layers[l](h, self.rope, past, prefix)
        if layout.closed:  # S3, S4: readout rows feed the global memory, compression rows the FIFO
            mem = self.memories[l](mem, h[:, layout.readout], h[:, layout.compression])
        return h, kv, mem

    def forward_chunk(self, idx: Tensor, memory: tuple[MemoryState, ...], closed: bool = True):
        """One chunk (B, n) through every layer (chunk-major). Returns the hidden states of its real
        tokens (B, n, C) and the per-layer memories after it."""
        layout = self.layout(idx.size(1), closed)
        h = self.embed_chunk(idx, layout)
        new_memory = []
        for l, mem in enumerate(memory):
            h, _, mem = self.layer_step(l, h, mem, layout)
            new_memory.append(mem)
        return h[:, layout.tokens], tuple(new_memory)

    def forward(self, idx: Tensor, targets: Tensor | None = None, bptt_chunks: int = 0):
        """idx (B, N) token ids -> (logits (B, N, V), loss or None), like nanoGPT's GPT.forward.

        CoMeT mode: the whole sequence goes chunk by chunk from empty memories, with gradients through
        the memories across chunks (BPTT), cut every `bptt_chunks` chunks if > 0. A final partial chunk
        is left open, exactly as streaming inference would see it. targets: -1 = no loss at that token.
        """
        cfg = self.config
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be (batch, tokens) with at least one token, got shape {tuple(idx.shape)}")
        N = idx.size(1)
        if not cfg.comet:
            if N > cfg.block_size:
                raise ValueError(f"sequence of {N} tokens is longer than block_size={cfg.block_size}")
            h, _ = self.run_blocks(self.tok_embeddings(idx))
        else:
            memory, hs = self.empty_memory(idx.size(0)), []
            for i, start in enumerate(range(0, N, cfg.chunk_size)):
                if bptt_chunks and i and i % bptt_chunks == 0:
                    memory = tuple(m.detach() for m in memory)  # truncated BPTT
                chunk = idx[:, start:start + cfg.chunk_size]
                h, memory = self.forward_chunk(chunk, memory, closed=chunk.size(1) == cfg.chunk_size)
                hs.append(h)
            h = torch.cat(hs, 1)  # (B, N, C): real tokens only, so the loss never sees memory rows
        logits = self.output(self.norm(h))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    # --- S6: streaming inference --------------------------------------------------------------------

    def new_stream(self, batch: int = 1) -> StreamState:
        device = self.tok_embeddings.weight.device
        return StreamState(self.empty_memory(batch), torch.zeros(batch, 0, dtype=torch.long, device=device), ())

    @torch.no_grad()
    def stream(self, idx: Tensor, state: StreamState) -> tuple[Tensor, StreamState]:
        """S6: feed any number of tokens (B, n). Each completed chunk is closed (run whole with its
        readout and compression tokens, memories updated); the rest extends the open chunk through
        its KV cache. Returns the next-token logits after the last token (B, V) and the new state."""
        cfg = self.config
        limit = cfg.chunk_size if cfg.comet else cfg.block_size  # the plain decoder is one open chunk
        h = None
        while idx.size(1):
            take = min(idx.size(1), limit - state.tokens.size(1))
            if take == 0:
                raise ValueError(f"plain decoder: context longer than block_size={cfg.block_size}")
            tokens, idx = torch.cat([state.tokens, idx[:, :take]], 1), idx[:, take:]
            if cfg.comet and tokens.size(1) == cfg.chunk_size:  # close: its open part is recomputed once
                h, memory = self.forward_chunk(tokens, state.memory, closed=True)
                state = StreamState(memory, tokens[:, :0], ())
            else:
                h, state = self._extend_open_chunk(tokens, state)
        if h is None:
            raise ValueError("stream() needs at least one token")
        return self.output(self.norm(h[:, -1])), state

    def _extend_open_chunk(self, tokens: Tensor, state: StreamState) -> tuple[Tensor, StreamState]:
        """Run only the new rows of the open chunk (now `tokens`), attending to the cached rows."""
        old = self.layout(state.tokens.size(1), closed=False)
        new = self.layout(tokens.size(1), closed=False)
        h = self.embed_chunk(tokens, new)[:, old.length:]  # new rows: maybe a compression token, then tokens
        cache = []
        for l, mem in enumerate(state.memory):
            h, kv, _ = self.layer_step(l, h, mem, new, state.cache[l] if state.cache else None)
            cache.append(kv)
        return h, StreamState(state.memory, tokens, tuple(cache))

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 state: StreamState | None = None) -> tuple[Tensor, StreamState]:
        """Stream the prompt idx (B, n) of any length, then sample max_new_tokens (temperature 0: greedy).
        Returns the new tokens (B, max_new_tokens) and the state after them."""
        logits, state = self.stream(idx, state or self.new_stream(idx.size(0)))
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
            logits, state = self.stream(nxt, state)
        return torch.cat(out, 1) if out else idx[:, :0], state
