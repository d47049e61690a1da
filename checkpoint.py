"""Checkpoints: written atomically, read with weights_only=True, one loader for every script.

A training checkpoint (ckpt.pt) is a dict of plain data and tensors: {model, optimizer, model_args, iter_num,
config, rng}, and ram_args for a RAM model (ram/ram.py builds those with `load_weights` below). Nothing in it
needs arbitrary unpickling, so a file that does is refused. A sharded run (FSDP2, train.py --dp) gathers its
weights and AdamW states into that one file, or with ckpt_shards=True leaves them in a directory of shards beside
it (torch.distributed.checkpoint, each rank writing its own), which the file names. A model file
(`save_model`, e.g. models/default.safetensors) is a model's weights alone, safetensors, with the settings that
trained it.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from typing import BinaryIO

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     get_state_dict, set_optimizer_state_dict, set_state_dict)
from torch.distributed.tensor import DTensor

from configurator import check_directory, configure_or_exit, type_ok
from model import ModelConfig, Transformer

REQUIRED = ("model", "model_args")
MODEL_FORMAT = "nanocomet-model/1"


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


def append_line(path: str, line: str) -> None:
    """One line added to a text file (bench.py's results), atomically: the file is whole before and after."""
    old = open(path, "rb").read() if os.path.exists(path) else b""
    write_atomically(path, lambda f: f.write(old + line.encode() + b"\n"), mode=0o644)


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


def safetensors_format(path: str) -> str:
    """The format a safetensors file of ours names in its header ("" for any other file)."""
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("format", "")
    except (SafetensorError, OSError, ValueError):
        return ""


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


def save_model(path: str, model: Transformer, settings: dict) -> None:
    """A model's weights alone as safetensors (tied embeddings once), with its config and the settings that trained
    it in the header; readable by everyone (a file to share), written atomically."""
    tensors = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()
               if not (model.config.tie_embeddings and n == "output.weight")}
    meta = dict(format=MODEL_FORMAT, model_args=json.dumps(dataclasses.asdict(model.config)),
                settings=json.dumps(settings))
    write_atomically(path, lambda f: f.write(save(tensors, metadata=meta)), mode=0o644)


