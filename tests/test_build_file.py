"""BUILD stays true to the tree: it names every source file, names no missing one, each target's
deps hold the first-party modules it imports, and every test file runs as a py_test.

Fast and without Bazel: BUILD is read with Python's parser (Starlark is its syntax), imports with
``ast``; the rules for what counts as an import are tools/update_build.py's. When a check fails,
run ``python tools/update_build.py`` (it rewrites BUILD from the tree) and commit BUILD.
"""

import pathlib

import pytest

# Not resolved through symlinks: under Bazel this is the test's runfiles tree (BUILD and the
# sources are its data), in a checkout the checkout.
REPO = pathlib.Path(__file__).absolute().parents[1]
from tools import update_build  # noqa: E402  (the checkout's root is on sys.path: pytest.ini)

FIX = update_build.FIX
PY_RULES = ("py_library", "py_binary", "py_test")


@pytest.fixture(scope="module")
def targets():
    build = update_build.read_build((REPO / "BUILD").read_text(encoding="utf-8"))
    return {name: t for name, t in build.items() if t["kind"] in PY_RULES}


@pytest.fixture(scope="module")
def files():
    return update_build.python_files(REPO)


def _label(dep: str) -> str:
    return dep.split(":")[-1] if dep.startswith((":", "//:")) else dep


def test_every_python_file_is_in_a_target(targets, files):
    listed = {src for t in targets.values() for src in t.get("srcs", [])}
    missing = [f for f in files if f not in listed]
    assert not missing, f"in no BUILD target's srcs: {missing}; {FIX}"


def test_every_named_file_exists(targets):
    gone = [f"{name}: {path}" for name, t in targets.items()
            for path in [*t.get("srcs", []), *([t["main"]] if "main" in t else [])]
            if not (REPO / path).is_file()]
    assert not gone, f"BUILD names files that do not exist: {gone}; {FIX}"


def test_every_test_file_runs_under_pytest(targets, files):
    # A py_test whose main is the test module itself passes without running a test (the modules
    # have no __main__), so each runs the shared pytest runner on its file.
    run = {}
    for name, t in targets.items():
        if t["kind"] == "py_test":
            args = t.get("args", [])
            assert t.get("main") == update_build.RUNNER and args and args[0] in t["srcs"], (
                f"{name} does not run its test file under {update_build.RUNNER}; {FIX}")
            run[args[0]] = name
    tests = [f for f in files if f.startswith("tests/") and f.split("/")[-1].startswith("test_")]
    assert not [f for f in tests if f not in run], f"test files without a py_test; {FIX}"


def test_deps_hold_every_first_party_import(targets, files):
    index = update_build.module_index(files)
    owners = {}
    for name, t in targets.items():
        for src in t.get("srcs", []):
            owners.setdefault(src, set()).add(name)
    uncovered, imports = [], {}  # imports: file -> the first-party files it imports (parsed once)
    for name, t in sorted(targets.items()):
        srcs = t.get("srcs", [])
        deps = {_label(d) for d in t.get("deps", [])}
        for src in filter(lambda s: (REPO / s).is_file(), srcs):  # missing: the test above
            if src not in imports:
                tree = update_build.parse(REPO, src)
                imports[src] = update_build.imported_files(src, tree, index)
            for imported in sorted(imports[src]):
                if imported not in srcs and not owners.get(imported, set()) & deps:
                    uncovered.append(f"{name}: {src} imports {imported} "
                                     f"(in {sorted(owners.get(imported, ())) or 'no target'})")
        if t["kind"] == "py_test":  # pytest loads the conftest.py beside the test file
            conftest = str(pathlib.PurePosixPath(t["args"][0]).parent / "conftest.py")
            if conftest in owners and not owners[conftest] & deps and conftest not in srcs:
                uncovered.append(f"{name}: runs with {conftest}")
    assert not uncovered, "deps miss first-party imports:\n  " + "\n  ".join(uncovered) + f"\n{FIX}"
