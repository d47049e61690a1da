"""Load Llama 2 / 3 / 3.1 / 3.2 checkpoints into model.py, and put CoMeT's memories on top.

    model = load_llama("path/to/Llama-3.2-1B", dtype=torch.bfloat16, device="cuda")       # plain decoder
    model = load_llama(path, chunk_size=2048, n_global=512, temp_budget=2048)            # + new memories

Three layouts, one code path:
- Hugging Face: config.json + model.safetensors, or shards listed in model.safetensors.index.json.
- Meta: params.json + consolidated.00.pth (+ .01, ... for model-parallel shards, concatenated here).
- GGUF (llama.cpp): one .gguf file, hyperparameters in its metadata, tensors dequantized by the optional
  `gguf` package; q/k rows in Meta's rotary layout, as llama.cpp's converter writes them.
The model is built on the meta device and every tensor is read, cast and placed one at a time, so a
large model never exists twice in memory (and never as an fp32 copy when loading bf16).
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from checkpoint import read_safetensors, torch_load, write_atomically
from model import MEMORY_SETTINGS, ModelConfig, Transformer

# our parameter names (= Meta's) -> Hugging Face's; {i} is the layer index
HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
}


# our parameter names -> llama.cpp's (GGUF)
GGUF_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{i}.attention_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.attention.wq.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.attention.wk.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.attention.wv.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.attention.wo.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.w1.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.feed_forward.w2.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.feed_forward.w3.weight": "blk.{i}.ffn_up.weight",
}
NAMES = {"hf": HF_NAMES, "gguf": GGUF_NAMES, "meta": {k: k for k in HF_NAMES}}


def meta_to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a Meta wq/wk (n_heads * head_dim, d) into our (and HF's) RoPE layout.
    Meta rotates adjacent pairs (2i, 2i+1) of each head, as complex numbers; we rotate (i, i + head_dim/2)
    ("rotate half"). Moving row 2i+b of every head to b*head_dim/2 + i turns one into the other; q and
    k get the same reordering, so every attention score q.k is unchanged. Pass n_kv_head for wk (GQA)."""
    rows, d = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, d).transpose(1, 2).reshape(rows, d)


def is_pretrained(path: str) -> bool:
    """A Llama checkpoint directory or GGUF file (what `load_llama` reads), as train.py's init_from."""
    return os.path.isdir(path) or (path.endswith(".gguf") and os.path.isfile(path))


