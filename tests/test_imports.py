"""The import graph: every project import at the top of its file, no cycles, each module importable alone.

    python tests/test_imports.py     # prints the graph (module -> the project modules it imports)
"""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
TESTS = sorted(f"tests/{p.stem}" for p in (ROOT / "tests").glob("*.py"))
SCRIPTS = sorted(m for m in MODULES if 'if __name__ == "__main__":' in (ROOT / f"{m}.py").read_text())


def project_imports(module: str) -> tuple[set[str], list[str]]:
    """(project modules `module` imports at its top level, 'file:line imports x' for any imported deeper)."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            continue
        ours = [n for n in names if n in MODULES]
        if ours and node in tree.body:
            top.update(ours)
        elif ours:
            nested.append(f"{module}.py:{node.lineno} imports {', '.join(ours)}")
    return top, nested


GRAPH = {m: project_imports(m)[0] for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] if there is none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return []

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return []


def closure(module: str) -> set[str]:
    """Every project module that importing `module` imports."""
    seen, todo = set(), [module]
    while todo:
        for n in GRAPH[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_every_project_import_is_at_the_top_of_its_file():  # the tests' too
    nested = [line for m in MODULES + TESTS for line in project_imports(m)[1]]
    assert not nested, "imports inside functions or classes hide the import graph: " + "; ".join(nested)


def test_the_import_graph_has_no_cycle():
    assert find_cycle(GRAPH) == [], f"import cycle: {' -> '.join(find_cycle(GRAPH))}"


def test_the_cycle_finder_finds_a_cycle():  # so that the test above can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_checkpoint_depends_on_the_model_only():  # not on RAM, the task generator or a script
    assert GRAPH["checkpoint"] == {"model"} and not closure("checkpoint") & {*SCRIPTS, "data", "ram", "llama"}


def test_each_module_imports_alone_in_a_fresh_interpreter():
    # one interpreter for speed (torch imports once); before each module every project module is forgotten,
    # so each one is imported first, as `python -c "import X"` would, which is what exposes a cycle
    code = (f"import sys, importlib, torch\nfor m in {MODULES!r}:\n"
            f"    for k in {MODULES!r}: sys.modules.pop(k, None)\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        print(f'{m}: {type(e).__name__}: {e}')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr[-2000:]


if __name__ == "__main__":
    for m in MODULES:
        print(f"{m:>14} -> {', '.join(sorted(GRAPH[m])) or '(none)'}")
    cycle = find_cycle(GRAPH)
    print(f"cycle: {' -> '.join(cycle)}" if cycle else "no import cycle")
