"""nanocomet model: a small Llama-style decoder that also runs as CoMeT (docs/design.md, S1-S6).

Reading order: config -> RoPE -> attention -> MLP -> block -> chunk layout (S2) -> model. With chunk_size=0 the
model is an ordinary causal decoder (window > 0: the sliding-window baseline, baselines.py). With chunk_size > 0
the sequence is cut into chunks and every layer carries its own global and temporary memory (memory.py) from
chunk to chunk. Streaming inference over the same step (S6) is in stream.py.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.nn.attention.bias import causal_lower_right

from baselines import sliding_window_attention
from configurator import check_types
from memory import LayerMemory, MemoryState


# the settings that shape CoMeT's memories (S2-S5): what a pretrained model is given, what trained memories record
MEMORY_SETTINGS = ("chunk_size", "n_global", "stride", "temp_budget", "adapter_rank", "global_gate", "gate_bias",
                   "sink_token")


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
    gate_bias: float = 0.0         # the gate's logit bias at init; 0: none (g ~ 0.5 at first); 3: g ~ 0.95 (S3)
    sink_token: int = -1           # a token id: a sink row of it at position 0 in front of every chunk (S2); -1: none
    init_std: float | None = None  # weight init std; None -> sqrt(2 / (5 * n_embd)) (small init, width-aware)

    def __post_init__(self):
        check_types(self)
        off = ("chunk_size", "n_global", "temp_budget", "window")  # 0 turns these off
        for name, value in vars(self).items():
            if name == "gate_bias" and not math.isfinite(value):  # any finite logit
                raise ValueError(f"ModelConfig: gate_bias={value} must be a finite number")
            if name in ("gate_bias", "sink_token"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not (
                    math.isfinite(value) and (value >= 0 if name in off else value > 0)):
                raise ValueError(f"ModelConfig: {name}={value} must be " + ("an integer >= 0 (0 turns it off)"
                                                                               if name in off else "positive"))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None:
            self.ffn_hidden = 32 * math.ceil(8 * self.n_embd / 3 / 32)
        if self.init_std is None:
            self.init_std = math.sqrt(2 / (5 * self.n_embd))
        for bad, why in ((self.n_embd % self.n_head, f"n_head={self.n_head} must divide n_embd={self.n_embd}"),
                         (self.n_head % self.n_kv_head, f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}"),
                         (self.head_dim % 2, f"head size n_embd/n_head={self.head_dim} must be even for RoPE"),
                         (self.rope_factor != 1 and self.rope_high_freq <= self.rope_low_freq,
                          f"rope_high_freq={self.rope_high_freq} must exceed rope_low_freq={self.rope_low_freq}"),
                         (self.chunk_size and self.window,
                          f"window={self.window} is a plain-decoder baseline: it needs chunk_size=0"),
                         (self.chunk_size and self.stride > self.chunk_size,
                          f"stride={self.stride} must be <= chunk_size={self.chunk_size} (one compression token per "
                          "`stride` tokens of a chunk)"),
                         (not -1 <= self.sink_token < self.vocab_size,
                          f"sink_token={self.sink_token} must be a token id below vocab_size={self.vocab_size} or -1 "
                          "(no sink row)"),
                         (self.sink_token >= 0 and not self.chunk_size,
                          f"sink_token={self.sink_token} is a row in front of CoMeT's chunks: it needs chunk_size > 0")):
            if bad:
                raise ValueError(f"ModelConfig: {why}")

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

    def memory_slots(self, n_closed: int, first: int = 0) -> tuple[int, int]:
        """(global, temporary) slots of every layer's memory after `n_closed` closed chunks (S3, S4), known without
        data (S7). first: the first chunk's tokens if the chunk plan starts short (chunk_spans), else 0."""
        short = math.ceil(first / self.stride) - self.n_compression if n_closed and first and self.n_compression else 0
        return (self.n_global if n_closed else 0), min(self.temp_budget, n_closed * self.n_compression + short)

    @property
    def n_sink(self) -> int:
        """Sink rows in front of every chunk (S2): 1 with a sink_token, else 0."""
        return int(self.sink_token >= 0)

    @property
    def max_positions(self) -> int:  # what one attention call sees: an extended chunk [S; G; T; X; R] (S2), or block_size
        return self.n_sink + 2 * self.n_global + self.temp_budget + self.chunk_size + self.n_compression \
            if self.comet else self.block_size


