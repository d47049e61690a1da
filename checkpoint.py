"""Checkpoints: written atomically, read with weights_only=True, one loader for every script.

A checkpoint is a dict of plain data and tensors: {model, optimizer, model_args, iter_num, config,
rng}. Nothing in it needs arbitrary unpickling, so a file that does is refused.
"""
from __future__ import annotations

import os
import pickle
import tempfile

import torch

from model import ModelConfig, Transformer

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


def read_checkpoint(path: str, device: str = "cpu") -> dict:
    """The checkpoint dict, or one clear error: missing file, corrupt file, unsafe pickle, missing keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one with `python train.py` or pass --ckpt=PATH")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"refused to load {path}: it holds objects other than tensors and plain data "
                         f"(weights_only=True): {first}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"cannot read checkpoint {path} (corrupt or truncated?): {e}") from None
    missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a nanocomet checkpoint: missing {', '.join(missing)}")
    return ckpt


def load_model(path: str, device: str = "cpu") -> tuple[Transformer, dict]:
    """Rebuild the model a checkpoint was trained with and load its weights; returns (model in eval mode, ckpt)."""
    ckpt = read_checkpoint(path, device)
    try:
        model = Transformer(ModelConfig(**ckpt["model_args"]), verbose=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad model_args: {e}") from None
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
    model.load_state_dict(weights)
    return model.to(device).eval(), ckpt
