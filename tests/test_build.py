"""BUILD and MODULE.bazel stay honest without Bazel (which cannot fetch its rules offline).

1. buildifier (npm @bazel/buildifier, ``npm install``) formats and lints both files. Without
   the binary the test skips, unless the CI environment variable is set: then it fails.
2. BUILD is evaluated as Starlark (a Python subset) with stub rules, and checked against the
   tree: every Python file is declared in exactly one target, every project import of a file
   resolves to a file in its target's transitive srcs, every PyPI import to an "@pypi//..."
   label in its transitive deps that requirements_lock.txt pins, every py_test runs its own
   file. Failure messages name the file, the import and the target to fix.

The import names follow pyproject.toml's package-dir: ``siglip_fast.kernels.x`` is
kernels/x.py, which BUILD declares through the genrule that copies it to siglip_fast/kernels/.
Imports inside ``try:`` with a handler that catches ImportError (by name, Exception, or a bare
``except``) are optional and not required to be covered;
``importlib.import_module`` strings are not seen (siglip_fast.loss loads kernels that way, so
the kernels share its target).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

# Under `bazel test` the runfiles tree holds only declared files, so a scan would prove
# nothing; Bazel checks BUILD itself when it builds.
pytestmark = pytest.mark.skipif(
  "TEST_SRCDIR" in os.environ, reason="checks BUILD without Bazel; Bazel checks it itself"
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD = ROOT / "BUILD"
MODULE = ROOT / "MODULE.bazel"
LOCK = ROOT / "requirements_lock.txt"
# Folders that hold no sources of ours: tool output, environments, caches.
_SKIP_DIRS = {"node_modules", "__pycache__", "build", "dist"}
_SKIP_PREFIXES = (".", "bazel-", "workdir")
_PY_RULES = ("py_library", "py_binary", "py_test")
# Calls that need libtpu at run time without importing it.
_NEEDS_LIBTPU = "get_topology_desc"


# ------------------------------------------------------------------------------------------
# Reading BUILD and MODULE.bazel


@dataclasses.dataclass
class Target:
  kind: str
  name: str
  attrs: dict


def _check_starlark(tree: ast.AST, path: pathlib.Path):
  banned = (
    ast.Import,
    ast.ImportFrom,
    ast.FunctionDef,
    ast.ClassDef,
    ast.While,
    ast.Try,
    ast.With,
    ast.Global,
    ast.Nonlocal,
    ast.Lambda,
    ast.AsyncFunctionDef,
  )
  for node in ast.walk(tree):
    if isinstance(node, banned):
      raise AssertionError(
        f"{path.name}:{node.lineno}: {type(node).__name__} is not allowed in a BUILD file"
      )


def _evaluate(path: pathlib.Path, rules: dict) -> None:
  """Runs a Starlark file with ``rules`` as its only globals (plus a few pure builtins)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  _check_starlark(tree, path)
  env = {"__builtins__": {"len": len, "sorted": sorted, "True": True, "False": False, "None": None}}
  env.update(rules)
  exec(compile(tree, str(path), "exec"), env)  # noqa: S102 - the repo's own Starlark


@functools.cache
def build_targets() -> dict[str, Target]:
  targets: dict[str, Target] = {}

  def rule(kind):
    def define(name, **attrs):
      assert name not in targets, f"BUILD: two targets are named {name!r}"
      targets[name] = Target(kind, name, attrs)

    return define

  def glob(*_, **__):
    raise AssertionError(
      "BUILD: list files explicitly, not with glob(), so that the declaration test sees every file"
    )

  rules = {k: rule(k) for k in _PY_RULES + ("genrule", "filegroup")}
  rules.update(
    load=lambda *a, **k: None,
    package=lambda **k: None,
    exports_files=lambda *a, **k: None,
    glob=glob,
  )
  _evaluate(BUILD, rules)
  return targets