def read_model_file(path: str) -> dict:
    """A `save_model` file as a checkpoint dict (model, model_args, config); one clear error for anything else."""
    tensors, meta = read_safetensors(path, "model file")
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a nanocomet model file (format {meta.get('format')!r})")
    try:
        args, settings = json.loads(meta["model_args"]), json.loads(meta["settings"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: damaged header ({type(e).__name__}: {e})") from None
    if args.get("tie_embeddings") and "tok_embeddings.weight" in tensors:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    return dict(model=tensors, model_args=args, config=settings)


def load_model(path: str, device: str = "cpu", ckpt: dict | None = None) -> tuple[Transformer, dict]:
    """Rebuild the model a checkpoint (or a `save_model` file) was trained with and load its weights; returns
    (model in eval mode, ckpt). Built on the meta device and given the file's (memory-mapped) tensors: one copy."""
    ckpt = ckpt if ckpt is not None else read_model_file(path) if path.endswith(".safetensors") else \
        read_checkpoint(path)
    if "base" in ckpt:
        raise ValueError(f"{path} holds only memories trained on a frozen {ckpt['base']['base']}: open it with "
                         "sample.py or eval_passkey.py (llama.attach_memories)")
    if "ram_args" in ckpt:
        raise ValueError(f"{path} is a RAM checkpoint: evaluate it with python -m ram.eval_ram")
    try:
        cfg = ModelConfig(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad model_args: {e}") from None
    with torch.device("meta"):
        model = Transformer(cfg)
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


# --- training checkpoints: everything a run needs to resume exactly -------------------------------------

def save_training(path: str, model, optimizer, state: dict, shards: bool, trained_only: bool, master: bool,
                  kept: list[str]) -> tuple[dict, list[str]]:
    """The model, the optimizer and `state` (iter_num, config, rng, ...) to resume a run exactly, written atomically
    by the master. Sharded (dp > 1): every rank calls it; the weights and AdamW states are gathered whole into the
    file, or with `shards` every rank writes its own pieces into a directory beside it (ckpt-<iter>.dcp), which the
    file names. trained_only (a frozen pretrained base): the trained parameters alone. kept: the directories of
    shards this run wrote or resumed from, the one its last checkpoint names last; all but the newest two go (a
    reader may still have the previous one open), and no other. Returns (the weights written, the directories kept)."""
    out, name = os.path.dirname(path), f"ckpt-{state['iter_num']:08d}.dcp" if shards else None
    if name:  # a directory per iteration: the file names the last complete one (a crash keeps the previous)
        weights, opt, by_name = {}, dict(param_groups=save_shards(model, optimizer, os.path.join(out, name))), True
    else:
        weights, opt, by_name = state_dicts(model, optimizer, trained_only)
    if not master:
        return weights, kept
    save_checkpoint(dict(model=weights, optimizer=opt, optimizer_by_name=by_name,
                         model_args=dataclasses.asdict(model.config), shards=name, **state), path)
    kept = [*(k for k in kept if k != name), name] if name else kept
    for old in kept[:-2]:
        shutil.rmtree(os.path.join(out, old), ignore_errors=True)
    return weights, kept[-2:]


def load_training(path: str, model, optimizer, ckpt: dict) -> None:
    """A training checkpoint's optimizer state (and, if sharded, its weights: each rank reads the pieces of its own
    shards) into this process's model and optimizer, and torch's random state."""
    if ckpt.get("shards"):
        load_shards(model, optimizer, shards_dir(path, ckpt), ckpt["optimizer"]["param_groups"])
    else:
        load_optimizer(model, optimizer, ckpt["optimizer"], ckpt.get("optimizer_by_name", False))
    torch.set_rng_state(ckpt["rng"]["torch"])


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
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, OSError) as e:
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


# --- a training run's settings: new, or those of the run it resumes ----------------------------------------

# what a checkpoint saved before a setting existed was trained with; settings that were renamed
PREDATED = {"edge_depths": 0.1, "batch_threads": 1, "chunk_align": "left"}
RENAMED = {"base": "base_path"}


def resume_settings(ckpt: dict, out: str, defaults: dict, frozen: tuple) -> dict:
    """The checkpoint's settings, then this command line's; `frozen` (what shapes the model and its data) cannot
    change. A run of RAM's entry point (python -m ram.train_ram) resumes only there."""
    kinds = dict(optimizer=dict, iter_num=int, config=dict, rng=dict)
    wrong = [f"{k} ({kind.__name__})" for k, kind in kinds.items() if not isinstance(ckpt.get(k), kind)]
    if wrong or not isinstance(ckpt["rng"].get("torch"), torch.Tensor):
        raise ValueError(f"it is not a training checkpoint (missing or damaged: {', '.join(wrong) or 'rng'})")
    saved = {"method": "comet", "task": "passkey", **{RENAMED.get(k, k): v for k, v in ckpt["config"].items()}}
    if "method" not in defaults and (saved["method"], saved["task"]) != ("comet", "passkey"):
        raise ValueError(f"it trained {saved['method']} on the {saved['task']} task: resume it with "
                         "python -m ram.train_ram --init_from=resume")
    damaged = [f"{k}={v!r}" for k, v in saved.items() if k in defaults and not type_ok(v, type(defaults[k]))]
    if damaged:
        raise ValueError(f"its settings are damaged ({', '.join(damaged[:3])})")
    config = configure_or_exit({**defaults, **PREDATED, **{k: v for k, v in saved.items() if k in defaults}})
    changed = [k for k in frozen if config[k] != saved.get(k, defaults[k])]
    if changed:
        was = ", ".join(f"{k}={saved.get(k, defaults[k])!r}" for k in changed)
        raise ValueError(f"{', '.join(changed)} cannot change when resuming (the weights were trained with {was})")
    return {**config, "out_dir": out}  # it lives where it was found, wherever it was first written


RUN_FILES = ("ckpt.pt", "log.jsonl", "memories.safetensors")  # and ckpt-<iteration>.dcp directories


def read_run(defaults: dict, frozen: tuple) -> tuple[dict, dict | None]:
    """A training run's settings (defaults, config files, command line; a resumed run's own) and the checkpoint it
    resumes (init_from=resume: out_dir/ckpt.pt), if any. A new run never writes over another run's files: one into a
    used out_dir is an error."""
    config = configure_or_exit(defaults)
    path, ckpt = os.path.join(config["out_dir"], "ckpt.pt"), None
    if config["init_from"] == "resume":
        try:
            ckpt = read_checkpoint(path)
            config = resume_settings(ckpt, config["out_dir"], defaults, frozen)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot resume: {e}")
    elif os.path.exists(path):
        raise SystemExit(f"error: {path} exists: continue it with --init_from=resume, or train into another "
                         "--out_dir, or delete it first")
    else:
        try:
            check_directory(config["out_dir"], "--out_dir")
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        used = sorted(p for p in os.listdir(config["out_dir"]) if p in RUN_FILES or p.startswith("ckpt-"))
        if used:
            raise SystemExit(f"error: {config['out_dir']} holds another run's {', '.join(used)}: train into another "
                             "--out_dir, or move them away first")
    return config, ckpt
