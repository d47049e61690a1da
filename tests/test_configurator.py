"""Settings: config files and --key=value overrides, with one clear error for a mistake."""
import importlib
import os
import re
from pathlib import Path

import pytest
import torch

from configurator import (JSON, JSON_LINES, PNG, RULES, check_directory, check_output, configure, parse_list,
                          pick_device, pick_dtype, settings_of, type_ok)

DEFAULTS = dict(batch_size=16, lr=1e-3, compile=False, out_dir="out", lengths="512,2048")


def test_overrides_are_parsed_by_the_type_of_the_default():
    cfg = configure(DEFAULTS, ["--batch_size=32", "--lr=3e-4", "--compile=True", "--out_dir=runs/a"])
    assert cfg == dict(batch_size=32, lr=3e-4, compile=True, out_dir="runs/a", lengths="512,2048")


def test_space_separated_values_work_too():
    cfg = configure(DEFAULTS, ["--lengths", "1024,65536,1048576", "--batch_size", "8"])
    assert cfg["lengths"] == "1024,65536,1048576" and cfg["batch_size"] == 8


def test_a_bare_flag_sets_a_bool_to_true_and_takes_no_value():
    assert configure(DEFAULTS, ["--compile", "--batch_size", "8"])["compile"] is True
    assert configure(DEFAULTS, ["--batch_size", "8", "--compile"])["compile"] is True
    assert configure(DEFAULTS, ["--compile", "false"])["compile"] is False  # a value still counts
    with pytest.raises(ValueError, match="--lr: missing value"):  # only bools may go without a value
        configure(DEFAULTS, ["--compile", "--lr"])


def test_an_int_is_accepted_for_a_float_setting():
    assert configure(DEFAULTS, ["--lr=1"])["lr"] == 1.0


def test_config_file_then_command_line(tmp_path):
    f = tmp_path / "small.py"
    f.write_text("import math\nbatch_size = 4\nlr = 2e-3  # comment\n_private = 1\n")
    cfg = configure(DEFAULTS, [str(f), "--batch_size=8"])
    assert cfg["batch_size"] == 8 and cfg["lr"] == 2e-3


@pytest.mark.parametrize("argv, message", [
    (["--batchsize=32"], "unknown setting 'batchsize'"),
    (["--batch_size=3.5"], "--batch_size=3.5: expected int"),
    (["--lr=fast"], "--lr=fast: expected float"),
    (["--compile=maybe"], "expected True or False"),
    (["--lr"], "--lr: missing value"),
    (["no_such_file.py"], "cannot read config file no_such_file.py"),
])
def test_command_line_mistakes_are_one_clear_error(argv, message):
    with pytest.raises(ValueError, match=message):
        configure(DEFAULTS, argv)


@pytest.mark.parametrize("line, message", [
    ("batch_sise = 4", "unknown setting 'batch_sise'"),
    ("batch_size = '4'", "batch_size='4' must be int, not str"),
    ("compile = 1", "compile=1 must be bool, not int"),
    ("batch_size = True", "batch_size=True must be int, not bool"),
])
def test_config_file_mistakes_name_the_file_and_the_key(tmp_path, line, message):
    f = tmp_path / "bad.py"
    f.write_text(line + "\n")
    with pytest.raises(ValueError, match=f"bad.py: {message}"):
        configure(DEFAULTS, [str(f)])


def test_an_error_inside_a_config_file_is_one_clear_error(tmp_path):
    f = tmp_path / "typo.py"
    f.write_text("batch_size = sixteen\n")
    with pytest.raises(ValueError, match="typo.py: NameError: name 'sixteen' is not defined"):
        configure(DEFAULTS, [str(f)])


def test_a_bad_override_exits_with_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "train.py", "--n_layers=3", f"--out_dir={tmp_path}"], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # exactly one line, no traceback
    assert "unknown setting 'n_layers'" in r.stderr


def test_dtype_auto_is_bfloat16_only_on_a_cuda_device_that_has_it(monkeypatch):
    assert pick_dtype("auto", "cpu") == torch.float32 and pick_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype("auto", "cuda:1") == torch.bfloat16 and pick_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype("auto", "cuda") == torch.float32 and pick_dtype("float32", "cuda") == torch.float32


