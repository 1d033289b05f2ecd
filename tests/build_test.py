"""BUILD lists every module, tool, benchmark, experiment and test file, and nothing
else.

Bazel cannot run here offline, so this test evaluates BUILD as the Starlark subset
it uses (py_library / py_binary / py_test calls with literal lists) and compares the
declared sources with the files on disk.
"""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _targets():
  targets = {}

  def rule(kind):
    def add(name, srcs=(), deps=(), main=None, **kwargs):
      assert name not in targets, f"duplicate target {name}"
      targets[name] = {"kind": kind, "srcs": list(srcs), "deps": list(deps),
                       **kwargs}
    return add

  env = {"py_library": rule("py_library"), "py_binary": rule("py_binary"),
         "py_test": rule("py_test"), "load": lambda *a, **k: None,
         "package": lambda **k: None, "glob": None}
  exec(compile((ROOT / "BUILD").read_text(), "BUILD", "exec"), env)
  return targets


def _files(pattern):
  return {p.relative_to(ROOT).as_posix() for p in ROOT.glob(pattern)}


def test_every_source_file_is_declared_exactly_once():
  targets = _targets()
  declared = [s for t in targets.values() for s in t["srcs"]]
  assert len(declared) == len(set(declared)), "a file is in two targets"
  on_disk = (_files("mixtrain_tf/*.py") | _files("tests/*.py") | _files("tools/*.py")
             | _files("benchmarks/*.py") | _files("experiments/*.py"))
  assert set(declared) == on_disk, (
      f"missing from BUILD: {sorted(on_disk - set(declared))}; "
      f"in BUILD but not on disk: {sorted(set(declared) - on_disk)}")


def test_each_test_file_is_a_py_test_and_the_package_a_library():
  targets = _targets()
  tests = {s for t in targets.values() if t["kind"] == "py_test" for s in t["srcs"]}
  assert tests == _files("tests/*_test.py")
  lib = targets["mixtrain_tf"]
  assert lib["kind"] == "py_library"
  assert set(lib["srcs"]) == _files("mixtrain_tf/*.py")


def test_deps_name_existing_targets():
  targets = _targets()
  for name, t in targets.items():
    for dep in t["deps"]:
      if dep.startswith(":"):
        assert dep[1:] in targets, f"{name} depends on unknown {dep}"
