"""Every example in tfqkd's docstrings runs and prints what it shows (the examples are API docs)."""

import doctest
import importlib
import pkgutil

import pytest

import tfqkd

MODULES = sorted(m.name for m in pkgutil.walk_packages(tfqkd.__path__, "tfqkd."))


def test_every_module_is_collected():
    # Every .py file of the package on disk (subpackages included) is one of the modules run.
    import pathlib

    root = pathlib.Path(tfqkd.__file__).parent
    on_disk = {".".join(("tfqkd",) + p.relative_to(root).with_suffix("").parts).replace(
        ".__init__", "") for p in root.rglob("*.py")} - {"tfqkd"}
    assert on_disk == set(MODULES) and len(MODULES) > 20


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    # A public module without a single example would pass vacuously: its API has no docs to run.
    if not any(part.startswith("_") for part in name.split(".")):
        assert result.attempted > 0, f"{name} is public but its docstrings have no example"