@functools.cache
def module_calls() -> list[tuple[str, dict]]:
  calls = []

  class Ext:
    def __init__(self, name):
      self.name = name

    def __getattr__(self, tag):
      return lambda **kw: calls.append((f"{self.name}.{tag}", kw))

  def record(kind):
    def f(*args, **kw):
      calls.append((kind, dict(kw, _args=args)))

    return f

  rules = {
    k: record(k)
    for k in (
      "module",
      "bazel_dep",
      "use_repo",
      "register_toolchains",
      "local_path_override",
      "git_override",
    )
  }
  rules["use_extension"] = lambda bzl, name, **kw: Ext(name)
  _evaluate(MODULE, rules)
  return calls


@functools.cache
def pinned() -> dict[str, str]:
  """Normalised distribution name -> pinned version, from requirements_lock.txt."""
  out = {}
  for line in LOCK.read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
      assert m, f"requirements_lock.txt: {line!r} is not 'name==version'"
      out[_normalise(m.group(1))] = m.group(2)
  return out


def _normalise(dist: str) -> str:
  """A distribution's name as rules_python's hub spells it: lower case, '_' for '-' / '.'."""
  return re.sub(r"[-_.]+", "_", dist).lower()


def _hub() -> str:
  parses = [kw for k, kw in module_calls() if k == "pip.parse"]
  assert len(parses) == 1, "MODULE.bazel must call pip.parse exactly once"
  return parses[0]["hub_name"]


# ------------------------------------------------------------------------------------------
# The tree: files, module names, imports


@functools.cache
def package_dirs() -> dict[str, str]:
  """Import package -> source folder, from pyproject.toml (as pip installs them)."""
  with open(ROOT / "pyproject.toml", "rb") as f:
    return dict(tomllib.load(f)["tool"]["setuptools"]["package-dir"])


def installed_path(src: str) -> str:
  """Where pip (and the BUILD genrules) put a source file: kernels/x.py -> siglip_fast/kernels/x.py."""
  for pkg, folder in sorted(package_dirs().items(), key=lambda kv: -len(kv[1])):
    if src.startswith(folder + "/"):
      return pkg.replace(".", "/") + src[len(folder) :]
  return src


@functools.cache
def python_files() -> tuple[str, ...]:
  out = []
  for dirpath, dirnames, filenames in os.walk(ROOT):
    dirnames[:] = sorted(
      d
      for d in dirnames
      if d not in _SKIP_DIRS and not d.startswith(_SKIP_PREFIXES) and not d.endswith(".egg-info")
    )
    rel = pathlib.Path(dirpath).relative_to(ROOT)
    out += [str(rel / f) if str(rel) != "." else f for f in sorted(filenames) if f.endswith(".py")]
  return tuple(out)


def module_file(module: str) -> str | None:
  """The repository file of an import name, or None when the project has no such module."""
  parts = module.split(".")
  candidates = []
  for pkg, folder in package_dirs().items():
    pkg_parts = pkg.split(".")
    if parts[: len(pkg_parts)] == pkg_parts:
      candidates.append((len(pkg_parts), folder, parts[len(pkg_parts) :]))
  if candidates:
    _, folder, rest = max(candidates)
    base = "/".join([folder] + rest)
  else:
    base = "/".join(parts)
  files = set(python_files())
  for path in (base + ".py", base + "/__init__.py"):
    if path in files:
      return path
  return None


def file_module(path: str) -> str:
  """The import name of a repository file (the inverse of ``module_file``)."""
  mod = installed_path(path)[: -len(".py")].replace("/", ".")
  return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


def _catches_import_error(node: ast.Try) -> bool:
  """A handler for ImportError: by name, a base class (Exception), or a bare except."""
  for h in node.handlers:
    if h.type is None:
      return True
    types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
    if any(
      isinstance(t, ast.Name)
      and t.id in ("ImportError", "ModuleNotFoundError", "Exception", "BaseException")
      for t in types
    ):
      return True
  return False