@pytest.mark.parametrize("rule, call, message", [
    ("dtype", lambda: pick_dtype("float16", "cpu"), "dtype='float16' must be auto, float32 or bfloat16"),
    ("device", lambda: pick_device("gpu"), "device='gpu' must be auto, cpu, cuda")])
def test_an_unknown_dtype_or_device_is_one_clear_error(rule, call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        call()


def test_the_type_rule_takes_an_int_for_a_float_and_never_a_bool_for_a_number():
    assert type_ok(3, float) and type_ok(3.0, float) and type_ok(3, int) and type_ok(True, bool)
    assert not type_ok(True, int) and not type_ok(False, float) and not type_ok(3.0, int) and not type_ok(1, bool)


# --- every script's numbers, and every file a script writes ----------------------------------------------------

SCRIPTS = ("train", "sample", "eval_passkey", "bench", "inspection", "ram.needle", "ram.train_ram", "scripts.plan",
           "scripts.gpu_check", "ram.eval_ram")


def outside(rule: str, default):
    """A value that breaks the rule, of the setting's type."""
    value = {"> 0": 0, ">= 0": -1}.get(rule, 1.5 if rule.endswith(")") or rule.startswith("in [") else 0)
    return type(default)(value if rule != "in [0, 1)" else 1)


def test_every_scripts_numbers_are_checked_against_their_range_and_finiteness_naming_the_setting():
    checked = set()
    for name in SCRIPTS:
        module = importlib.import_module(name)
        defaults = getattr(module, "DEFAULTS", None) or getattr(module, "SETTINGS", None) or settings_of(vars(module))
        rules = getattr(module, "RULES", RULES)  # a script whose setting means something else has its own rule
        configure(defaults, [], rules)  # every default obeys its rule
        for key in set(defaults) & set(rules):
            bad = outside(rules[key], defaults[key])
            with pytest.raises(ValueError, match=f"^{key}={bad!r} must be {re.escape(rules[key])}$"):
                configure(defaults, [f"--{key}={bad}"], rules)
            checked.add(key)
        for key in (k for k, v in defaults.items() if type(v) is float):
            with pytest.raises(ValueError, match=f"--{key}=nan: expected a finite number"):
                configure(defaults, [f"--{key}=nan"])
    assert {"lr", "beta2", "grad_clip", "memory_lr_mult", "temperature", "digits", "threads", "gpu_gib"} <= checked


def test_a_list_setting_that_does_not_parse_names_the_setting_and_an_example():
    assert parse_list("depths", "0,0.5,1", float) == [0, 0.5, 1]
    for text in ("150,,300", "1e3x", ""):
        with pytest.raises(ValueError, match=r"^--lengths=.*: expected comma-separated ints, e.g. --lengths=1024"):
            parse_list("lengths", text)


def test_a_cuda_device_is_refused_in_one_line_where_torch_sees_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"device='{name}', but torch sees no CUDA device here: use --device=cpu"):
            pick_device(name)
    assert pick_device("auto") == "cpu"


@pytest.mark.parametrize("kind, ours", [(JSON, b'{"cells": []}'), (JSON_LINES, b'{"a": 1}\n{"b": 2}\n'),
                                        (PNG, b"\x89PNG\r\n\x1a\n....")])
def test_an_output_replaces_only_a_file_of_its_own_kind(tmp_path, kind, ours):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.write_bytes(ours)
    theirs.write_bytes(b"PK\x03\x04 somebody's checkpoint")
    check_output(str(mine), "--json", kind)
    with pytest.raises(ValueError, match=f"^--json: {theirs} exists and is not a {kind[0]}: refusing to replace it"):
        check_output(str(theirs), "--json", kind)
    assert theirs.read_bytes() == b"PK\x03\x04 somebody's checkpoint"


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    for path, says in [(tmp_path, "is a directory"), (tmp_path / "file" / "r.json", "is a file, not a directory"),
                       (Path("/proc/nanocomet/r.json"), "cannot write in /proc/nanocomet")]:
        with pytest.raises(ValueError, match=says):
            check_output(str(path), "--json", JSON)
    check_output(str(tmp_path / "new" / "r.json"), "--json", JSON)  # a missing directory is made
    monkeypatch.chdir(tmp_path)
    check_directory("", "--out_dir")  # the working directory
    check_directory(os.path.join("runs", "a"), "--out_dir")  # relative, missing: made
    assert (tmp_path / "runs" / "a").is_dir()
