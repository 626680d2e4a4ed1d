"""The package's shape, read statically with `ast` (nothing of the package is imported).

  - imports run one way: a module imports only its own layer or lower ones (function-level imports
    too), in the order of `LAYERS`;
  - no import cycle among module-level imports, nor once the imports inside functions are counted
    too (a function-level import only defers the cycle to the first call; it does not remove it);
  - no module named like a stdlib module or a builtin, no `import x as <stdlib name>` alias;
  - no module over MAX_MODULE_LINES lines, no function over MAX_FUNCTION_LINES lines.
"""

from __future__ import annotations

import ast
import builtins
import os
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "gemma_mtp_jax"
ROOT = os.path.join(REPO, PACKAGE)

# Lowest first. A subpackage (its __init__ and every module in it) is one layer; the CLI modules
# share the top one.
LAYERS = [
    ("utils",),
    ("model",),
    ("data",),
    ("sharding",),
    ("checkpoint",),
    ("decoding",),
    ("presets",),
    ("training",),
    ("hf_torch",),
    ("train", "generate", "convert", "aot", "cli"),
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
# The one import allowed to run up the layers, and only from inside a function: the trainer's
# optional HF assisted-generation check at the end of a run (issue #12, item 5) uses the torch
# reference code, which the rest of the library never imports.
UPWARD_ALLOWED = {("gemma_mtp_jax.training.export", "gemma_mtp_jax.hf_torch")}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
STDLIB = set(sys.stdlib_module_names)
BUILTINS = set(dir(builtins))


def _modules() -> dict[str, str]:
  """Dotted module name -> file path, for every .py file of the package."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(ROOT):
    dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
    for f in sorted(filenames):
      if not f.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(dirpath, f), REPO)[:-3].split(os.sep)
      if rel[-1] == "__init__":
        rel = rel[:-1]
      out[".".join(rel)] = os.path.join(dirpath, f)
  return out


MODULES = _modules()
TREES = {name: ast.parse(open(path, encoding="utf-8").read(), path)
         for name, path in MODULES.items()}


def _is_package(module: str, modules: dict[str, str]) -> bool:
  return modules[module].endswith("__init__.py")


def _layer(module: str) -> int | None:
  """The layer of a package module; None for the root package itself."""
  parts = module.split(".")
  if len(parts) == 1:
    return None
  if parts[1] not in LAYER_OF:
    raise AssertionError(f"{module} is in no layer: add {parts[1]!r} to LAYERS in "
                         "tests/test_layout.py (and to the layer order in the README)")
  return LAYER_OF[parts[1]]


def _imports(module: str, tree: ast.AST, top_level_only: bool, modules: dict[str, str] = MODULES):
  """(line, imported package module) for each import of a package module in `tree`.

  `from a.b import c` counts as an import of a.b.c when that is a module (of `modules`), else of
  a.b. With `top_level_only`, imports inside function bodies (which run later, not at import time)
  are left out; class bodies and module-level if/try blocks run at import time and count.
  """
  package = module if _is_package(module, modules) else module.rpartition(".")[0]

  def walk(node):
    for child in ast.iter_child_nodes(node):
      if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        continue
      if isinstance(child, ast.Import):
        for a in child.names:
          if a.name.split(".")[0] == PACKAGE:
            yield child.lineno, a.name
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:  # relative: resolved against this module's package
          anchor = package.split(".")[:len(package.split(".")) - child.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        if base.split(".")[0] != PACKAGE:
          continue
        for a in child.names:
          sub = f"{base}.{a.name}"
          yield child.lineno, sub if sub in modules else base
      yield from walk(child)

  yield from walk(tree)


def _graph(top_level_only: bool, trees: dict[str, ast.AST] = TREES,
           modules: dict[str, str] = MODULES) -> dict[str, set[str]]:
  return {m: {target for _, target in _imports(m, trees[m], top_level_only, modules) if target != m}
          for m in modules}


def _sccs(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's strongly connected components of `graph` (iterative)."""
  index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter[0]
    counter[0] += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in graph:
          continue
        if child not in index:
          index[child] = low[child] = counter[0]
          counter[0] += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          m = stack.pop()
          on_stack.discard(m)
          component.append(m)
          if m == node:
            break
        out.append(sorted(component))
  return out


def _layer_name(i: int) -> str:
  return "/".join(LAYERS[i])


def test_every_module_has_a_layer():
  for m in MODULES:
    _layer(m)


def test_imports_go_to_the_same_or_a_lower_layer():
  bad = []
  for m in sorted(MODULES):
    mine = _layer(m)
    top_level = {target for _, target in _imports(m, TREES[m], top_level_only=True)}
    for line, target in _imports(m, TREES[m], top_level_only=False):
      theirs = _layer(target)
      if (m, target) in UPWARD_ALLOWED and target not in top_level:
        continue
      if mine is not None and theirs is not None and theirs > mine:
        bad.append(f"{MODULES[m]}:{line}: {m} (layer {mine}, {_layer_name(mine)}) imports "
                   f"{target} (layer {theirs}, {_layer_name(theirs)}), a higher layer")
  assert not bad, "imports that run back up the layers:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  return [c for c in _sccs(graph) if len(c) > 1]


def _cycle_imports(cycle: list[str]) -> list[str]:
  """`path:line: a imports b` for every import (module-level or not) between modules of `cycle`."""
  found = {(MODULES[m], line, m, target) for m in cycle
           for line, target in _imports(m, TREES[m], top_level_only=False)
           if target in cycle and target != m}
  return [f"  {path}:{line}: {m} imports {target}" for path, line, m, target in sorted(found)]


def test_no_import_cycles():
  cycles = _cycles(_graph(top_level_only=True))
  assert not cycles, (
      "module-level import cycles (each line: modules that import each other, directly or not):\n"
      + "\n".join(" <-> ".join(c) for c in cycles))


def test_no_import_cycles_through_function_level_imports():
  cycles = _cycles(_graph(top_level_only=False))
  assert not cycles, (
      "import cycles once the imports inside functions count (each: the modules, then the imports "
      "between them):\n" + "\n".join(" <-> ".join(c) + "\n" + "\n".join(_cycle_imports(c))
                                     for c in cycles))


def test_cycle_finder():
  # The checker itself: a 3-cycle, a module importing into it, and one importing nothing.
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
  assert sorted(c for c in _sccs(graph) if len(c) > 1) == [["a", "b", "c"]]


def test_cycle_finder_sees_function_level_imports():
  # The checker itself on made-up sources: a and b import each other only through a function
  # body (a cycle once the function runs); c imports a inside a class body (runs at import time).
  src = {"a": "import os\ndef f():\n  from gemma_mtp_jax import b\n  return b\n",
         "b": "from gemma_mtp_jax import a\n",
         "c": "class C:\n  from gemma_mtp_jax.a import f\n"}
  modules = {f"{PACKAGE}.{name}": f"{name}.py" for name in src}
  trees = {f"{PACKAGE}.{name}": ast.parse(text) for name, text in src.items()}
  a, b, c = sorted(modules)
  assert _graph(True, trees, modules) == {a: set(), b: {a}, c: {a}}
  assert _graph(False, trees, modules) == {a: {b}, b: {a}, c: {a}}
  assert _cycles(_graph(True, trees, modules)) == []
  assert _cycles(_graph(False, trees, modules)) == [[a, b]]


def test_no_module_shadows_the_stdlib_or_a_builtin():
  bad = []
  for m, path in sorted(MODULES.items()):
    name = m.rpartition(".")[2]
    if name in STDLIB or name in BUILTINS:
      bad.append(f"{path}: module {m} is named like the "
                 f"{'stdlib module' if name in STDLIB else 'builtin'} {name!r}")
  assert not bad, "\n".join(bad)


def test_no_alias_shadows_a_stdlib_module():
  bad = []
  for m, tree in sorted(TREES.items()):
    for node in ast.walk(tree):
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      for a in node.names:
        if a.asname is None or a.asname not in STDLIB:
          continue
        source = a.name if isinstance(node, ast.Import) else f"{node.module}.{a.name}"
        if source != a.asname:
          bad.append(f"{MODULES[m]}:{node.lineno}: `{source}` imported as {a.asname!r}, the name "
                     "of a stdlib module")
  assert not bad, "\n".join(bad)


def test_no_module_over_the_line_limit():
  bad = []
  for m, path in sorted(MODULES.items()):
    with open(path, encoding="utf-8") as f:
      n = sum(1 for _ in f)
    if n > MAX_MODULE_LINES:
      bad.append(f"{path}: {n} lines (limit {MAX_MODULE_LINES})")
  assert not bad, "modules over the limit:\n" + "\n".join(bad)


def test_no_function_over_the_line_limit():
  bad = []
  for m, tree in sorted(TREES.items()):
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          bad.append(f"{MODULES[m]}:{node.lineno}: {node.name} is {n} lines "
                     f"(limit {MAX_FUNCTION_LINES})")
  assert not bad, "functions over the limit:\n" + "\n".join(bad)