def _imports(node, optional=False):
  """(import node, optional) pairs; optional inside ``try:`` with an ImportError handler."""
  if isinstance(node, (ast.Import, ast.ImportFrom)):
    yield node, optional
    return
  if isinstance(node, ast.Try):
    for child in node.body:
      yield from _imports(child, optional or _catches_import_error(node))
    for child in node.handlers + node.orelse + node.finalbody:
      yield from _imports(child, optional)
    return
  for child in ast.iter_child_nodes(node):
    yield from _imports(child, optional)


@functools.cache
def required_imports(path: str) -> tuple[tuple[str, int], ...]:
  """(absolute module name, line) of every non-optional import in a file.

  ``from a import b`` yields a.b when that is a project module, and a otherwise.
  """
  tree = ast.parse((ROOT / path).read_text(), filename=path)
  own = file_module(path)
  package = own if path.endswith("__init__.py") else own.rpartition(".")[0]
  out = []
  for node, optional in _imports(tree):
    if optional:
      continue
    if isinstance(node, ast.Import):
      out += [(a.name, node.lineno) for a in node.names]
      continue
    base = node.module or ""
    if node.level:
      anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
      base = ".".join(anchor + ([base] if base else []))
    if base == "__future__":
      continue
    subs = [f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}")]
    out += [(m, node.lineno) for m in subs] or [(base, node.lineno)]
  return tuple(out)


def project_roots() -> set[str]:
  return {pkg.split(".")[0] for pkg in package_dirs()} | {
    p.split("/")[0] for p in python_files() if "/" in p
  }


@functools.cache
def _dists_of(top: str) -> tuple[str, ...]:
  return tuple(importlib.metadata.packages_distributions().get(top, ()))


# ------------------------------------------------------------------------------------------
# Resolving BUILD: srcs to source files, deps to closures, imports to deps


def _local(label: str) -> str | None:
  for prefix in ("//:", ":"):
    if label.startswith(prefix):
      return label[len(prefix) :]
  return None


def _uses_topologies(path: str) -> bool:
  """Calls ``...get_topology_desc(...)``: compiles for TPUs, so needs libtpu at run time."""
  tree = ast.parse((ROOT / path).read_text(), filename=path)
  return any(
    isinstance(n, ast.Call)
    and getattr(n.func, "attr", getattr(n.func, "id", None)) == _NEEDS_LIBTPU
    for n in ast.walk(tree)
  )


