"""The docs point at code that exists: every `module.name` in docs/walkthrough.md imports."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem for p in ROOT.glob("*.py")}
WALKTHROUGH = (ROOT / "docs" / "walkthrough.md").read_text()
# `model.Transformer.layer_step`, `ram.select`, ...: backticked names whose first part is one of our files
NAMES = sorted({m for m in re.findall(r"`([A-Za-z_]\w*(?:\.\w+)+)`", WALKTHROUGH)
                if m.split(".")[0] in MODULES and not m.endswith(".py")})


def test_the_walkthrough_names_the_code_of_every_spec_section():
    assert len(NAMES) >= 40  # the regex found the references (a format change would otherwise pass vacuously)
    for section in ("S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S9"):
        assert f"({section}" in WALKTHROUGH or f"{section})" in WALKTHROUGH or f" {section}" in WALKTHROUGH


@pytest.mark.parametrize("name", NAMES)
def test_every_function_named_in_the_walkthrough_exists(name):
    module, *attrs = name.split(".")
    obj = importlib.import_module(module)
    for attr in attrs:
        assert hasattr(obj, attr), f"docs/walkthrough.md names {name}, but {obj.__name__} has no {attr}"
        obj = getattr(obj, attr)
    assert callable(obj), f"{name} is not a function or class"
