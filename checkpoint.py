"""Checkpoints: written atomically, read with weights_only=True, one loader for every script.

A checkpoint is a dict of plain data and tensors: {model, optimizer, model_args, iter_num, config,
rng}, and ram_args for a RAM model (ram.py builds those with `load_weights` below). Nothing in it needs
arbitrary unpickling, so a file that does is refused. A sharded run (FSDP2, train.py --dp) gathers its
weights and AdamW states into that one file, or with ckpt_shards=True leaves them in a directory of
shards beside it (torch.distributed.checkpoint, each rank writing its own), which the file names.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from typing import BinaryIO

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     get_state_dict, set_optimizer_state_dict, set_state_dict)
from torch.distributed.tensor import DTensor

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


def read_safetensors(path: str, noun: str, hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file we wrote (a `noun`: memories file, state file); one
    clear error for a missing (hint: how to make one) or damaged file. Never runs code: a JSON header, raw bytes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {noun} at {path}{hint}")
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {noun} {path} (corrupt or truncated?): {e}") from None


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
    if ckpt.get("shards") and not os.path.isfile(os.path.join(shards_dir(path, ckpt), ".metadata")):
        raise FileNotFoundError(f"{path} keeps its weights in {ckpt['shards']} beside it, which is missing or "
                                "incomplete: copy the directory along with the file")
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
    if ckpt.get("shards"):  # ckpt_shards=True: the weights are in the directory of shards the file names
        model.to_empty(device="cpu")
        directory = shards_dir(path, ckpt)
        _saved_tensors(directory)  # nothing in them may run code
        _dcp(dcp.load, {"model": model.state_dict()}, directory)  # one process reads every shard, in place
        return _tie_and_rope(model).to(device).eval(), ckpt
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
    return _tie_and_rope(model)


def _tie_and_rope(model: torch.nn.Module) -> torch.nn.Module:
    """After the weights were assigned or loaded in place: tied embeddings one tensor, RoPE tables built."""
    for net in model.modules():  # the model, or RAM's decoder (and encoder)
        if isinstance(net, Transformer):
            if net.config.tie_embeddings:  # assign gave output.weight a Parameter of its own: one again
                net.output.weight = net.tok_embeddings.weight
            net.build_rope()
    return model


# --- sharded runs (FSDP2, train.py --dp): gathered into one file, or a directory of shards ---------------

def _sharded(optimizer) -> bool:
    """Whether the optimizer holds FSDP2's sharded parameters (`Pipeline.shard`, dp > 1)."""
    return any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])


def state_dicts(model: Transformer, optimizer, trained_only: bool = False) -> tuple[dict, dict, bool]:
    """(model, optimizer) state dicts for a checkpoint, and whether the optimizer's is keyed by parameter name.
    Sharded: gathered whole onto the CPU (every rank must call it; rank 0 gets the tensors), keyed by name
    (`load_optimizer` reads it back on any layout); else as the model and optimizer give them.
    trained_only (a frozen pretrained base): the trained parameters alone, the frozen ones never gathered."""
    sharded = _sharded(optimizer)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if trained_only:  # every rank gathers them in the same order (a collective over dp)
        weights = {n: (p.full_tensor() if isinstance(p, DTensor) else p.detach()).cpu()
                   for n, p in model.named_parameters() if p.requires_grad}
    else:
        weights = get_model_state_dict(model, options=opts) if sharded else model.state_dict()
    opt = get_optimizer_state_dict(model, optimizer, options=opts) if sharded else optimizer.state_dict()
    return weights, opt, sharded


def load_optimizer(model: Transformer, optimizer, state: dict, by_name: bool) -> None:
    """A checkpoint's optimizer state into this process's optimizer, sharded or not: keyed by parameter name
    (`state_dicts` of a sharded run), or by position (`optimizer.state_dict()`; a sharded optimizer gets it
    renamed: the same settings build the same groups in the same order)."""
    sharded = _sharded(optimizer)
    if not by_name and not sharded:
        return optimizer.load_state_dict(state)
    if not by_name:
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        state = dict(state=state["state"] and {order[i]: v for i, v in state["state"].items()},
                     param_groups=[{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]])
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _dcp(save_or_load, state: dict, directory: str) -> None:
    """dcp.save or dcp.load: every rank its own pieces; in one process (no process group) every piece, as
    intended here (torch warns that it assumes so)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            save_or_load(state, checkpoint_id=directory)
        except CheckpointException as e:  # raised alike on every rank, with each failed rank's error
            rank, cause = next(iter(e.failures.items()))
            cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, traceback)
            raise ValueError(f"cannot {save_or_load.__name__} the shards in {directory} (corrupt or truncated?): "
                             f"rank {rank}: {type(cause).__name__} {str(cause)[:200]}") from None


class _MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint pickles its .metadata: here only its own records, dtypes and sizes load."""

    def find_class(self, module: str, name: str):
        allowed = (module.startswith("torch.distributed.checkpoint.") or (module, name) in _PLAIN
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        found = super().find_class(module, name) if allowed else None
        if found is None or (module.startswith("torch.distributed.") and not (
                dataclasses.is_dataclass(found) or isinstance(found, type) and issubclass(found, enum.Enum))):
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's metadata")
        return found


_PLAIN = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
          ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}


def _saved_tensors(directory: str) -> set[str]:
    """The names of the tensors in a directory of shards, read without running code: its metadata through an
    allow-list, and only tensors in it (anything else dcp.load would unpickle freely)."""
    try:
        with open(os.path.join(directory, ".metadata"), "rb") as f:
            items = _MetadataUnpickler(f).load().state_dict_metadata
    except (pickle.UnpicklingError, EOFError, AttributeError, OSError) as e:
        raise ValueError(f"refused to load the shards in {directory}: damaged or unsafe metadata ({e})") from None
    if not all(isinstance(v, TensorStorageMetadata) for v in items.values()):
        raise ValueError(f"refused to load the shards in {directory}: they hold objects other than tensors")
    return set(items)


def shards_dir(path: str, ckpt: dict) -> str:
    """The directory of shards a checkpoint file names (ckpt_shards=True), beside the file."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), ckpt["shards"])


def save_shards(model: Transformer, optimizer, directory: str) -> list[dict]:
    """Every rank writes its own shards of the weights and AdamW states into `directory`
    (torch.distributed.checkpoint; replicas, e.g. across pipeline ranks, are written once). Every rank
    must call it; `load_shards` reads it back on any layout, one process included. Returns the optimizer's
    param_groups (plain data, by parameter name), which the checkpoint file keeps: the shards hold tensors only."""
    weights, opt = get_state_dict(model, optimizer)
    _dcp(dcp.save, {"model": weights, "optimizer": opt["state"]}, directory)
    return opt["param_groups"]


def load_shards(model: Transformer, optimizer, directory: str, param_groups: list[dict]) -> None:
    """`save_shards`' weights and AdamW states into this process's model and optimizer, each rank reading
    only the pieces its shards need, whatever the layout that wrote them. A parameter that had no AdamW
    state when saved (no gradient yet) has none after loading either."""
    saved = _saved_tensors(directory)
    weights, opt = get_state_dict(model, optimizer)  # a new optimizer: torch gives every parameter a state
    state = {"model": weights, "optimizer": {n: v for n, v in opt["state"].items() if f"optimizer.{n}.step" in saved}}
    _dcp(dcp.load, state, directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"],  # every weight: dcp.load is strict
                   optim_state_dict=dict(state=state["optimizer"], param_groups=param_groups),
                   options=StateDictOptions(strict=False))  # (strict about the optimizer: no state-less params)