def read_config(path: str) -> tuple[dict, str]:
    """ModelConfig fields of a checkpoint directory or .gguf file, and its layout ("hf", "meta" or "gguf")."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _gguf_config(gguf_reader(path), path), "gguf"
    hf, meta = os.path.join(path, "config.json"), os.path.join(path, "params.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    file, layout = (hf, "hf") if os.path.isfile(hf) else (meta, "meta") if os.path.isfile(meta) else (None, None)
    if file:
        try:
            args = (_hf_config if layout == "hf" else _meta_config)(file)
            ModelConfig(**args)  # the fields' types and ranges (zero heads, a layer count in words, ...)
            return args, layout
        except KeyError as e:
            raise ValueError(f"{file}: missing key {e}") from None
        except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            raise ValueError(str(e) if str(e).startswith(file) else f"{file}: not a Llama config ({e})") from None
    raise FileNotFoundError(f"{path}: no config.json (Hugging Face layout) or params.json (Meta layout)")


def _read_json(file: str) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            c = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(c, dict):
        raise ValueError(f"{file}: expected a JSON object of settings, found a {type(c).__name__}")
    return c


def _hf_config(file: str) -> dict:
    c = _read_json(file)
    arch = c.get("architectures") or [c.get("model_type")]
    if "LlamaForCausalLM" not in arch and arch != ["llama"]:
        raise ValueError(f"{file}: architecture {arch[0]!r} is not supported (only LlamaForCausalLM)")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if c.get(key, ok) != ok:
            raise ValueError(f"{file}: {key}={c[key]!r} is not supported (Llama uses {ok!r})")
    n_embd, n_head = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim", n_embd // n_head) * n_head != n_embd:
        raise ValueError(f"{file}: head_dim={c['head_dim']} x {n_head} heads != hidden_size={n_embd} (not supported)")
    # transformers 5 writes rope_parameters (with rope_theta inside); older files rope_theta + rope_scaling
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    args = dict(vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
                n_kv_head=c.get("num_key_value_heads") or n_head, ffn_hidden=c["intermediate_size"],
                rope_theta=float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                block_size=c.get("max_position_embeddings", 8192))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "llama3":
        args.update(rope_factor=float(rope["factor"]), rope_low_freq=float(rope["low_freq_factor"]),
                    rope_high_freq=float(rope["high_freq_factor"]),
                    rope_original_context=int(rope["original_max_position_embeddings"]))
    elif kind != "default":
        raise ValueError(f"{file}: rope type {kind!r} is not supported (default or llama3)")
    return args


def _meta_config(file: str) -> dict:
    c = _read_json(file)
    dim = c["dim"]
    hidden = int(2 * 4 * dim / 3)  # Meta's FeedForward: 2/3 of 4d, times ffn_dim_multiplier, rounded up
    if c.get("ffn_dim_multiplier"):
        hidden = int(c["ffn_dim_multiplier"] * hidden)
    multiple = c.get("multiple_of", 256)
    args = dict(n_layer=c["n_layers"], n_head=c["n_heads"], n_kv_head=c.get("n_kv_heads") or c["n_heads"],
                n_embd=dim, ffn_hidden=multiple * math.ceil(hidden / multiple),
                rope_theta=float(c.get("rope_theta", 10000.0)), norm_eps=float(c.get("norm_eps", 1e-5)),
                block_size=c.get("max_seq_len", 8192))
    if c.get("vocab_size", -1) > 0:  # Llama 2 writes -1: then the embedding's shape tells
        args["vocab_size"] = c["vocab_size"]
    if c.get("use_scaled_rope"):  # NOTE: Meta's code hard-codes 3.1's factor 8 for every 3.x model, while HF's
        # configs of 3.2 1B/3B say 32: pass rope_factor=32.0 to load_llama for those in this layout
        args.update(rope_factor=8.0, rope_low_freq=1.0, rope_high_freq=4.0, rope_original_context=8192)
    return args


def gguf_reader(path: str):
    """A memory-mapped gguf.GGUFReader of `path`; one clear error for a missing package or a broken file."""
    try:
        import gguf
    except ImportError:
        raise ValueError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)") from None
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # a bad magic, a truncated header or tensor table
        raise ValueError(f"{path}: not a readable GGUF file (corrupt or truncated?): {e}") from None


def _gguf_config(reader, file: str) -> dict:
    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None and default is None:
            raise ValueError(f"{file}: GGUF metadata has no {key}")
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{file}: GGUF architecture {arch!r} is not supported (only llama)")
    tensors = {t.name: t for t in reader.tensors}
    if field("llama.rope.scaling.type", "none") not in ("none", "linear") or "rope_freqs.weight" in tensors \
            or field("llama.rope.scaling.factor", 1.0) != 1.0:
        raise ValueError(f"{file}: RoPE scaling in GGUF files is not supported yet")
    n_head = field("llama.attention.head_count")
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise ValueError(f"{file}: GGUF file has no tensor token_embd.weight (the token embeddings)")
    return dict(vocab_size=int(embedding.shape[-1]), tie_embeddings="output.weight" not in tensors,  # GGUF: (d, V)
                n_layer=field("llama.block_count"), n_embd=field("llama.embedding_length"), n_head=n_head,
                n_kv_head=field("llama.attention.head_count_kv", n_head), ffn_hidden=field("llama.feed_forward_length"),
                rope_theta=float(field("llama.rope.freq_base", 10000.0)),
                norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                block_size=field("llama.context_length", 8192))


class _Tensors:
    """Lazy access to a checkpoint's tensors by name: shape without reading, one tensor at a time."""

    def __init__(self, path: str, layout: str):
        self.files: dict[str, str] = {}  # tensor name -> file
        self.gguf = None
        if layout == "gguf":
            self.gguf = {t.name: t for t in gguf_reader(path).tensors}
            self.files, self.shards, self.source = {k: path for k in self.gguf}, None, path
        elif layout == "hf":
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.isfile(index):
                weight_map = _read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{index}: no weight_map")
                self.files = {k: os.path.join(path, f) for k, f in weight_map.items()}
            elif os.path.isfile(os.path.join(path, "model.safetensors")):
                self.files = None
            else:
                raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                        "(only safetensors weights are read)")
            names = sorted(set(self.files.values())) if self.files else [os.path.join(path, "model.safetensors")]
            self.handles = {}
            for f in names:
                if not os.path.isfile(f):
                    raise FileNotFoundError(f"{f}: missing (listed in model.safetensors.index.json)")
                try:
                    self.handles[f] = safe_open(f, framework="pt", device="cpu")
                except Exception as e:  # SafetensorError: header or size damaged
                    raise ValueError(f"cannot read {f} (corrupt or truncated?): {e}") from None
            if self.files is None:
                self.files = {k: names[0] for k in self.handles[names[0]].keys()}
            self.shards, self.source = None, index if os.path.isfile(index) else names[0]
        else:
            names = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
            if not names:
                raise FileNotFoundError(f"{path}: no consolidated.*.pth next to params.json")
            self.shards = [(f, torch_load(f, mmap=True)) for f in names]  # memory-mapped, read on use
            for f, sd in self.shards:
                bad = ([k for k, v in sd.items() if not isinstance(v, torch.Tensor)] if isinstance(sd, dict)
                       else ["(top level)"])
                if bad:
                    raise ValueError(f"{f}: {bad[0]} is not a tensor (expected a dict of tensors)")
            self.files = {k: names[0] for k in self.shards[0][1]}
            self.source = names[0]

    def get(self, name: str, shape: torch.Size) -> torch.Tensor:
        """The whole tensor `name`; Meta's model-parallel shards are joined along the dim that gives `shape`."""
        if self.gguf is not None:
            return self._dequantize(name)
        if self.shards is None:
            try:
                return self.handles[self.files[name]].get_tensor(name)
            except Exception as e:  # SafetensorError: listed in the index, absent from the file
                raise ValueError(f"{self.files[name]}: cannot read tensor {name} ({e})") from None
        parts = [sd[name] for _, sd in self.shards]
        if len(parts) == 1 or parts[0].shape == shape:  # replicated (norms) or not sharded
            return parts[0]
        for dim in range(parts[0].dim()):
            if parts[0].shape[dim] * len(parts) == shape[dim]:
                return torch.cat(parts, dim)
        return parts[0]  # the shape check will name it

    def _dequantize(self, name: str) -> torch.Tensor:
        """A GGUF tensor as float32 (the caller casts it), whatever its quantization."""
        import gguf
        t = self.gguf[name]
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{self.source}: tensor {name} has type {t.tensor_type.name}, which cannot be "
                             "dequantized (supported: F32, F16, BF16 and the Q*/IQ* types gguf dequantizes)") from None
        except ValueError as e:  # the data ends early
            raise ValueError(f"{self.source}: tensor {name} cannot be read (corrupt or truncated?): {e}") from None
        return torch.from_numpy(data.astype("float32")).reshape(self.shape(name))  # a copy: the file is read-only

    def shape(self, name: str) -> tuple[int, ...]:
        if self.gguf is not None:
            return tuple(int(n) for n in reversed(self.gguf[name].shape))  # GGUF lists the fastest dim first
        if self.shards is None:
            try:
                return tuple(self.handles[self.files[name]].get_slice(name).get_shape())
            except Exception as e:
                raise ValueError(f"{self.files[name]}: cannot read tensor {name} ({e})") from None
        return tuple(self.shards[0][1][name].shape)  # a model-parallel shard: get() joins and checks them


