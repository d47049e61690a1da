"""Script settings, nanoGPT style: defaults are module globals, then config files, then --key=value; and the
rules every script shares for its device: which device, which dtype, how much memory it peaked at.

    python train.py config/NAME.py --batch_size=32 --lr 1e-3 --compile   # a bare --flag sets a bool to True

A config file is Python that assigns some of the settings. Unknown keys and wrong types are errors
(one line, naming the key), so a typo never silently trains the wrong model.
"""
from __future__ import annotations

import resource
import sys
from dataclasses import fields

import torch

BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse(key: str, text: str, default):
    """Parse a command-line value by the type of the setting's default."""
    if isinstance(default, bool):
        if text.lower() in BOOL_WORDS:
            return BOOL_WORDS[text.lower()]
        raise ValueError(f"--{key}={text}: expected True or False")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise ValueError(f"--{key}={text}: expected {type(default).__name__}") from None
    return text  # str settings (lists are comma-separated strings)


def _known(key: str, defaults: dict, source: str) -> None:
    if key not in defaults:
        raise ValueError(f"{source}: unknown setting {key!r} (known: {', '.join(sorted(defaults))})")


def type_ok(value, kind: type) -> bool:
    """The one type rule for settings and config dataclasses: a bool is not a number, an int is fine
    for a float."""
    if kind is bool:
        return isinstance(value, bool)
    if kind in (int, float):
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_types(cfg) -> None:
    """One clear TypeError for a dataclass field of the wrong type (`n_layer='4'`, `chunk_size=64.0`).
    Fields are annotated as strings (`from __future__ import annotations`): "int", "float | None", ..."""
    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    for f in fields(cfg):
        v, kind = getattr(cfg, f.name), str(f.type)
        base = kind.removesuffix(" | None")
        if not ((v is None and base != kind) or type_ok(v, kinds[base])):
            raise TypeError(f"{type(cfg).__name__}: {f.name} must be {kind}, got {v!r} ({type(v).__name__})")


def _check(key: str, value, defaults: dict, source: str):
    """The value of a config-file assignment, if the setting exists and the type matches its default."""
    _known(key, defaults, source)
    default = defaults[key]
    if not type_ok(value, type(default)):
        raise ValueError(f"{source}: {key}={value!r} must be {type(default).__name__}, not {type(value).__name__}")
    return float(value) if isinstance(default, float) else value


def configure(defaults: dict, argv: list[str]) -> dict:
    """defaults (name -> value) updated by config files and --key=value / --key value items of argv.
    Raises ValueError with one clear line on an unknown key, a wrong type or a missing file."""
    config, args = dict(defaults), list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            try:
                with open(arg) as f:
                    code = f.read()
            except OSError as e:
                raise ValueError(f"cannot read config file {arg}: {e.strerror}") from None
            scope: dict = {}
            try:
                exec(compile(code, arg, "exec"), scope)
            except Exception as e:  # a typo in a config file is a user error, not a crash
                raise ValueError(f"{arg}: {type(e).__name__}: {e}") from None
            for key, value in scope.items():
                if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                    config[key] = _check(key, value, defaults, arg)
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq and isinstance(defaults.get(key), bool) and (not args or args[0].lower() not in BOOL_WORDS):
            eq, text = "=", "true"  # a bare --flag
        if not eq:
            if not args:
                raise ValueError(f"--{key}: missing value")
            text = args.pop(0)
        _known(key, defaults, f"--{key}")
        config[key] = _parse(key, text, defaults[key])
    return config


def settings_of(namespace: dict) -> dict:
    """A script's settings: its public globals of type int, float, bool or str (the block between rulers)."""
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}


def pick_device(name: str) -> str:
    """'auto' -> cuda when available, else cpu; cpu, cuda and cuda:N as given; anything else is one clear
    ValueError."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device={name!r} must be auto, cpu or cuda")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pick_dtype(name: str, device: str) -> torch.dtype:
    """The one rule for dtype='auto': bfloat16 on a CUDA device that supports it, else float32.
    Anything but auto, float32 or bfloat16 is one clear ValueError."""
    if name == "auto":
        cuda = torch.device(device).type == "cuda"  # device may be cuda:N (a pipeline rank)
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} must be auto, float32 or bfloat16")
    return DTYPES[name]


def reset_peak_memory(device: str) -> float:
    """Start a new window for `peak_memory_mib`; returns the memory in use now (MiB)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: the peak resident set (VmHWM) starts again from the current one
    return peak_memory_mib(device)


def peak_memory_mib(device: str) -> float:
    """The most memory this process held (MiB) since it started or since `reset_peak_memory`: on a GPU what CUDA's
    allocator held; on a CPU the peak resident set (Linux's VmHWM; elsewhere getrusage's, since the start)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def configure_or_exit(defaults: dict, argv: list[str] | None = None) -> dict:
    """`configure`, printing the error as one line and exiting with status 2."""
    try:
        return configure(defaults, sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
