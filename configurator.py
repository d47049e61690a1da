"""Script settings, nanoGPT style: defaults are module globals, then config files, then --key=value.

    python train.py config/NAME.py --batch_size=32 --lr 1e-3 --compile   # a bare --flag sets a bool to True

A config file is Python that assigns some of the settings. Unknown keys and wrong types are errors
(one line, naming the key), so a typo never silently trains the wrong model.
"""
from __future__ import annotations

import sys


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


def _check(key: str, value, defaults: dict, source: str):
    """The value of a config-file assignment, if the setting exists and the type matches its default."""
    _known(key, defaults, source)
    default = defaults[key]
    ok = (isinstance(value, bool) if isinstance(default, bool) else
          isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float) else
          isinstance(value, type(default)) and not isinstance(value, bool) if isinstance(default, int) else
          isinstance(value, type(default)))
    if not ok:
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
    """'auto' -> cuda when available, else cpu; anything else as given."""
    import torch
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def configure_or_exit(defaults: dict, argv: list[str] | None = None) -> dict:
    """`configure`, printing the error as one line and exiting with status 2."""
    try:
        return configure(defaults, sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