# --- RoPE -------------------------------------------------------------------------------------------

def rope_table(cfg: ModelConfig, length: int, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin (length, hs) of positions 0..length-1, rotate-half layout (HF's): dimension i pairs with i + hs/2."""
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
    """Causal grouped-query attention. It is given the RoPE angles of exactly the rows it runs (their
    positions are the caller's business: the chunk layout's for CoMeT, token counts for a plain decoder)."""

    def __init__(self, cfg: ModelConfig, kernel: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None):
        super().__init__()
        self.kernel = kernel or causal_attention  # of q, k, v; the sliding-window baseline brings its own (baselines.py)
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def _heads(self, x: Tensor, n: int) -> Tensor:
        return x.view(x.size(0), x.size(1), n, self.head_dim).transpose(1, 2)  # (B, n, T, hs)

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor], past: tuple[Tensor, Tensor] | None = None,
                n_prefix: int = 0) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        """x (B, n_prefix + T, C): normed rows, rope (cos, sin) (n_prefix + T, hs) their angles. The first n_prefix
        rows give only keys and values; the T after them also query, after `past` keys/values (B, n_kv, S_past, hs).
        Returns q (B, nh, T, hs), k and v (B, nh, S_past + n_prefix + T, hs) with GQA heads repeated, cache (k, v)."""
        cos, sin = rope
        q = apply_rope(self._heads(self.wq(x[:, n_prefix:]), self.n_head), cos[n_prefix:], sin[n_prefix:])
        k = apply_rope(self._heads(self.wk(x), self.n_kv_head), cos, sin)  # (B, n_kv, L, hs)
        v = self._heads(self.wv(x), self.n_kv_head)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)  # (B, n_kv, S_past+L, hs)
        kv = (k, v)
        if self.n_kv_head != self.n_head:  # GQA: each key/value head serves n_head/n_kv_head query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, 1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, 1)
        return q, k, v, kv

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], past: tuple[Tensor, Tensor] | None = None,
                n_prefix: int = 0):  # rows as in `project` -> (output of the T query rows (B, T, C), cache (k, v))
        q, k, v, kv = self.project(x, rope, past, n_prefix)
        return self.wo(self.kernel(q, k, v).transpose(1, 2).reshape(q.size(0), q.size(2), -1)), kv


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of the T queries q (B, nh, T, hs), the last T of the S keys -> (B, nh, T, hs)."""
    T, S = q.size(2), k.size(2)
    if S == T or T == 1:  # plain causal square, or one new row that sees everything
        return F.scaled_dot_product_attention(q, k, v, is_causal=S == T and T > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_lower_right_causal(T, S, q.device))  # bottom right


def _lower_right_causal(T: int, S: int, device: torch.device):
    """Mask for T queries after S-T earlier keys: query i sees keys 0..S-T+i. CUDA: a CausalBias, applied without
    a (T, S) tensor; CPU: a bool mask (faster there), cached when small: CoMeT's chunks have few shapes."""
    if device.type == "cuda":
        return causal_lower_right(T, S)
    return (_bool_mask if T * S <= 1 << 20 else _bool_mask.__wrapped__)(T, S, device)


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
        # the sliding-window baseline (window > 0) is this attention with another kernel
        kernel = functools.partial(sliding_window_attention, window=cfg.window) if cfg.window else None
        self.attention = Attention(cfg, kernel)
        self.ffn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], past: tuple[Tensor, Tensor] | None = None,
                prefix: Tensor | None = None):
        """x (B, T, C) -> (x, (k, v) of past + prefix + x). prefix (B, n, C): the memory rows [G; T] (S2) in front,
        keys and values only (their outputs would be overwritten at the next layer). rope: prefix + x's angles."""
        rows = x if prefix is None else torch.cat([prefix, x], 1)
        a, kv = self.attention(self.attention_norm(rows), rope, past, rows.size(1) - x.size(1))
        x = x + a
        return x + self.feed_forward(self.ffn_norm(x)), kv


