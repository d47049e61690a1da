"""Checkpoints: written atomically, read with weights_only=True, one loader for every script.

A checkpoint is a dict of plain data and tensors: {model, optimizer, model_args, iter_num, config,
rng}, and ram_args for a RAM model (ram.py). Nothing in it needs arbitrary unpickling, so a file that does is refused.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile

import torch

from model import ModelConfig, Transformer
from ram import RAM, RAMConfig

REQUIRED = ("model", "model_args")


def save_checkpoint(ckpt: dict, path: str) -> None:
    """Write to a temporary file in the same directory, then rename over `path`: a crash mid-write
    leaves the previous checkpoint intact."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ckpt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def torch_load(path: str, device: str = "cpu", mmap: bool = False):
    """torch.load(weights_only=True) with one clear error for a damaged file or an unsafe pickle."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged
        raise ValueError(f"cannot read {path}: not a PyTorch checkpoint (corrupt or truncated?)")
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # torch's own message suggests weights_only=False: never do that
        raise ValueError(f"refused to load {path}: it holds objects other than tensors and plain data, "
                         "and loading those could run arbitrary code (weights_only=True)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"cannot read {path} (corrupt or truncated?): {e}") from None


def read_checkpoint(path: str, device: str = "cpu") -> dict:
    """The checkpoint dict, or one clear error: missing file, corrupt file, unsafe pickle, missing keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path} (train one with `python train.py`)")
    ckpt = torch_load(path, device, mmap=device == "cpu")  # tensors are read from the file as they are used
    missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a nanocomet checkpoint: missing {', '.join(missing)}")
    return ckpt


def load_model(path: str, device: str = "cpu", ckpt: dict | None = None) -> tuple[Transformer, dict]:
    """Rebuild the model a checkpoint was trained with and load its weights; returns (model in eval mode, ckpt).
    Built on the meta device and given the checkpoint's (memory-mapped) tensors: one copy, however large."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    args = {}
    try:
        for key, kind in (("model_args", ModelConfig), ("ram_args", RAMConfig)):
            args[key] = kind(**ckpt[key]) if key in ckpt else None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad {key}: {e}") from None
    with torch.device("meta"):
        if args["ram_args"] is None:
            model = Transformer(args["model_args"], verbose=False)
        elif args["model_args"].comet:
            raise ValueError(f"{path}: bad model_args: a RAM checkpoint needs chunk_size=0")
        else:
            model = RAM(args["model_args"], args["ram_args"], verbose=False)
    expected, weights = model.state_dict(), ckpt["model"]
    for name, t in expected.items():
        if name not in weights:
            raise ValueError(f"{path}: tensor {name} is missing from the checkpoint")
        if weights[name].shape != t.shape:
            raise ValueError(f"{path}: tensor {name} has shape {tuple(weights[name].shape)}, "
                             f"but model_args describe {tuple(t.shape)}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ValueError(f"{path}: unexpected tensors {', '.join(extra[:3])} for the model its model_args describe")
    model.load_state_dict(weights, assign=True)
    for net in model.modules():  # the model, or RAM's decoder (and encoder)
        if isinstance(net, Transformer):
            if net.config.tie_embeddings:  # assign gave output.weight a Parameter of its own: one again
                net.output.weight = net.tok_embeddings.weight
            net.build_rope()
    return model.to(device).eval(), ckpt


def open_for_inference(cfg: dict):
    """What eval_passkey.py and sample.py share: device, threads, the model and its tokenizer. The model is
    cfg["ckpt"] (trained here), or a Llama checkpoint directory cfg["init_from"] (llama.py) with new,
    untrained memories if cfg["chunk_size"] > 0. Returns (model, tokenizer, training settings, device);
    one clear error (ValueError/OSError) else."""
    from configurator import pick_device
    from data import get_tokenizer
    from llama import load_llama

    dev = pick_device(cfg["device"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg.get("init_from"):
        bf16 = dev.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = {"auto": torch.bfloat16 if bf16 else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg["dtype"])
        if dtype is None:
            raise ValueError(f"dtype={cfg['dtype']!r} must be auto, float32 or bfloat16")
        model = load_llama(cfg["init_from"], dtype, dev, chunk_size=cfg["chunk_size"])
        name = cfg["init_from"] if cfg["tokenizer"] == "auto" else cfg["tokenizer"]
        return model, get_tokenizer(name), {}, dev
    model, ckpt = load_model(cfg["ckpt"], dev)
    train = ckpt.get("config", {})
    return model, get_tokenizer(train.get("tokenizer", "bytes")), train, dev


def set_block_size(model, block_size: int) -> None:
    """Let a plain decoder (or RAM's) read up to block_size positions, e.g. to test it beyond its training
    length: RoPE has no weights, only a longer table; the positions beyond training were never seen."""
    for net in model.modules():
        if isinstance(net, Transformer):
            net.config.block_size = block_size
            net.build_rope(net.tok_embeddings.weight.device)


def check_fits(model, n_tokens: int, rows: int | None = None) -> None:
    """A plain decoder (chunk_size=0; RAM's too) cannot read past its block_size; CoMeT streams any length.
    rows: what the decoder reads for n_tokens of input (RAM and truncate read fewer)."""
    cfg, rows = model.config, n_tokens if rows is None else rows
    if not cfg.comet and rows > cfg.block_size:
        raise ValueError(f"this checkpoint is a plain decoder (chunk_size=0): {n_tokens:,} tokens need {rows:,} "
                         f"positions, more than its block_size={cfg.block_size:,}; --block_size={rows} lets it "
                         "try (positions beyond its training length were never trained)")
