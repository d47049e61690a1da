"""The import graph: the core never imports the lab (ram/, scripts/), every project import sits at the top of its
file, no cycles, each module importable alone.

    python tests/test_imports.py     # prints the graph (module -> the project modules it imports)
"""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAB = ("ram", "scripts")  # the folders beside the core: RAM and its tasks; the plan, the simulator, checks, experiments
MODULES = sorted([p.stem for p in ROOT.glob("*.py")] + [f"{d}.{p.stem}" for d in LAB for p in (ROOT / d).glob("*.py")
                                                         if p.stem != "__init__"])
TESTS = sorted(f"tests.{p.stem}" for p in (ROOT / "tests").glob("*.py"))
CORE = ("train", "sample", "eval_passkey")  # what a learner reads first


def path(module: str) -> Path:
    return ROOT / f"{module.replace('.', '/')}.py"


def targets(node) -> list[str]:
    """The project modules an import statement names (`from ram import tasks` names ram.tasks)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
        return []
    return [n for n in names if n in MODULES or n.split(".")[0] in MODULES]


def project_imports(module: str) -> tuple[set[str], list[str]]:
    """(project modules `module` imports at its top level, 'file:line imports x' for any imported deeper)."""
    tree = ast.parse(path(module).read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        ours = {n if n in MODULES else n.split(".")[0] for n in targets(node)}
        if ours and node in tree.body:
            top |= ours
        elif ours:
            nested.append(f"{module}:{node.lineno} imports {', '.join(sorted(ours))}")
    return top, nested


GRAPH = {m: project_imports(m)[0] for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] if there is none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    trail: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        trail.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return trail[trail.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        trail.pop()
        return []

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return []


def closure(module: str, graph: dict[str, set[str]] = GRAPH) -> set[str]:
    """Every project module that importing `module` imports."""
    seen, todo = set(), [module]
    while todo:
        for n in graph[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def lab_in(module: str, graph: dict[str, set[str]] = GRAPH) -> set[str]:
    return {m for m in closure(module, graph) if m.split(".")[0] in LAB}


def test_the_core_scripts_import_nothing_of_the_lab():
    assert all(m in GRAPH for m in CORE) and any(m.startswith("ram.") for m in MODULES)
    for script in CORE:
        assert not lab_in(script), f"{script}.py imports the lab: {', '.join(sorted(lab_in(script)))}"


def test_the_layering_check_sees_a_lab_module_imported_through_another():
    graph = {**GRAPH, "data": GRAPH["data"] | {"ram.tasks"}}  # as if data.py imported RAM's tasks
    assert lab_in("train", graph) >= {"ram.tasks"}


def test_every_project_import_is_at_the_top_of_its_file():  # the tests' too
    nested = [line for m in MODULES + TESTS for line in project_imports(m)[1]]
    assert not nested, "imports inside functions or classes hide the import graph: " + "; ".join(nested)


def test_the_import_graph_has_no_cycle():
    assert find_cycle(GRAPH) == [], f"import cycle: {' -> '.join(find_cycle(GRAPH))}"


def test_the_cycle_finder_finds_a_cycle():  # so that the test above can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_checkpoint_depends_on_the_model_and_the_settings_only():
    assert GRAPH["checkpoint"] == {"model", "configurator"} and not closure("checkpoint") & {"data", "llama", "train"}


def test_each_module_imports_alone_in_a_fresh_interpreter():
    # one interpreter for speed (torch imports once); before each module every project module is forgotten,
    # so each one is imported first, as `python -c "import X"` would, which is what exposes a cycle
    code = (f"import sys, importlib, torch\nfor m in {MODULES!r}:\n"
            f"    for k in [k for k in sys.modules if k.split('.')[0] in {[m.split('.')[0] for m in MODULES]!r}]:\n"
            "        sys.modules.pop(k, None)\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        print(f'{m}: {type(e).__name__}: {e}')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr[-2000:]


if __name__ == "__main__":
    for m in MODULES:
        print(f"{m:>22} -> {', '.join(sorted(GRAPH[m])) or '(none)'}")
    cycle = find_cycle(GRAPH)
    print(f"cycle: {' -> '.join(cycle)}" if cycle else "no import cycle")