# --- S2: the extended chunk -------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkLayout:
    """S2: where every row of one extended chunk sits, and its RoPE position. For stride 4, 10 tokens:

        row       (S) | 0 .. n_g-1 | n_g .. P-1 | x0 x1 x2 x3 C x4 x5 x6 x7 C x8 x9 C | R .. R
        what      sink| G          | T          | tokens, a compression token C after every `stride` | readout
        position  0, 1, 2, ...                                             ..., n_sink + P + length - 1

    P = n_prefix = the rows of this layer's memory [G; T] (S2), which give only keys and values. The sink S
    (optional, one row of a fixed token) sees only itself, as a sequence's first token does, so the real tokens
    keep the attention sink a pretrained model relies on. Positions restart at 0 in every chunk, so no RoPE table
    is longer than one extended chunk and the model reads any length. Index tensors count the chunk's own rows
    (the sink first, then the rest in order), after the prefix."""
    n_prefix: int        # memory rows [G; T] in front of the chunk's rows
    order: Tensor        # (L,) row -> index into cat(sink, token embeddings, compression tokens, readout tokens)
    tokens: Tensor       # (n,) rows of the real tokens
    compression: Tensor  # (n_c,) rows of the compression tokens
    readout: Tensor      # (n_r,) rows of the readout tokens
    closed: bool         # a closed chunk updates the memories; an open one (still generating) does not
    n_sink: int = 0      # sink rows: row 0 at position 0, in front of the prefix

    @property
    def length(self) -> int:  # the chunk's own rows (prefix excluded, sink included)
        return self.order.numel()

    @property
    def positions(self) -> range:  # RoPE positions of the prefix and the rows after the sink (which sits at 0)
        return range(self.n_sink, self.n_prefix + self.length)


@functools.lru_cache(maxsize=256)
def chunk_layout(n_tokens: int, stride: int, n_readout: int, closed: bool, device: torch.device,
                 n_prefix: int = 0, n_sink: int = 0) -> ChunkLayout:
    """S2, the one owner of the extended chunk. A closed chunk of n tokens gets ceil(n/stride) compression tokens
    (stride 0: none) and n_readout readout tokens; n_sink sink rows go first. An open chunk gets neither readout
    tokens nor a trailing compression token, so an open layout is a prefix of every longer open layout (the KV
    cache relies on it)."""
    j = torch.arange(n_tokens)
    if stride:
        n_comp = math.ceil(n_tokens / stride) if closed else max(n_tokens - 1, 0) // stride
        k = torch.arange(n_comp)
        tokens = j + j // stride                          # token j follows j // stride compression tokens
        comp = (k + 1).mul(stride).clamp(max=n_tokens) + k  # after token min((k+1)*stride, n) - 1
    else:
        n_comp, tokens, comp = 0, j, j[:0]
    readout = n_tokens + n_comp + torch.arange(n_readout if closed else 0)
    tokens, comp, readout = tokens + n_sink, comp + n_sink, readout + n_sink  # behind the sink rows
    order = torch.cat([torch.arange(n_sink), tokens, comp, readout]).argsort()
    return ChunkLayout(n_prefix, order.to(device), tokens.to(device), comp.to(device), readout.to(device), closed,
                       n_sink)


CHUNK_ALIGNS = ("left", "right")


def chunk_spans(n_tokens: int, chunk_size: int, align: str = "left") -> list[range]:
    """S2's chunk plan, the one owner of where chunks start: the token positions of each chunk. "left": every
    chunk_size tokens from the first token (a last partial chunk stays open). "right" (one of the authors' chunk
    plans): the last chunk ends at the last token and the first one is short, so that a prompt and its answer end
    together at a chunk border instead of being cut wherever the sequence's length puts a border."""
    if align not in CHUNK_ALIGNS or chunk_size <= 0:
        raise ValueError(f"chunk align={align!r} must be one of {', '.join(CHUNK_ALIGNS)}, chunk_size={chunk_size} "
                         "positive")
    first = (n_tokens - 1) % chunk_size + 1 if align == "right" and n_tokens else chunk_size
    return [range(a, min(b, n_tokens)) for a, b in zip([0, *range(first, n_tokens, chunk_size)],
                                                         range(first, n_tokens + chunk_size, chunk_size))]


def chunk_closed(spans: list[range], i: int, chunk_size: int) -> bool:
    """Whether chunk i of a plan (`chunk_spans`) is closed: full, or more chunks follow; a last partial chunk stays
    open, as streaming sees it. model.chunks and the pipeline (S7) both ask here."""
    return len(spans[i]) == chunk_size or i < len(spans) - 1