READOUT_INITS = ("mean", "apart")  # new readout embeddings: one vector and noise | orthogonal directions


def load_llama(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu", readout_init: str = "mean",
               **overrides) -> Transformer:
    """A Llama checkpoint directory or .gguf file -> Transformer in eval mode, weights in `dtype` on `device`.

    Without overrides it is the plain pretrained decoder (chunk_size=0). CoMeT settings (chunk_size,
    n_global, stride, temp_budget, adapter_rank) add memories: their modules start as in S5 (adapters =
    identity), the compression and readout token embeddings start at the mean token embedding
    (readout_init="mean": readout slots + a little noise, so that they differ; "apart": + orthogonal directions as
    long as a token's distance from the mean). Errors name the file and the tensor."""
    if readout_init not in READOUT_INITS:
        raise ValueError(f"readout_init={readout_init!r} must be mean or apart")
    args, layout = read_config(path)
    if readout_init == "apart" and overrides.get("n_global", 0) > args["n_embd"]:
        raise ValueError(f"readout_init=apart needs n_global <= n_embd: {overrides['n_global']} directions apart")
    tensors = _Tensors(path, layout)
    if "vocab_size" not in args:
        args["vocab_size"] = tensors.shape(NAMES[layout]["tok_embeddings.weight"])[0]
    if layout == "meta":
        args["tie_embeddings"] = "output.weight" not in tensors.files  # no tie flag in this layout
    try:
        cfg = ModelConfig(**{**args, "chunk_size": 0, **overrides})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    with torch.device("meta"):
        model = Transformer(cfg)
    keys = {}  # our parameter name -> the checkpoint's tensor name
    for ours in HF_NAMES:
        for i in range(cfg.n_layer) if "{i}" in ours else [0]:
            keys[ours.format(i=i)] = NAMES[layout][ours].format(i=i)
    used = set()
    for name, p in list(model.named_parameters()):
        if model.is_memory_param(name):
            continue
        key = keys[name]
        if key not in tensors.files:
            raise ValueError(f"{tensors.source}: tensor {key} is missing")
        if tensors.shards is None and tensors.shape(key) != tuple(p.shape):  # checked before reading it
            raise ValueError(f"{tensors.files[key]}: tensor {key} has shape {tensors.shape(key)}, but the config "
                             f"says {tuple(p.shape)}")
        t = tensors.get(key, p.shape)
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{tensors.files[key]}: tensor {key} has shape {tuple(t.shape)}, but the config "
                             f"says {tuple(p.shape)}")
        if layout in ("meta", "gguf") and name.endswith(("wq.weight", "wk.weight")):
            t = meta_to_hf_rotary(t, cfg.n_head if name.endswith("wq.weight") else cfg.n_kv_head)
        _set_param(model, name, t.to(device=device, dtype=dtype))
        used.add(key)
    # RoPE tables some checkpoints carry (HF's inv_freq, Meta's Llama 1/2 rope.freqs) are recomputed here
    extra = sorted(k for k in tensors.files if k not in used and not k.endswith(("rotary_emb.inv_freq", "rope.freqs"))
                   and not (cfg.tie_embeddings and k == keys["output.weight"]))
    if extra:
        raise ValueError(f"{tensors.files[extra[0]]}: unexpected tensor {extra[0]} for a Llama of this config")
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    _add_memories(model, device, dtype, readout_init)
    model.build_rope(device)
    return model.eval()


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, nn.Parameter(value))


