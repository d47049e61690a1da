"""Streaming inference (docs/design.md, S6): read a context of any length chunk by chunk at constant memory, then generate.

    state = new_stream(model, batch=1)
    logits, state = stream(model, context, state)   # any number of tokens, in as many calls as you like
    tokens, state = generate(model, prompt, 50, temperature=0.8, top_k=40, state=state)
    answer, state = ask(model, lambda a, b: ids[:, a:b], ids.size(1), 6, align="right")  # a prompt, then its answer
    save_state("book.state", model, state, enc, n_read)   # read a book once: a file of a few hundred KiB
    state, header = load_state("book.state", model, enc)  # ask about it any number of times

Every completed chunk is closed: run whole, with its compression and readout rows, through
`Transformer.forward_chunk`, which updates every layer's memories. The tokens after the last closed chunk
form the open chunk; each call extends it through its KV cache, running only its new rows. A plain decoder
(chunk_size=0) is one open chunk of up to block_size tokens.

A state file is safetensors (never pickle): every layer's memories, the open chunk's tokens and its KV
cache, padded to the longest open chunk so that CoMeT's file has one size whatever the context; its
header names the model (config and a fingerprint of the weights), the tokenizer and the tokens read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

from collections.abc import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor
from tqdm import tqdm

from checkpoint import read_safetensors, write_atomically
from configurator import check_output
from memory import MemoryState
from model import ModelConfig, Transformer, chunk_spans


@dataclass(frozen=True)
class StreamState:
    """Everything streaming inference keeps: constant size, whatever the context length."""
    memory: tuple[MemoryState, ...]         # per layer, after the last closed chunk
    tokens: Tensor                          # (B, n_open) tokens of the open chunk, n_open < chunk_size
    cache: tuple[tuple[Tensor, Tensor], ...]  # per layer (k, v) of [sink; G; T; open chunk]; () while it is empty


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
            h, state = close_chunk(model, StreamState(state.memory, tokens, state.cache))
        else:
            h, state = _extend_open_chunk(model, tokens, state)
    if h is None:
        raise ValueError("stream() needs at least one token")
    return model.output(model.norm(h[:, -1])), state


@torch.no_grad()
def close_chunk(model: Transformer, state: StreamState) -> tuple[Tensor, StreamState]:
    """Close the open chunk now, full or short (a chunk plan's short first chunk: model.chunk_spans): it runs
    whole with its readout and compression tokens and the memories update. Returns its real tokens' states
    (B, n, C) and the state with an empty open chunk."""
    h, memory = model.forward_chunk(state.tokens, state.memory, closed=True)
    return h, StreamState(memory, state.tokens[:, :0], ())


@torch.no_grad()
def read_first_chunk(model: Transformer, idx: Tensor, n_inputs: int, align: str,
                     state: StreamState | None = None) -> tuple[StreamState, int]:
    """The chunks still to come cut as `align` says (model.chunk_spans), over the open chunk's tokens of `state`
    (a fresh stream if None) and the n_inputs tokens still to be read (a prompt and the answer tokens fed back),
    whose first ones are idx (B, n). A plan that starts short ("right": so that the question and its answer end a
    chunk) has its short first chunk closed now, from the open tokens and idx's first ones, so that a question
    asked from a saved state ends its answer with a chunk too. Returns the state (its open tokens' first part
    closed, if the short chunk ends inside them) and how many of idx's tokens it read: 0 if the plan starts with a
    full chunk, if the short chunk ends inside the open tokens, or if idx holds fewer tokens than it needs."""
    state, cs = state or new_stream(model, idx.size(0)), model.config.chunk_size
    n_open = state.tokens.size(1)
    head = len(chunk_spans(n_open + n_inputs, cs, align)[0]) if cs and n_inputs > 0 else 0
    if head in (0, cs) or head - n_open > idx.size(1) or head >= n_open + n_inputs:
        return state, 0
    taken = max(0, head - n_open)  # idx's tokens in the short chunk
    tokens = torch.cat([state.tokens, idx[:, :taken]], 1)[:, :head]
    closed = close_chunk(model, StreamState(state.memory, tokens, ()))[1]
    rest = state.tokens[:, head:]  # the short chunk ended inside the open tokens: the rest open the next chunk
    return (stream(model, rest, closed)[1] if rest.size(1) else closed), taken


def _extend_open_chunk(model: Transformer, tokens: Tensor, state: StreamState) -> tuple[Tensor, StreamState]:
    """Run only the new rows of the open chunk (now `tokens`), attending to the cached rows. An open layout
    is a prefix of every longer one (chunk_layout), so the new rows are the longer layout's last rows."""
    n_prefix = state.memory[0].prefix_len
    old = model.layout(state.tokens.size(1), False, n_prefix)
    new = model.layout(tokens.size(1), False, n_prefix)
    done = old.length if state.cache else 0  # rows the cache holds (none yet: the sink row, if any, is new too)
    h = model.embed_chunk(tokens, new)[:, done:]  # new rows: the sink (first call), a compression token, tokens
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
            logits = (logits - logits.amax(-1, keepdim=True)) / temperature  # the top logit 0: finite at any T > 0
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            nxt = torch.multinomial(F.softmax(logits, -1), 1)
        out.append(nxt)
        logits, state = stream(model, nxt, state)
    return torch.cat(out, 1) if out else idx[:, :0], state


@torch.no_grad()
def read(model: Transformer, tokens: Callable[[int, int], Tensor], n: int, state: StreamState | None = None,
         align: str = "left", ahead: int = 0, piece: int = 65536, progress: bool = False) -> StreamState:
    """Stream n tokens after `state` (a new stream if None), `tokens(a, b)` giving positions a..b-1 (B, b - a), in
    pieces of `piece` tokens (with a progress bar if asked). The chunks still to come are cut as `align` says over
    these n tokens and the `ahead` tokens that will follow them (`read_first_chunk`)."""
    state, a = read_first_chunk(model, tokens(0, min(n, model.config.chunk_size)), n + ahead, align, state)
    for a in tqdm(range(a, n, piece), unit="piece", disable=not progress or n - a <= piece):
        _, state = stream(model, tokens(a, min(a + piece, n)), state)
    return state


def ask(model: Transformer, tokens: Callable[[int, int], Tensor], n_prompt: int, n_new: int,
        state: StreamState | None = None, align: str = "left", piece: int = 65536) -> tuple[Tensor, StreamState]:
    """Read a prompt of n_prompt tokens (`tokens(a, b)`, as in `read`) after `state`, then answer it greedily with
    n_new tokens; the chunks cut as `align` says over the prompt and its answer ("right": the answer ends a chunk).
    Returns the answer (B, n_new) and the state after it."""
    state = read(model, tokens, n_prompt - 1, state, align, n_new, piece)
    return generate(model, tokens(n_prompt - 1, n_prompt), n_new, temperature=0, state=state)


# --- state files: read once, ask many times ---------------------------------------------------------------

STATE_FORMAT = "nanocomet-state/1"
MEMORY_FIELDS = tuple(f.name for f in dataclasses.fields(MemoryState))  # each layer's tensors, saved by these names
PROBE = "The pass key is 12345. Remember it.\n\tWhat is Zoë's code? ¿Qué? 東京 🙂"  # tells tokenizers apart


def model_fingerprint(model: Transformer) -> str:
    """A short identity of a model's weights: sha256 over each tensor's name, shape, dtype and up to 4,096 evenly
    spaced values. Cheap at 8B; any training step or other checkpoint changes it, so does another dtype."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[::max(1, flat.numel() // 4096)][:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(enc) -> str:
    """A short identity of a tokenizer: its vocabulary size and how it splits PROBE."""
    return hashlib.sha256(f"{enc.n_vocab}:{enc.encode_ordinary(PROBE)}".encode()).hexdigest()[:16]


def _checksum(tensors: dict[str, Tensor], header: dict[str, str]) -> str:
    """sha256 of the header (but its checksum) and every tensor's bytes: safetensors checks the file's layout,
    not its values, and a changed count in the header would load a wrong state without an error."""
    h = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config_json(model: Transformer) -> str:
    """The model's config as a state file's header records it (and compares it)."""
    return json.dumps(dataclasses.asdict(model.config), default=str)


def _open_rows(model: Transformer) -> int:
    """KV-cache rows of the longest open chunk: [G; T] in full, the sink and chunk_size - 1 tokens (S2)."""
    cfg = model.config
    return cfg.n_global + cfg.temp_budget + model.layout(cfg.chunk_size - 1, False).length


def save_state(path: str, model: Transformer, state: StreamState, enc, n_read: int, source: str = "") -> int:
    """Write `state` (after n_read tokens) to path as safetensors, atomically; returns the file's size in bytes.
    CoMeT pads the open chunk and its cache to their longest, so once the memories are full (a few chunks) the
    size stays the same whatever the context; a plain decoder's state is its whole KV cache and grows.
    source: what the model was opened from (for messages). Private (0o600): it holds the context's last tokens."""
    cfg, (B, n_open) = model.config, state.tokens.shape
    pad = lambda t, n, dim: F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, max(0, n - t.size(dim))])
    cache_rows = state.cache[0][0].size(2) if state.cache else 0
    rows, dtype = _open_rows(model) if cfg.comet else cache_rows, state.memory[0].temp_memory.dtype
    tensors = {"tokens": pad(state.tokens, cfg.chunk_size - 1 if cfg.comet else n_open, 1)}
    for l, mem in enumerate(state.memory):
        tensors.update({f"{l}.{k}": getattr(mem, k) for k in MEMORY_FIELDS})
        k, v = state.cache[l] if state.cache else [torch.zeros(B, cfg.n_kv_head, 0, cfg.head_dim, dtype=dtype)] * 2
        tensors.update({f"{l}.k": pad(k, rows, 2), f"{l}.v": pad(v, rows, 2)})
    tensors = {n: t.detach().contiguous().cpu() for n, t in tensors.items()}
    count = lambda n: f"{n:015d}"  # fixed width: the header, too, keeps one size
    header = dict(format=STATE_FORMAT, config=_config_json(model),
                  weights=model_fingerprint(model), tokenizer=tokenizer_fingerprint(enc), tokens_read=count(n_read),
                  batch=count(B), open_tokens=count(n_open), cache_rows=count(cache_rows), source=source)
    header["checksum"] = _checksum(tensors, header)
    write_atomically(path, lambda f: f.write(save(tensors, metadata=header)))
    return os.path.getsize(path)