class Build:
  """BUILD's targets, resolved against the tree. Every method asserts with a message that
  names the target, file or label to fix."""

  def __init__(self, targets: dict[str, Target], hub: str):
    self.targets, self.hub = targets, hub
    self._closures: dict[str, tuple] = {}

  @functools.cached_property
  def copies(self) -> dict[str, str]:
    """Output path -> source file of the copy genrules (checked to be copies by name)."""
    out = {}
    for t in self.targets.values():
      if t.kind != "genrule":
        continue
      srcs, outs = t.attrs.get("srcs", []), t.attrs.get("outs", [])
      expected = [installed_path(s) for s in srcs]
      assert outs == expected, (
        f"BUILD genrule {t.name!r}: outs must be the installed paths of srcs, in order "
        f"(pyproject.toml package-dir); expected {expected}, got {outs}"
      )
      assert "cp " in t.attrs.get("cmd", ""), f"BUILD genrule {t.name!r} must copy its srcs"
      out.update(zip(outs, srcs))
    return out

  def src_files(self, target: Target) -> list[str]:
    """A target's srcs as repository source files (genrule outputs mapped to their source)."""
    out = []
    for s in target.attrs.get("srcs", []):
      name = _local(s)
      if name is not None:
        gen = self.targets.get(name)
        assert gen is not None and gen.kind == "genrule", (
          f"BUILD target {target.name!r}: srcs entry {s!r} is not a genrule in BUILD"
        )
        out += [self.copies[o] for o in gen.attrs["outs"]]
      elif s in self.copies:
        out.append(self.copies[s])
      else:
        assert (ROOT / s).is_file(), f"BUILD target {target.name!r}: srcs file {s!r} does not exist"
        out.append(s)
    return out

  def closure(self, name: str) -> tuple[frozenset, frozenset, frozenset]:
    """(source files, pip distributions, data files) of a target and its transitive deps."""
    if name in self._closures:
      return self._closures[name]
    target = self.targets[name]
    files, dists = set(self.src_files(target)), set()
    data = set(target.attrs.get("data", []))
    for dep in target.attrs.get("deps", []):
      local = _local(dep)
      if local is not None:
        assert local in self.targets, f"BUILD target {name!r}: dep {dep!r} is not defined"
        assert self.targets[local].kind in _PY_RULES, (
          f"BUILD target {name!r}: dep {dep!r} is not a py_* target"
        )
        f, d, a = self.closure(local)
        files |= f
        dists |= d
        data |= a
      elif dep.startswith(f"@{self.hub}//"):
        dist = dep[len(f"@{self.hub}//") :]
        assert dist in pinned(), (
          f"BUILD target {name!r}: {dep!r} is not pinned in requirements_lock.txt"
        )
        dists.add(dist)
      else:
        raise AssertionError(
          f"BUILD target {name!r}: dep {dep!r} is neither a target of "
          f"this BUILD nor @{self.hub}//<distribution>"
        )
    self._closures[name] = (frozenset(files), frozenset(dists), frozenset(data))
    return self._closures[name]

  @functools.cached_property
  def owners(self) -> dict[str, list[str]]:
    """Repository file -> targets that declare it (a py_test's shared main does not count)."""
    out: dict[str, list[str]] = {}
    for t in self.targets.values():
      if t.kind not in _PY_RULES:
        continue
      for f in self.src_files(t):
        if not (t.kind == "py_test" and f == t.attrs.get("main")):
          out.setdefault(f, []).append(t.name)
    return out

  def users(self, path: str) -> list[str]:
    """Targets whose program includes ``path`` directly: its owner, or py_tests it is main of."""
    mains = [t.name for t in self.targets.values() if t.attrs.get("main") == path]
    return self.owners.get(path, []) + mains

  def declaration_problems(self, files) -> list[str]:
    problems = []
    for path in files:
      where = self.owners.get(path, [])
      is_test = re.fullmatch(r"tests/test_\w+\.py", path)
      if not where:
        kind = "a py_test" if is_test else "a py_library or py_binary"
        via = (
          f" (through the genrule that copies {path.split('/')[0]}/ into "
          f"{installed_path(path).rpartition('/')[0]}/)"
          if installed_path(path) != path
          else ""
        )
        problems.append(f"{path}: declared in no BUILD target; add it to {kind}{via}")
      elif len(where) > 1:
        problems.append(
          f"{path}: declared in {len(where)} targets {where}; keep one and depend on it"
        )
      elif is_test and self.targets[where[0]].kind != "py_test":
        problems.append(f"{path}: a test file must be a py_test, not in {where[0]!r}")
    return problems

  def import_problems(self, files) -> list[str]:
    problems = []
    roots = project_roots()
    for path in files:
      for name in self.users(path):
        have, dists, _ = self.closure(name)
        for module, line in required_imports(path):
          where = f"{path}:{line} (target {name!r}) imports {module}"
          top = module.split(".")[0]
          if top in sys.stdlib_module_names:
            continue
          if top in roots:
            needed = module_file(module)
            if needed is None:
              problems.append(f"{where}, which is no file of this repository")
              continue
            parts = module.split(".")
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
            chain = [module_file(".".join(parts[:i])) for i in range(1, len(parts))]
            for f in [c for c in chain if c] + [needed]:
              if f not in have and f in self.owners:
                problems.append(
                  f"{where}: {f} is not in its transitive srcs; add "
                  f"':{self.owners[f][0]}' to the deps of {name!r}"
                )
              elif f not in have:
                problems.append(
                  f"{where}: {f} is in no BUILD target; declare it in a "
                  f"py_library and add that to the deps of {name!r}"
                )
            continue
          candidates = [_normalise(d) for d in _dists_of(top)]
          if not candidates:
            problems.append(
              f"{where}, which is neither the standard library, this project "
              "nor an installed distribution; declare it in pyproject.toml and "
              "requirements_lock.txt"
            )
          elif not any(c in dists for c in candidates):
            labels = " or ".join(f"'@{self.hub}//{c}'" for c in candidates)
            problems.append(f"{where}: add {labels} to the deps of {name!r}")
        if _uses_topologies(path) and "libtpu" not in dists:
          problems.append(
            f"{path} (target {name!r}) compiles for TPU topologies, which "
            f"needs libtpu at run time: add '@{self.hub}//libtpu' to the deps "
            f"of {name!r}"
          )
    return sorted(set(problems))


