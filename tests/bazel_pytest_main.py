"""The ``main`` of every ``py_test`` in BUILD: runs the test file given in ``args`` under pytest.

The test modules are pytest files without a ``__main__`` of their own, so Bazel running them
directly would import them and pass without running a test. Here pytest's exit status is the
target's: a failing (or an uncollectable) test fails the Bazel target. Extra arguments after the
file go to pytest, e.g. ``bazel test //:test_losses --test_arg=-k --test_arg=temperature``.
"""

import os
import sys

import pytest


def main(argv) -> int:
    if not argv:
        raise SystemExit("usage: bazel_pytest_main.py TEST_FILE [PYTEST_ARGS...]")
    # No cache directory written into the runfiles tree (read-only under the sandbox); tests'
    # temporary files go under Bazel's per-test TEST_TMPDIR when it is set.
    args = [argv[0], "-q", "-p", "no:cacheprovider", *argv[1:]]
    if os.environ.get("TEST_TMPDIR"):
        args.append("--basetemp=" + os.path.join(os.environ["TEST_TMPDIR"], "pytest"))
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