def _is_state(path: str) -> bool:
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("format") == STATE_FORMAT


def check_state_path(path: str, setting: str = "save_state") -> None:
    """Before reading a long context: one clear error if its state could not be written to path, or would
    replace a file that is not a state file (a checkpoint, say)."""
    check_output(path, f"--{setting}", ("state file", _is_state))


def load_state(path: str, model: Transformer, enc) -> tuple[StreamState, dict]:
    """The StreamState a `save_state` file holds, on the model's device, and its header (tokens_read as int).
    One clear error for a missing, damaged or foreign file, or one written by another model or tokenizer.
    Never runs code: safetensors is a JSON header and raw bytes."""
    tensors, header = read_safetensors(path, "state file", " (write one with sample.py --save_state)")
    if header.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a nanocomet state file of format {STATE_FORMAT} "
                         f"(it says {header.get('format')!r}): read the context again")
    if header.get("checksum") != _checksum(tensors, header):
        raise ValueError(f"state file {path} is damaged: its contents do not match the checksum it records")
    _check_same_model(path, header, model, enc)
    cfg, device = model.config, model.tok_embeddings.weight.device
    try:
        n_open, rows = int(header["open_tokens"]), int(header["cache_rows"])
        memory = tuple(MemoryState(*(tensors[f"{l}.{k}"].to(device) for k in MEMORY_FIELDS))
                       for l in range(cfg.n_layer))
        cache = tuple((tensors[f"{l}.k"][:, :, :rows].to(device), tensors[f"{l}.v"][:, :, :rows].to(device))
                      for l in range(cfg.n_layer)) if n_open else ()
        _check_contents(tensors, memory, cfg, n_open, rows)
        state = StreamState(memory, tensors["tokens"][:, :n_open].to(device), cache)
        return state, {**header, "tokens_read": int(header["tokens_read"])}
    except (KeyError, ValueError) as e:
        raise ValueError(f"state file {path} is damaged: {type(e).__name__} {e} in its header or tensors") from None


