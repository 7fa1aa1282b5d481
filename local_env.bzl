"""Repositories made from the machine, for an offline Bazel 4.2 (Debian's bazel-bootstrap).

python_env: a Python 3 toolchain whose interpreter is the environment's own python (TensorFlow's
python_configure, reduced to what tfqkd needs). The interpreter is $PYTHON_BIN_PATH if set, else
the first `python3` on PATH: with a virtualenv activated, that virtualenv, so Bazel targets import
the packages pip installed there. The path is kept as found (not resolved through symlinks),
which keeps the virtualenv's site-packages. Changing either variable re-runs the rule;
`bazel sync --configure` forces it.

native_rules: @rules_cc and @rules_java as Bazel's native rules under their names. Bazel's own
toolchain set-up, which every py_binary resolves, loads @rules_cc//cc:defs.bzl and
@rules_java//java:defs.bzl and would download both for it (Debian's bazel-rules-cc package is too
new for Bazel 4.2). tfqkd has no C++ or Java of its own.

no_coverage_tools: empty stand-ins for @remote_coverage_tools, which every test rule names (through
--coverage_report_generator, see .bazelrc) and Bazel would download. `bazel coverage` is therefore
not available; `bazel build` and `bazel test` are.
"""

def _python_env_impl(ctx):
    python = ctx.os.environ.get("PYTHON_BIN_PATH", "")
    if not python:
        found = ctx.which("python3")
        if not found:
            fail("python_env: no python3 on PATH; activate the project's virtualenv or set " +
                 "PYTHON_BIN_PATH")
        python = str(found)
    version = ctx.execute([python, "-c", "import sys; print(sys.version_info[0])"])
    if version.return_code != 0 or version.stdout.strip() != "3":
        fail("python_env: %s is not a working Python 3 (%s)" % (python, version.stderr))
    ctx.file("BUILD", """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "python3",
    interpreter_path = "{python}",
    python_version = "PY3",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":python3",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
""".format(python = python))

python_env = repository_rule(
    implementation = _python_env_impl,
    environ = ["PYTHON_BIN_PATH", "PATH"],
    local = True,
)

def _native_rules_impl(ctx):
    defs = ["# Bazel's native rules under %s's names (local_env.bzl, native_rules).\n" % ctx.name]
    for rule in ctx.attr.rules:
        defs.append("def %s(**kwargs):\n    native.%s(**kwargs)\n" % (rule, rule))
    ctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % ctx.name)
    ctx.file("BUILD", "")
    ctx.file(ctx.attr.package + "/BUILD", "")
    ctx.file(ctx.attr.package + "/defs.bzl", "\n".join(defs))

native_rules = repository_rule(
    implementation = _native_rules_impl,
    attrs = {
        "package": attr.string(mandatory = True),
        "rules": attr.string_list(mandatory = True),
    },
)

def _no_coverage_tools_impl(ctx):
    ctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % ctx.name)
    ctx.file("BUILD", """\
# Stand-ins for @remote_coverage_tools (local_env.bzl): tests name them, nothing runs them.
package(default_visibility = ["//visibility:public"])

filegroup(name = "coverage_report_generator")

filegroup(name = "lcov_merger")
""")

no_coverage_tools = repository_rule(implementation = _no_coverage_tools_impl)
