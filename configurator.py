"""Script settings, nanoGPT style: defaults are module globals, then config files, then --key=value; and the
rules every script shares for its device: which device, which dtype, how much memory it peaked at.

    python train.py config/NAME.py --batch_size=32 --lr 1e-3 --compile   # a bare --flag sets a bool to True

A config file is Python that assigns some of the settings. Unknown keys and wrong types are errors
(one line, naming the key), so a typo never silently trains the wrong model.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
from collections.abc import Callable
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
            value = type(default)(text)
        except ValueError:
            raise ValueError(f"--{key}={text}: expected {type(default).__name__}") from None
        if not math.isfinite(value):
            raise ValueError(f"--{key}={text}: expected a finite number")
        return value
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
    if isinstance(default, float) and not math.isfinite(value):
        raise ValueError(f"{source}: {key}={value!r} must be a finite number")
    return float(value) if isinstance(default, float) else value


# The range of every number setting that means the same in every script that has it; a script whose setting of the
# same name means something else passes its own rule (`configure(..., rules={**RULES, name: rule})`).
RULES = {
    **dict.fromkeys(("lr", "memory_lr_mult", "batch_size", "batch_threads", "max_iters", "eval_trials", "min_len",
                     "max_len", "digits", "dp", "pp", "pipeline_timeout", "piece", "full_piece", "train_len", "batch",
                     "repeats", "trials", "asks", "length", "segment", "gpu_gib", "context", "time_limit"), "> 0"),
    **dict.fromkeys(("threads", "eval_interval", "ckpt_interval", "weight_decay", "grad_clip", "lm_weight",
                     "bptt_chunks", "loss_chunk", "max_new_tokens", "top_k", "temperature", "block_size", "full_max",
                     "encoder_layers", "contrast_weight", "ppl_tail"), ">= 0"),
    **dict.fromkeys(("warmup", "min_lr", "curriculum", "edge_depths", "far_keys", "depth"), "in [0, 1]"),
    "keep_ratio": "in (0, 1]",
    **dict.fromkeys(("beta1", "beta2"), "in [0, 1)"),
}


def in_range(value: float, rule: str) -> bool:
    """Whether value obeys a rule of RULES: "> 0", ">= 0" or an interval "in [a, b]", "in (a, b]", "in [a, b)"."""
    if rule.startswith(">"):
        return value > 0 if rule == "> 0" else value >= 0
    low, high = (float(x) for x in rule[4:-1].split(", "))
    return (low <= value if rule[3] == "[" else low < value) and (value <= high if rule[-1] == "]" else value < high)


def check_ranges(config: dict, rules: dict[str, str]) -> None:
    """One ValueError naming the first setting outside its range."""
    for key, rule in rules.items():
        if key in config and isinstance(config[key], (int, float)) and not in_range(config[key], rule):
            raise ValueError(f"{key}={config[key]!r} must be {rule}")


def parse_list(key: str, text: str, kind: type = int) -> list:
    """A comma-separated setting (lengths, depths) as a list of `kind`; one line naming the setting otherwise."""
    try:
        values = [kind(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        example = "1024,4096" if kind is int else "0,0.5,1"
        raise ValueError(f"--{key}={text}: expected comma-separated {kind.__name__}s, e.g. --{key}={example}")
    return values


def configure(defaults: dict, argv: list[str], rules: dict[str, str] = RULES) -> dict:
    """defaults (name -> value) updated by config files and --key=value / --key value items of argv.
    Raises ValueError with one clear line on an unknown key, a wrong type, a number out of range or a missing
    file."""
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
    check_ranges(config, rules)
    return config


def settings_of(namespace: dict) -> dict:
    """A script's settings: its public globals of type int, float, bool or str (the block between rulers)."""
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}


def pick_device(name: str) -> str:
    """'auto' -> cuda when available, else cpu; cpu, cuda and cuda:N as given if torch sees that device; anything
    else is one clear ValueError."""
    index = name.removeprefix("cuda:")
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and index.isdigit()):
        raise ValueError(f"device={name!r} must be auto, cpu, cuda or cuda:N")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}, but torch sees no CUDA device here: use --device=cpu (or auto)")
    if name.startswith("cuda:") and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}, but torch sees {torch.cuda.device_count()} CUDA device(s) (cuda:0...)")
    return name


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


def configure_or_exit(defaults: dict, argv: list[str] | None = None, rules: dict[str, str] = RULES) -> dict:
    """`configure`, printing the error as one line and exiting with status 2."""
    try:
        return configure(defaults, sys.argv[1:] if argv is None else argv, rules)
    except ValueError as e:
        sys.exit(f"error: {e}")



# --- outputs: the one rule for every file a script writes ----------------------------------------------------

def _json_file(path: str) -> bool:
    with open(path, "rb") as f:
        json.load(f)
    return True


def _json_lines(path: str) -> bool:
    with open(path, "rb") as f:
        return all(isinstance(json.loads(line), dict) for line in f if line.strip())


def _png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


# what a script may replace (or append to): a file of the kind it writes; (noun, test)
JSON = ("JSON file", _json_file)
JSON_LINES = ("JSON-lines file", _json_lines)
PNG = ("PNG image", _png)


def check_output(path: str, label: str, kind: tuple[str, Callable[[str], bool]]) -> None:
    """Before any long work: one ValueError unless `path` can be written and holds nothing but a file of the kind
    the script writes there (kind: JSON, JSON_LINES, PNG or a script's own (noun, test)), which it may replace or
    append to. label: what the user gave (--json, say). Missing directories are made (as the atomic writes would)."""
    noun, ours = kind
    if os.path.isdir(path):
        raise ValueError(f"{label}: {path} is a directory: give a file name")
    if os.path.exists(path):
        try:
            ok = ours(path)
        except Exception:  # whatever a reader of that kind raises: it is not one
            ok = False
        if not ok:
            raise ValueError(f"{label}: {path} exists and is not a {noun}: refusing to replace it; "
                             "choose another name")
    check_directory(os.path.dirname(os.path.abspath(path)), label)


def check_directory(directory: str, label: str) -> None:
    """One ValueError unless files can be created in `directory` (made if missing)."""
    existing = directory = os.path.abspath(directory)  # "" (the working directory) included
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{label}: {existing} is a file, not a directory: choose another place")
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ValueError(f"{label}: cannot write in {directory} ({e.strerror}): choose another place") from None