def _check_contents(tensors: dict, memory: tuple, cfg, n_open: int, rows: int) -> None:
    """A state's tensors as the model makes them: token ids in the vocabulary, counts within the tensors, memories of
    (B, slots, C) with 0 or n_global global slots and at most temp_budget FIFO slots."""
    tokens = tensors["tokens"]  # (B, open tokens kept)
    counts_ok = tokens.dim() == 2 and 0 <= n_open <= tokens.size(1) and 0 <= rows <= tensors["0.k"].size(2)
    ids_ok = tokens.dtype == torch.long and (tokens.numel() == 0 or 0 <= tokens.min() <= tokens.max() < cfg.vocab_size)
    if not (counts_ok and ids_ok):
        raise ValueError(f"token ids outside the vocabulary of {cfg.vocab_size}, or counts beyond the tensors")
    for m in memory:
        shapes_ok = all(t.dim() == 3 and t.size(0) == tokens.size(0) and t.size(2) == cfg.n_embd
                        for t in (m.gate_state, m.global_memory, m.temp_memory))
        slots_ok = m.gate_state.size(1) in (0, cfg.n_global) and m.global_memory.shape == m.gate_state.shape
        if not (shapes_ok and slots_ok and m.temp_memory.size(1) <= cfg.temp_budget):
            raise ValueError("memories of another shape than the model's")