def _add_memories(model: Transformer, device, dtype, readout_init: str = "mean") -> None:
    """Give the CoMeT parameters (still on the meta device) real storage and their initial values."""
    new = {n for n, p in model.named_parameters() if p.is_meta}
    for name in new:
        p = model.get_parameter(name)
        _set_param(model, name, torch.empty(p.shape, device=device, dtype=dtype))
    model.init_weights(new)
    with torch.no_grad():
        emb = model.tok_embeddings.weight
        mean = emb.mean(0, dtype=torch.float32)  # a token-like input, in the embeddings' own region
        if "compression_emb" in new:
            model.compression_emb.copy_(mean.expand_as(model.compression_emb))
        if "readout_emb" in new and readout_init == "apart":  # distinct rows: a slot each of its own
            directions, _ = torch.linalg.qr(torch.randn(emb.size(1), model.readout_emb.size(0), device=emb.device))
            spread = (emb.float() - mean).norm(dim=1).mean()  # a token's typical distance from the mean
            model.readout_emb.copy_(mean + spread * directions.T)
        elif "readout_emb" in new:
            noise = torch.randn(model.readout_emb.shape, device=emb.device) * emb.std(0).float() * 0.1
            model.readout_emb.copy_(mean + noise)


UNFREEZE = {"": (), "attention": (".attention.", ".attention_norm.")}  # base weights a frozen-base run trains too


def trains(model: Transformer, name: str, unfreeze: str = "") -> bool:
    """Whether a frozen-base run trains parameter `name`: what CoMeT adds, and the base weights `unfreeze` names
    (attention: each layer's q/k/v/o and attention norm, which read and write the memory rows)."""
    return model.is_memory_param(name) or any(part in name for part in UNFREEZE[unfreeze])


