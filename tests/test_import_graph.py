"""The package's imports run one way, stage by stage (spec -> planner -> codegen -> runtime -> build -> api ->
tools; the folders are the stages): no import cycles, counting imports inside functions too, nothing below the
public API imports it, and no module imports a later stage except the few named below, each with its reason."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "attngen"
STAGES = [    # in pipeline order; a module may import its own stage and earlier ones
    {"version", "errors", "spec", "expressions", "masks", "variant"},
    {"planner"},
    {"codegen"},
    {"runtime"},
    {"build", "tuned", "calls"},
    {"api", "autograd", "merge"},
    {"tools", "integrations", "distributed"},
    {"__init__", "__main__"},
]
LATER_STAGE_IMPORTS = {
    # A Spec checks its user expressions as it is made, by compiling each inside the kernel's own functions
    # (NVRTC front end), so that a type error points into the user's text: the probe renders a piece and
    # compiles it. Inside functions, and nothing in codegen imports the spec stage's expressions back.
    ("expressions", "codegen.jinja_env"), ("expressions", "codegen.modifiers"), ("expressions", "codegen.compile"),
    ("spec", "codegen.jinja_env"),     # templates_dir(): a pattern's CUDA checked against the template's names
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module (dotted, inside attngen) -> the attngen modules it imports anywhere in its text."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name.split(".") if path.stem == "__init__" and "." not in name and name != "__init__" else \
            name.split(".")[:-1]
        if path.stem == "__init__" and name != "__init__":
            package = name.split(".")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = package[:len(package) - (node.level - 1)]
                targets = [".".join(base + node.module.split("."))] if node.module else \
                    [".".join(base + [alias.name]) for alias in node.names]
                if node.module:     # from .pkg import module
                    targets += [f"{targets[0]}.{alias.name}" for alias in node.names]
                deps.update(t for t in targets if t in paths)
                if not node.module and not base:
                    deps.add("__init__")                      # from . import __version__
        graph[name] = {d for d in deps if d != name}
    return graph


def stage_of(module: str) -> int:
    head = module.split(".")[0]
    return next(i for i, stage in enumerate(STAGES) if head in stage)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycles():
    assert cycles(import_graph()) == []


def test_nothing_below_the_api_imports_it():
    below = {m: deps for m, deps in import_graph().items() if stage_of(m) < stage_of("api") and "api" in deps}
    assert below == {}


def test_imports_run_one_way_through_the_stages():
    later = {(m, d) for m, deps in import_graph().items() for d in deps
             if stage_of(d) > stage_of(m) and m not in ("__init__", "__main__")}
    assert later - LATER_STAGE_IMPORTS == set()


def test_every_module_has_a_stage():
    for module in import_graph():
        stage_of(module)           # StopIteration for a module outside every stage


def test_the_graph_sees_the_stages():
    graph = import_graph()
    assert "planner.forward" in graph["build"] and "runtime.launch" in graph["build"]
    assert "codegen.modifiers" in graph["codegen.signature"]


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