def bptt_cut(chunk: int, bptt_chunks: int) -> bool:
    """Truncated BPTT: True where the gradient through the memories stops, in front of every
    `bptt_chunks`-th chunk (0: never). model.forward and the pipeline (S7) both ask here."""
    return bool(bptt_chunks) and chunk > 0 and chunk % bptt_chunks == 0


# --- the model --------------------------------------------------------------------------------------

class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
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
                LayerMemory(cfg.n_embd, cfg.n_global, cfg.temp_budget, cfg.adapter_rank, cfg.norm_eps, cfg.global_gate,
                            cfg.gate_bias)
                for _ in range(cfg.n_layer))
            if cfg.temp_budget:
                self.compression_emb = nn.Parameter(torch.empty(1, cfg.n_embd))
            if cfg.n_global:
                self.readout_emb = nn.Parameter(torch.empty(cfg.n_global, cfg.n_embd))
        self.checkpoint_activations = False  # train.py: recompute each layer-over-chunk step in backward
        self.build_rope()
        self.init_weights()

    def build_rope(self, device=None) -> None:
        """(Re)compute the RoPE table (after a meta-device build). S2: it never exceeds one extended chunk."""
        cos, sin = rope_table(self.config, self.config.max_positions, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, names: set[str] | None = None) -> None:
        """Normal(init_std) everywhere, residual outputs scaled by 1/sqrt(2*n_layer) (GPT-2), norms at 1, and the
        adapters' up-projections at 0 so the memories start as the identity (S5). names: only these parameters
        (the memories added to a pretrained model). NOTE: GPT-2's fixed 0.02 is too small for a tiny model."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if names is not None and name not in names:
                continue
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("gate.bias"):
                nn.init.constant_(p, self.config.gate_bias)
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

    def rope_at(self, rows: range) -> tuple[Tensor, Tensor]:
        """cos, sin (len(rows), hs) of the RoPE positions `rows` (a range: a view of the table, no copy)."""
        return self.rope_cos[rows.start:rows.stop], self.rope_sin[rows.start:rows.stop]

    def empty_memory(self, batch: int) -> tuple[MemoryState, ...]:  # every layer's, before the first chunk
        w = self.tok_embeddings.weight
        return tuple(MemoryState.empty(batch, self.config.n_embd, w.device, w.dtype) for _ in self.layers)

    def layout(self, n_tokens: int, closed: bool, n_prefix: int = 0) -> ChunkLayout:
        """This model's `chunk_layout` for a chunk of n_tokens behind n_prefix memory rows."""
        cfg = self.config
        stride = cfg.stride if cfg.comet and cfg.temp_budget else 0
        return chunk_layout(n_tokens, stride, cfg.n_global if cfg.comet else 0, closed, self.rope_cos.device, n_prefix,
                            cfg.n_sink)

    def run_blocks(self, h: Tensor, past: list | None = None, n_layers: int | None = None) -> tuple[Tensor, list]:
        """Plain decoder: rows h (B, T, C) through every block (or the first n_layers), after the S_past rows whose keys
        and values `past` holds (one (k, v) per layer). Returns the last block's output and every layer's (k, v)."""
        start = 0 if past is None else past[0][0].size(2)
        rope, cache = self.rope_at(range(start, start + h.size(1))), []
        for l, block in enumerate(self.layers[:n_layers]):
            h, kv = block(h, rope, None if past is None else past[l])
            cache.append(kv)
        return h, cache

    def embed_chunk(self, idx: Tensor, layout: ChunkLayout) -> Tensor:
        """Token ids (B, n) -> the chunk's input rows (B, L, C) with compression and readout tokens in place."""
        B = idx.size(0)
        parts = [self.tok_embeddings(idx)]  # (B, n, C)
        if layout.n_sink:
            assert layout.n_sink == self.config.n_sink, "the layout was made for another model"
            parts.insert(0, self.tok_embeddings.weight[self.config.sink_token].expand(B, 1, -1))
        if layout.compression.numel():
            parts.append(self.compression_emb.expand(B, layout.compression.numel(), -1))
        if layout.readout.numel():
            parts.append(self.readout_emb.expand(B, -1, -1))
        return torch.cat(parts, 1)[:, layout.order]

    def layer_step(self, l: int, h: Tensor, mem: MemoryState, layout: ChunkLayout,
                   past: tuple[Tensor, Tensor] | None = None):
        """S1, the unit of work: layer l over one chunk's rows h (B, L, C), given layer l's memory. With `past`
        (keys/values of an open chunk's earlier rows: streaming) h holds only the layout's last rows. Returns
        (layer output, keys/values, memory for the next chunk: changed only if the layout is closed).
        checkpoint_activations: only the step's inputs are kept, the rest recomputed in backward."""
        if self.checkpoint_activations and torch.is_grad_enabled() and past is None:
            return checkpoint(self._layer_step, l, h, mem, layout, use_reentrant=False)
        return self._layer_step(l, h, mem, layout, past)

    def _layer_step(self, l: int, h: Tensor, mem: MemoryState, layout: ChunkLayout,
                    past: tuple[Tensor, Tensor] | None = None):
        assert mem.prefix_len == layout.n_prefix, "the layout was made for another memory size"
        rows, prefix = layout.positions, mem.prefix() if layout.n_prefix else None  # S2: [G; T] in front
        block, sink = self.layers[l], None
        if past is not None:  # the newest rows of an open chunk, after the cached ones (the sink's among them)
            rows, prefix = rows[-h.size(1):], None
        elif layout.n_sink:  # S2: the sink row sees only itself at position 0; the others see its keys and values
            sink, past = block(h[:, :layout.n_sink], self.rope_at(range(layout.n_sink)))
            h = h[:, layout.n_sink:]
        h, kv = block(h, self.rope_at(rows), past, prefix)
        if sink is not None:
            h = torch.cat([sink, h], 1)
        if layout.closed:  # S3, S4: readout rows feed the global memory, compression rows the FIFO
            mem = self.memories[l](mem, h[:, layout.readout], h[:, layout.compression])
        return h, kv, mem

    def forward_chunk(self, idx: Tensor, memory: tuple[MemoryState, ...], closed: bool = True):
        """One chunk (B, n) through every layer: its real tokens' states (B, n, C) and the memories after it."""
        layout = self.layout(idx.size(1), closed, memory[0].prefix_len)  # every layer's memory has one size
        h = self.embed_chunk(idx, layout)
        new_memory = []
        for l, mem in enumerate(memory):
            h, _, mem = self.layer_step(l, h, mem, layout)
            new_memory.append(mem)
        return h[:, layout.tokens], tuple(new_memory)

    def chunks(self, idx: Tensor, bptt_chunks: int = 0, align: str = "left"
               ) -> Iterator[tuple[Tensor, tuple[MemoryState, ...]]]:
        """S1, chunk-major: idx (B, N) chunk by chunk (`chunk_spans`) from empty memories; yields each chunk's
        real-token states (B, n, C) and the memories after it. BPTT: cut at `bptt_cut`."""
        cs, memory = self.config.chunk_size, self.empty_memory(idx.size(0))
        spans = chunk_spans(idx.size(1), cs, align)
        for i, span in enumerate(spans):
            if bptt_cut(i, bptt_chunks):
                memory = tuple(m.detach() for m in memory)  # truncated BPTT
            h, memory = self.forward_chunk(idx[:, span.start:span.stop], memory, chunk_closed(spans, i, cs))
            yield h, memory

    def hidden(self, idx: Tensor, bptt_chunks: int = 0, align: str = "left") -> Tensor:
        """idx (B, N) token ids -> the last block's states of the real tokens (B, N, C), before the final norm and the
        output. CoMeT: `chunks` (cut as `align` says); the compression and readout rows never reach the output."""
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be (batch, tokens) with at least one token, got shape {tuple(idx.shape)}")
        if self.config.comet:
            return torch.cat([h for h, _ in self.chunks(idx, bptt_chunks, align)], 1)
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of {idx.size(1)} tokens is longer than block_size={self.config.block_size}")
        return self.run_blocks(self.tok_embeddings(idx))[0]

    def forward(self, idx: Tensor, targets: Tensor | None = None, bptt_chunks: int = 0, align: str = "left"):
        """idx (B, N) token ids -> (logits (B, N, V), loss or None), like nanoGPT's GPT.forward (`hidden`, then the
        final norm and the output). targets: -1 = no loss there."""
        logits = self.output(self.norm(self.hidden(idx, bptt_chunks, align)))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss
