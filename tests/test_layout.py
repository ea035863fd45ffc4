"""The layout shows the architecture: cli -> workers -> gkd_async, never backwards, and no circle among the
modules' imports (module-level ones and those inside functions alike), so each part can be read and tested
from the bottom up."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"gkd_async": 0, "workers": 1, "cli": 2}


def module_of(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each of our modules -> the modules of ours it imports (a `from package import module` names the module)."""
    modules = {module_of(p): p for top in LAYERS for p in (REPO / top).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found.update(t for t in targets if t in modules)
            found.discard(name)
        graph[name] = found
    return graph


def test_dependencies_point_one_way_from_cli_to_workers_to_the_library():
    backwards = [
        (module, target)
        for module, targets in imports().items()
        for target in targets
        if LAYERS[target.split(".")[0]] > LAYERS[module.split(".")[0]]
    ]
    assert backwards == []


def test_no_module_imports_itself_through_others():
    graph = imports()
    # Tarjan's strongly connected components: a component of more than one module is a circle.
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_no_module_grows_past_one_screenful_of_jobs():
    """A module over 450 lines is doing more than one job: carve it up before it grows further."""
    long = {
        str(p.relative_to(REPO)): n
        for top in LAYERS
        for p in (REPO / top).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 450
    }
    assert long == {}


def test_the_config_package_is_a_leaf_that_reads_no_files_but_its_own():
    """gkd_async.config validates and derives (schema, checks, RunPlan); what needs models, data or a server to
    check lives in gkd_async.preflight, so the config can be loaded and reasoned about without any of them."""
    outside = {
        (module, target)
        for module, targets in imports().items()
        if module.startswith("gkd_async.config")
        for target in targets
        if not target.startswith("gkd_async.config") and target not in ("gkd_async.errors", "gkd_async.redaction")
    }
    assert outside == set()