@functools.cache
def build() -> Build:
  return Build(build_targets(), _hub())


# ------------------------------------------------------------------------------------------
# Tests


def _buildifier() -> str | None:
  local = ROOT / "node_modules" / ".bin" / "buildifier"
  if local.exists() and shutil.which("node"):
    return str(local)
  return shutil.which("buildifier")


def test_buildifier_check_and_lint():
  exe = _buildifier()
  if exe is None:
    if os.environ.get("CI"):
      pytest.fail(
        "buildifier is missing: run `npm install --no-audit --no-fund` in the repo "
        "root (package.json pins @bazel/buildifier)"
      )
    pytest.skip("buildifier not installed (npm install); CI=1 makes this a failure")
  result = subprocess.run(
    [exe, "-mode=check", "-lint=warn", str(BUILD), str(MODULE)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, (
    "buildifier found formatting or lint problems (fix with `node_modules/.bin/buildifier "
    f"-lint=fix BUILD MODULE.bazel`):\n{result.stdout}{result.stderr}"
  )


def test_module_bazel_declares_rules_python_and_the_pip_hub():
  calls = module_calls()
  deps = {kw["name"] for k, kw in calls if k == "bazel_dep"}
  assert "rules_python" in deps
  parse = next(kw for k, kw in calls if k == "pip.parse")
  assert parse["requirements_lock"] == "//:requirements_lock.txt" and LOCK.is_file()
  assert any(k == "use_repo" and parse["hub_name"] in kw["_args"][1:] for k, kw in calls), (
    "MODULE.bazel must use_repo(pip, <hub_name>)"
  )
  toolchains = [kw for k, kw in calls if k == "python.toolchain"]
  assert [t["python_version"] for t in toolchains] == [parse["python_version"]]
  with open(ROOT / "pyproject.toml", "rb") as f:
    requires = tomllib.load(f)["project"]["requires-python"]
  low = tuple(int(v) for v in re.search(r">=\s*([\d.]+)", requires).group(1).split("."))
  assert tuple(int(v) for v in parse["python_version"].split(".")) >= low


def test_build_targets_are_well_formed():
  b = build()
  assert b.targets, "BUILD defines no targets"
  for t in b.targets.values():
    if t.kind not in _PY_RULES:
      continue
    assert t.attrs.get("srcs"), f"BUILD target {t.name!r} has no srcs"
    b.closure(t.name)  # resolves every src and dep, or says which one is wrong
    for d in t.attrs.get("data", []):
      assert (ROOT / d).exists(), f"BUILD target {t.name!r}: data {d!r} does not exist"
    if t.kind in ("py_binary", "py_test"):
      assert t.attrs.get("main") in t.attrs["srcs"], (
        f"BUILD {t.kind} {t.name!r}: main must be one of its srcs"
      )
    if t.kind == "py_test":
      own = [f for f in b.src_files(t) if f != t.attrs["main"]]
      assert own == [f"tests/{t.name}.py"], (
        f"BUILD py_test {t.name!r} must have exactly tests/{t.name}.py besides its main"
      )
      assert t.attrs.get("args") == [f"$(rootpath tests/{t.name}.py)"], (
        f"BUILD py_test {t.name!r}: args must be ['$(rootpath tests/{t.name}.py)'] so the "
        "pytest main runs this file"
      )
      files, _, data = b.closure(t.name)
      assert "tests/conftest.py" in files and "pyproject.toml" in data, (
        f"BUILD py_test {t.name!r} must depend on :test_support (conftest.py, pytest "
        "configuration in pyproject.toml)"
      )


def test_every_python_file_is_declared_in_exactly_one_target():
  problems = build().declaration_problems(python_files())
  assert not problems, "\n".join(problems)


def test_imports_are_covered_by_transitive_deps():
  problems = build().import_problems(python_files())
  assert not problems, "\n".join(problems)


def _without(targets, name, dep=None, src=None):
  """A copy of BUILD's targets with one dep or src of one target removed."""
  out = dict(targets)
  attrs = dict(out[name].attrs)
  if dep is not None:
    attrs["deps"] = [d for d in attrs["deps"] if d != dep]
  if src is not None:
    attrs["srcs"] = [s for s in attrs["srcs"] if s != src]
  out[name] = Target(out[name].kind, name, attrs)
  return Build(out, _hub())


def _owner(path):
  return build().owners[path][0]


def test_the_checks_catch_a_missing_pip_dep():
  target = _owner("siglip_fast/module.py")
  b = _without(build_targets(), target, dep=f"@{_hub()}//flax")
  problems = b.import_problems(["siglip_fast/module.py"])
  assert any(
    "siglip_fast/module.py" in p and "imports flax" in p and "//flax'" in p and f"{target!r}" in p
    for p in problems
  ), problems


def test_the_checks_catch_a_missing_project_dep():
  user, owner = _owner("benchmarks/utilisation.py"), _owner("benchmarks/chips.py")
  b = _without(build_targets(), user, dep=f":{owner}")
  problems = b.import_problems(["benchmarks/utilisation.py"])
  assert any("benchmarks/chips.py" in p and f"':{owner}'" in p for p in problems), problems


def test_the_checks_catch_an_undeclared_file():
  b = _without(build_targets(), _owner("benchmarks/chips.py"), src="benchmarks/chips.py")
  problems = b.declaration_problems(["benchmarks/chips.py"])
  assert problems == [
    "benchmarks/chips.py: declared in no BUILD target; add it to a py_library or py_binary"
  ]


def test_the_checks_catch_a_genrule_that_renames():
  targets = dict(build_targets())
  gen = next(t for t in targets.values() if t.kind == "genrule")
  outs = list(gen.attrs["outs"])
  outs[0] = outs[0].replace("siglip_fast/", "elsewhere/")
  targets[gen.name] = Target("genrule", gen.name, dict(gen.attrs, outs=outs))
  with pytest.raises(AssertionError, match="installed paths of srcs"):
    Build(targets, _hub()).copies


def test_the_pytest_main_maps_bazel_test_env():
  from tests.bazel_pytest_main import pytest_args

  args = pytest_args(
    ["tests/test_api.py"],
    {"XML_OUTPUT_FILE": "/x.xml", "TEST_TMPDIR": "/tmp/t", "TESTBRIDGE_TEST_ONLY": "jit"},
  )
  assert args[0] == "tests/test_api.py" and "--junitxml=/x.xml" in args
  assert "--basetemp=/tmp/t/pytest" in args and args[-2:] == ["-k", "jit"]
  assert pytest_args([], {}) == ["-p", "no:cacheprovider"]


def test_pip_labels_match_pyproject_dependencies():
  """Every distribution pyproject.toml declares is pinned, so BUILD can name it."""
  with open(ROOT / "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
  declared = list(project["dependencies"])
  for extra in project.get("optional-dependencies", {}).values():
    declared += extra
  missing = []
  for req in declared:
    name = _normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0))
    if name not in pinned():
      missing.append(req)
  assert not missing, f"pinned nowhere in requirements_lock.txt: {missing}"
