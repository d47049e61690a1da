"""The docs point at code that exists: every `module.name` in docs/walkthrough.md imports, and every SPEC
section has its paragraph there, naming the code that implements it."""
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem for p in ROOT.glob("*.py")} | {"ram", "scripts"}
WALKTHROUGH = (ROOT / "docs" / "walkthrough.md").read_text()
# `model.Transformer.layer_step`, `ram.select`, ...: backticked names whose first part is one of our files
NAME = r"`([A-Za-z_]\w*(?:\.\w+)+)`"
NAMES = sorted({m for m in re.findall(NAME, WALKTHROUGH) if m.split(".")[0] in MODULES and not m.endswith(".py")})


def missing(name: str) -> str | None:
    """Why `name` (module.attr..., the module maybe in a package: ram.ram.select) does not name a function, class or
    CONSTANT of ours, or None if it does."""
    parts = name.split(".")
    k = 1 + (parts[0] in ("ram", "scripts") and len(parts) > 1)  # a module of a package: ram.ram, scripts.plan
    obj = importlib.import_module(".".join(parts[:k]))
    for attr in parts[k:]:
        if not hasattr(obj, attr):
            return f"{name}: {getattr(obj, '__name__', obj)} has no {attr}"
        obj = getattr(obj, attr)
    return None if callable(obj) or parts[-1].isupper() else f"{name} is not a function, class or CONSTANT"


def test_every_name_in_the_walkthrough_is_a_function_class_or_constant_of_ours():
    assert len(NAMES) >= 40  # the regex found the references (a format change would otherwise pass vacuously)
    problems = [p for p in map(missing, NAMES) if p]
    assert not problems, "docs/walkthrough.md names code that does not exist: " + "; ".join(problems)


def test_the_name_check_catches_a_name_that_does_not_exist():
    assert "has no no_such_method" in missing("model.Transformer.no_such_method")
    assert "not a function" in missing("model.ModelConfig.chunk_size")
    assert missing("model.chunk_layout") is None and missing("ram.train_ram.SETTINGS") is None


def test_every_spec_section_has_a_paragraph_that_names_its_code():
    paragraphs = re.split(r"\n\s*\n", WALKTHROUGH)
    for section in ("S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S9"):
        cited = [p for p in paragraphs if re.search(rf"\b{section}\b", p) and not p.lstrip().startswith("#")]
        named = [p for p in cited if any(n in NAMES for n in re.findall(NAME, p))]
        assert named, f"docs/walkthrough.md: no paragraph cites {section} next to the code that implements it"


DESIGN = (ROOT / "docs" / "design.md").read_text()
CITE = re.compile(r"\bS(\d+)(?:\.(\d+))?\b")  # "S3", "S9.3": a section of docs/design.md, and an item of its list


def sections(text: str) -> dict[str, int]:
    """docs/design.md's sections: "S3" -> how many numbered items its text lists."""
    parts = re.split(r"^## (S\d+)\. .*$", text, flags=re.M)
    return {name: len(re.findall(r"^\d+\. ", body, re.M)) for name, body in zip(parts[1::2], parts[2::2])}


def unresolved(text: str, where: str, known: dict[str, int]) -> list[str]:
    return [f"{where}: {m.group(0)}" for m in CITE.finditer(text)
            if f"S{m.group(1)}" not in known or (m.group(2) and int(m.group(2)) > known[f"S{m.group(1)}"])]


def project_files() -> list[Path]:
    return [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".sh") and ".git" not in p.parts
            and "out" not in p.parts]


def test_every_section_the_code_and_docs_cite_is_in_the_design_page():
    known = sections(DESIGN)
    assert list(known) == [f"S{i}" for i in range(1, 10)] and known["S9"] == 6
    problems = [line for p in project_files() if p.name != "test_docs.py"  # whose counterexamples are on purpose
                for line in unresolved(p.read_text(), str(p.relative_to(ROOT)), known)]
    assert not problems, "citations docs/design.md does not resolve: " + "; ".join(problems[:10])


def test_a_citation_that_does_not_resolve_is_caught():
    known = sections(DESIGN)
    assert unresolved("# S3: gated update; S9.6", "x", known) == []
    assert unresolved("# S10: nothing; S9.7; S4.1", "x", known) == ["x: S10", "x: S9.7", "x: S4.1"]


def test_nothing_in_the_repository_points_at_a_file_outside_it():
    outside = re.compile(r"\.\./shared|shared/(SPEC|OFFICIAL|RESOURCES|CALIBRATION|STYLE)|(SPEC|CALIBRATION|OFFICIAL)\.md")
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in project_files() if p.name != "test_docs.py"
            for m in outside.finditer(p.read_text())]
    assert not hits, "; ".join(hits)


def test_every_relative_link_in_the_readme_and_docs_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(ROOT)}: {link}" for page in pages
              for link in re.findall(r"\]\(([^)#\s]+)", page.read_text())
              if not link.startswith("http") and not (page.parent / link).exists()]
    assert len(pages) > 5 and not broken, "; ".join(broken)