def freeze_base(model: Transformer, dtype: torch.dtype | None = None, unfreeze: str = "") -> list[str]:
    """Train only what CoMeT adds (memory modules, compression and readout embeddings) and the base weights
    `unfreeze` names (`trains`); returns their names.
    dtype (e.g. bfloat16, for bf16 autocast): the frozen matrices are held in it, half the memory of fp32;
    the norms' weights stay fp32 (tiny, and a norm runs fused only with its input's dtype), and so do the
    memories and their optimizer."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(trains(model, name, unfreeze))
        if p.requires_grad:
            trainable.append(name)
        elif dtype is not None and p.dim() >= 2:
            p.data = p.data.to(dtype)
    return trainable


# --- CoMeT's parameters alone, on top of a base model they name ---------------------------------------

MEMORIES_FORMAT = "nanocomet-memories/1"


def fingerprint(path: str) -> str:
    """A short identity of a base model's weights (a .gguf file, or a directory's config.json / params.json
    and weight files): sha256 over each file's size and first and last MiB, and a directory's file names.
    Cheap for an 8B model; a renamed or moved copy keeps it, other weights do not."""
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(f for pattern in ("config.json", "params.json", "*.safetensors", "*.pth")
                       for f in glob.glob(os.path.join(path, pattern)))
    if not files:
        raise FileNotFoundError(f"no base model at {path}")
    h = hashlib.sha256()
    for f in files:
        size = os.path.getsize(f)
        h.update(f"{os.path.basename(f) if len(files) > 1 else ''}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(2**20))
            fh.seek(max(0, size - 2**20))
            h.update(fh.read(2**20))
    return h.hexdigest()[:16]


def memory_state(model: Transformer, unfreeze: str = "") -> dict[str, torch.Tensor]:
    """What a frozen-base run changes, by name: what CoMeT adds to a base model (S5), and what `unfreeze` names."""
    return {n: p.detach() for n, p in model.named_parameters() if trains(model, n, unfreeze)}


def base_header(path: str, model: Transformer) -> dict:
    """What memories trained on the base model at `path` record of it: name, path, fingerprint, and the
    memory settings that shape them."""
    return dict(base=os.path.basename(os.path.normpath(path)), base_path=path, base_fingerprint=fingerprint(path),
                memory_args={k: getattr(model.config, k) for k in MEMORY_SETTINGS})


def save_memories(memories: dict[str, torch.Tensor], path: str, header: dict, settings: dict) -> None:
    """CoMeT's parameters (`memory_state`, or a frozen-base checkpoint's weights) as safetensors (a few MB)
    with `base_header` and the training settings in the file's header; written atomically."""
    meta = dict(format=MEMORIES_FORMAT, base=header["base"], base_path=header["base_path"],
                base_fingerprint=header["base_fingerprint"], settings=json.dumps(settings),
                memory_args=json.dumps(header["memory_args"]))
    tensors = {n: t.float().contiguous().cpu() for n, t in memories.items()}
    write_atomically(path, lambda f: f.write(save(tensors, metadata=meta)), mode=0o644)  # a file to share


def read_memories(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header) of a `save_memories` file; one clear error for anything else. Never runs code."""
    tensors, meta = read_safetensors(path, "memories file")
    if meta.get("format") != MEMORIES_FORMAT:
        raise ValueError(f"{path} is not a nanocomet memories file (format {meta.get('format')!r})")
    try:
        header = {**meta, "settings": json.loads(meta["settings"]), "memory_args": json.loads(meta["memory_args"]),
                  "base": meta["base"], "base_path": meta["base_path"], "base_fingerprint": meta["base_fingerprint"]}
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: damaged header ({type(e).__name__}: {e})") from None
    sizes = header["memory_args"]
    if not isinstance(header["settings"], dict) or not isinstance(sizes, dict) or not set(sizes) <= set(
            MEMORY_SETTINGS) or not all(isinstance(v, (int, float)) for v in sizes.values()) or str(header[
            "settings"].get("unfreeze", "")) not in UNFREEZE:
        raise ValueError(f"{path}: damaged header (settings and memory_args must map names to values, unfreeze be "
                         f"one of {', '.join(map(repr, UNFREEZE))}, memory_args "
                         f"the memory sizes {', '.join(MEMORY_SETTINGS)})")
    return tensors, header


def attach_memories(base: str, tensors: dict, header: dict, source: str, dtype: torch.dtype = torch.float32,
                    device: str = "cpu") -> Transformer:
    """The base model at `base` with the memories `tensors` (from `read_memories` or a frozen-base training
    checkpoint) on top. A different base model is refused: the memories were trained for one."""
    if not os.path.exists(base):
        raise FileNotFoundError(f"{source} needs its base model {header['base']} (fingerprint "
                                f"{header['base_fingerprint']}), not found at {base}: pass --base_path=PATH")
    if fingerprint(base) != header["base_fingerprint"]:
        raise ValueError(f"{source} was trained on {header['base']} (fingerprint {header['base_fingerprint']}), "
                         f"not on {base} (fingerprint {fingerprint(base)}): refusing to load it onto another model")
    model = load_llama(base, dtype, device, **header["memory_args"])
    expected = memory_state(model, header.get("settings", {}).get("unfreeze", ""))  # and what else it trained
    bad = sorted(set(expected) ^ set(tensors)) or [n for n in expected if expected[n].shape != tensors[n].shape]
    if bad:
        raise ValueError(f"{source}: memory tensor {bad[0]} does not match the memory settings it records")
    with torch.no_grad():
        for name, t in tensors.items():
            model.get_parameter(name).copy_(t)
    return model
