"""Checkpoints: written atomically, read with weights_only=True, one loader for every script.

A checkpoint is a dict of plain data and tensors: {model, optimizer, model_args, iter_num, config,
rng}, and ram_args for a RAM model (ram.py builds those with `load_weights` below). Nothing in it needs
arbitrary unpickling, so a file that does is refused.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from typing import BinaryIO

import torch

from model import ModelConfig, Transformer

REQUIRED = ("model", "model_args")


def write_atomically(path: str, write: Callable[[BinaryIO], None], mode: int = 0o600) -> None:
    """write(f) into a temporary file beside `path`, flushed to disk, then renamed over `path`: a crash
    mid-write leaves the previous file intact. mode: its permissions (private by default; 0o644 to share)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_checkpoint(ckpt: dict, path: str) -> None:
    """torch.save, written atomically: a crash mid-write leaves the previous checkpoint intact."""
    write_atomically(path, lambda f: torch.save(ckpt, f))


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
    if "base" in ckpt:
        raise ValueError(f"{path} holds only memories trained on a frozen {ckpt['base']['base']}: open it with "
                         "sample.py or eval_passkey.py (llama.attach_memories)")
    if "ram_args" in ckpt:
        raise ValueError(f"{path} is a RAM checkpoint: load it with ram.load_ram")
    try:
        cfg = ModelConfig(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad model_args: {e}") from None
    with torch.device("meta"):
        model = Transformer(cfg, verbose=False)
    return load_weights(model, ckpt["model"], path).to(device).eval(), ckpt


def load_weights(model: torch.nn.Module, weights: dict, path: str) -> torch.nn.Module:
    """Give a model built on the meta device the checkpoint's tensors (assigned, not copied), after checking
    that the names and shapes are exactly the model's; one clear error naming the tensor otherwise."""
    expected = model.state_dict()
    for name, t in expected.items():
        if name not in weights:
            raise ValueError(f"{path}: tensor {name} is missing from the checkpoint")
        if weights[name].shape != t.shape:
            raise ValueError(f"{path}: tensor {name} has shape {tuple(weights[name].shape)}, "
                             f"but model_args describe {tuple(t.shape)}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ValueError(f"{path}: unexpected tensors {', '.join(extra[:3])} for the model its model_args describe")
    # a bf16 frozen base (train.py) is saved as bf16: read, the model is one dtype again, as it was built
    model.load_state_dict({k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in weights.items()},
                          assign=True)
    for net in model.modules():  # the model, or RAM's decoder (and encoder)
        if isinstance(net, Transformer):
            if net.config.tie_embeddings:  # assign gave output.weight a Parameter of its own: one again
                net.output.weight = net.tok_embeddings.weight
            net.build_rope()
    return model
