"""The docs point at code that exists: every `module.name` in docs/walkthrough.md imports, and every SPEC
section has its paragraph there, naming the code that implements it."""
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem for p in ROOT.glob("*.py")}
WALKTHROUGH = (ROOT / "docs" / "walkthrough.md").read_text()
# `model.Transformer.layer_step`, `ram.select`, ...: backticked names whose first part is one of our files
NAME = r"`([A-Za-z_]\w*(?:\.\w+)+)`"
NAMES = sorted({m for m in re.findall(NAME, WALKTHROUGH) if m.split(".")[0] in MODULES and not m.endswith(".py")})


def missing(name: str) -> str | None:
    """Why `name` (module.attr.attr...) does not name a function or class of ours, or None if it does."""
    module, *attrs = name.split(".")
    obj = importlib.import_module(module)
    for attr in attrs:
        if not hasattr(obj, attr):
            return f"{name}: {obj.__name__ if hasattr(obj, '__name__') else obj} has no {attr}"
        obj = getattr(obj, attr)
    return None if callable(obj) or attrs[-1].isupper() else f"{name} is not a function, class or CONSTANT"


def test_every_name_in_the_walkthrough_is_a_function_class_or_constant_of_ours():
    assert len(NAMES) >= 40  # the regex found the references (a format change would otherwise pass vacuously)
    problems = [p for p in map(missing, NAMES) if p]
    assert not problems, "docs/walkthrough.md names code that does not exist: " + "; ".join(problems)


def test_the_name_check_catches_a_name_that_does_not_exist():
    assert "has no no_such_method" in missing("model.Transformer.no_such_method")
    assert "not a function" in missing("model.ModelConfig.chunk_size")
    assert missing("model.chunk_layout") is None and missing("ram.SETTINGS") is None


def test_every_spec_section_has_a_paragraph_that_names_its_code():
    paragraphs = re.split(r"\n\s*\n", WALKTHROUGH)
    for section in ("S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S9"):
        cited = [p for p in paragraphs if re.search(rf"\b{section}\b", p) and not p.lstrip().startswith("#")]
        named = [p for p in cited if any(n in NAMES for n in re.findall(NAME, p))]
        assert named, f"docs/walkthrough.md: no paragraph cites {section} next to the code that implements it"
