"""Every example in tfqkd's docstrings runs and prints what it shows (the examples are API docs)."""

import doctest
import importlib
import pkgutil

import pytest

import tfqkd

MODULES = sorted(m.name for m in pkgutil.walk_packages(tfqkd.__path__, "tfqkd."))


def test_every_module_is_collected():
    assert {"tfqkd.quantizers", "tfqkd.distiller", "tfqkd.export", "tfqkd.callbacks"} <= set(
        MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