def _check_same_model(path: str, header: dict, model: Transformer, enc) -> None:
    """One line naming what differs between the model and tokenizer that wrote a state file and these."""
    try:
        saved = json.loads(header["config"])
    except (KeyError, json.JSONDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise ValueError(f"state file {path} is damaged: its header has no readable model config")
    # a field added since the file was written: it was written with the field's default
    saved = {**{f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name not in saved}, **saved}
    now = json.loads(_config_json(model))
    # block_size (a plain decoder's longest input) and init_std (initialisation) never change a state
    differ = [k for k in sorted(set(saved) | set(now), key=lambda k: (k != "chunk_size", k))
              if saved.get(k) != now.get(k) and k not in ("block_size", "init_std")]
    by = f" (written with {header['source']})" if header.get("source") else ""
    if differ:
        was, has = (", ".join(f"{k}={c.get(k)!r}" for k in differ[:3]) for c in (saved, now))
        raise ValueError(f"state file {path} was written by a model with {was}, this one has {has}{by}: "
                         "load it with the model that read the context")
    if header.get("weights") != model_fingerprint(model):
        raise ValueError(f"state file {path} was written by a model of the same shape with other weights, or the "
                         f"same in another dtype (fingerprint {header.get('weights')}, this one "
                         f"{model_fingerprint(model)}){by}: load it with the checkpoint that read the context")
    if header.get("tokenizer") != tokenizer_fingerprint(enc):
        raise ValueError(f"state file {path} was read with another tokenizer (fingerprint {header.get('tokenizer')}, "
                         f"this one {tokenizer_fingerprint(enc)}): use the tokenizer that read the context")


def repeat_state(state: StreamState, batch: int) -> StreamState:
    """A state of batch 1 as `batch` identical rows: several questions about one context, asked as one batch."""
    if state.tokens.size(0) != 1:
        raise ValueError(f"repeat_state needs a state of batch 1, got {state.tokens.size(0)}")
    rep = lambda t: t.expand(batch, *t.shape[1:])  # views: nothing is ever written in place
    return StreamState(tuple(MemoryState(*map(rep, m.tensors())) for m in state.memory), rep(state.tokens),
                       tuple((rep(k), rep(v)) for k, v in state.cache))
