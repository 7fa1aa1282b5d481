"""The house's layering, read from the source with ``ast`` (no imports run, < 1 s).

- no import cycles among tfqkd, recipes and tools modules (function-level imports included);
- the library never imports recipes or tools; recipes never import tools or a sibling recipe
  (only ``recipes.common`` and its private modules);
- every module in ``tfqkd/`` stays under 700 lines (one concept per module).
"""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
MAX_LINES = 700


def _modules():
    mods = {}
    for base in ("tfqkd", "recipes", "tools"):
        for path in sorted((REPO / base).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _resolve(name, mods):
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _graph(mods):
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                subs = [f"{base}.{alias.name}" for alias in node.names]
                # `from pkg import submodule` needs the package's __init__ only if a name is
                # not a submodule
                names = subs if all(s in mods for s in subs) else subs + [base]
            else:
                continue
            for name in names:
                target = _resolve(name, mods)
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def _cycles(graph):
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_no_import_cycles():
    assert _cycles(_graph(_modules())) == []


def test_layers_import_only_downwards():
    mods = _modules()
    graph = _graph(mods)
    recipe_scripts = {m for m in mods if m.startswith("recipes.")
                      and not m.split(".")[1].startswith("_") and m != "recipes.common"}
    upward = sorted((a, b) for a in graph for b in graph[a]
                    if a.startswith("tfqkd") and not b.startswith("tfqkd"))
    sideways = sorted((a, b) for a in graph for b in graph[a] if a.startswith("recipes")
                      and (b.startswith("tools") or b in recipe_scripts))
    assert upward == [] and sideways == []


def test_library_modules_stay_small():
    sizes = {str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines())
             for p in (REPO / "tfqkd").rglob("*.py")}
    assert len(sizes) > 30
    assert {p: n for p, n in sizes.items() if n >= MAX_LINES} == {}


def test_the_checks_see_a_cycle_and_a_sibling_import():
    # the graph reader on a made-up tree: a <-> b cycle, recipes.x importing recipes.y
    mods = {"tfqkd.a": None, "tfqkd.b": None, "recipes.x": None, "recipes.y": None}
    graph = {"tfqkd.a": {"tfqkd.b"}, "tfqkd.b": {"tfqkd.a"}, "recipes.x": {"recipes.y"},
             "recipes.y": set()}
    assert _cycles(graph) == [["tfqkd.a", "tfqkd.b"]]
    assert _resolve("tfqkd.a.something", mods) == "tfqkd.a"
