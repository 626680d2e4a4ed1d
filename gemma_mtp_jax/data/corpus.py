"""The no-download default data, built from text that ships with Python.

`build_local_corpus` writes (once, into a cache dir) two jsonl files: chat.jsonl (`messages`
schema: pydoc's language-reference topics, module and class docstrings as answers) and code.jsonl
(`problem_solution` schema: stdlib functions and methods, docstring -> source). Data configs name
them `builtin:chat` and `builtin:code`; the tiny tokenizer is trained on their text
(`corpus_texts`).
"""

from __future__ import annotations

import ast
import json
import os
import platform
import sysconfig
import textwrap
from typing import Iterable, Iterator

from gemma_mtp_jax.data.schemas import to_turns
from gemma_mtp_jax.utils import files

BUILTIN = "builtin:"  # builtin:chat / builtin:code, the local corpus
CORPUS_PARTS = ("chat", "code")

_CORPUS_MANIFEST = "manifest.json"
_CORPUS_VERSION = 1
# Not worth learning from, or not Python: tests, GUI/demo code, vendored and generated packages.
_SKIP_DIRS = {"idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data",
              "site-packages", "dist-packages", "__pycache__", "encodings", "venv"}
_MAX_SOURCE_CHARS = 4000  # longer functions would mostly be truncated at small seq_len anyway
_MIN_DOC_CHARS = 40  # one-line docstrings make poor problems
_TOPIC_CHUNK_CHARS = 1800
_SYSTEM_PROMPT = "You are a concise assistant that explains Python and its standard library."


def default_cache_dir() -> str:
  """$GEMMA_MTP_JAX_CACHE, else ~/.cache/gemma_mtp_jax: the local corpus and tiny tokenizer."""
  return (os.environ.get("GEMMA_MTP_JAX_CACHE")
          or os.path.join(os.path.expanduser("~"), ".cache", "gemma_mtp_jax"))


def _chunks(text: str, max_chars: int) -> list[str]:
  """Paragraphs of `text` in chunks of about `max_chars` (a longer paragraph stays whole)."""
  chunks, current = [], ""
  for para in (p.strip() for p in text.split("\n\n")):
    if not para:
      continue
    if current and len(current) + len(para) + 2 > max_chars:
      chunks.append(current)
      current = ""
    current = f"{current}\n\n{para}" if current else para
  return chunks + [current] if current else chunks


def _topic_chats() -> list[dict]:
  """pydoc's language-reference topics as 1- or 2-exchange chats, some with a system turn."""
  from pydoc_data.topics import topics

  chats = []
  for name in sorted(topics):
    chunks = _chunks(topics[name], _TOPIC_CHUNK_CHARS)
    for part in range(0, len(chunks), 2):
      ask = (f"Explain the Python topic '{name}'." if part == 0 else
             f"Tell me more about the Python topic '{name}'.")
      messages = [dict(role="user", content=ask), dict(role="assistant", content=chunks[part])]
      if part + 1 < len(chunks):
        messages += [dict(role="user", content="Go on."),
                     dict(role="assistant", content=chunks[part + 1])]
      if len(chats) % 3 == 0:  # exercise system turns too
        messages.insert(0, dict(role="system", content=_SYSTEM_PROMPT))
      chats.append(dict(messages=messages))
  return chats


def _stdlib_modules() -> Iterator[tuple[str, str]]:
  """(module name, source text) of the pure-Python stdlib, in a fixed (sorted) order."""
  root = sysconfig.get_paths()["stdlib"]
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in _SKIP_DIRS and not d.startswith(("test", "config-", ".")))
    for filename in sorted(filenames):
      if not filename.endswith(".py") or filename.startswith("test"):
        continue
      rel = os.path.relpath(os.path.join(dirpath, filename), root)[:-3]
      module = rel.replace(os.sep, ".").removesuffix(".__init__")
      try:
        with open(os.path.join(dirpath, filename), encoding="utf-8") as f:
          yield module, f.read()
      except (UnicodeDecodeError, OSError):
        continue


def _stdlib_examples() -> tuple[list[dict], list[dict]]:
  """(chat, code) examples from stdlib docstrings and function sources.

  Parsed with `ast`, not imported: importing every stdlib module is slow and some have side effects
  (antigravity opens a browser). The source text is what `inspect.getsource` would return.
  """
  chats, code = [], []
  for module, text in _stdlib_modules():
    try:
      tree = ast.parse(text)
    except SyntaxError:
      continue
    lines = text.splitlines(keepends=True)

    def source_of(node) -> str:
      first = min([node.lineno] + [d.lineno for d in node.decorator_list])
      return textwrap.dedent("".join(lines[first - 1:node.end_lineno])).rstrip()

    def add_problem(node, owner: str | None) -> None:
      doc = ast.get_docstring(node)
      if not doc or len(doc) < _MIN_DOC_CHARS or node.name.startswith("_"):
        return
      source = source_of(node)
      if len(source) > _MAX_SOURCE_CHARS:
        return
      signature = f"{node.name}({ast.unparse(node.args)})"
      what = (f"the Python function `{signature}` for the standard library module `{module}`"
              if owner is None else
              f"the method `{owner}.{signature}` of class `{owner}` in the standard library "
              f"module `{module}`")
      code.append(dict(problem=f"Write {what}. It should do what its docstring says:\n\n{doc}",
                       solution=f"```python\n{source}\n```"))

    doc = ast.get_docstring(tree)
    if doc and len(doc) >= _MIN_DOC_CHARS:
      chats.append(dict(messages=[
          dict(role="user", content=f"What does the Python module `{module}` provide?"),
          dict(role="assistant", content=doc)]))
    for node in tree.body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        add_problem(node, None)
      elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
        doc = ast.get_docstring(node)
        if doc and len(doc) >= _MIN_DOC_CHARS:
          chats.append(dict(messages=[
              dict(role="user", content=f"What is the class `{module}.{node.name}` for?"),
              dict(role="assistant", content=doc)]))
        for item in node.body:
          if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            add_problem(item, node.name)
  return chats, code


def build_local_corpus(out_dir: str) -> dict[str, str]:
  """Writes (once) the default corpus from text that ships with Python; returns {name: jsonl path}.

  chat.jsonl (`messages` schema): pydoc topics, module and class docstrings as answers.
  code.jsonl (`problem_solution` schema): stdlib functions/methods, docstring -> source.
  The content depends on the Python version (3.11: about 1.2k chat and 3.3k code examples, built
  in 3-5 s on 2 cores).
  An existing corpus (its manifest.json) in `out_dir` is reused as is.
  """
  paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in CORPUS_PARTS}
  if not os.path.exists(os.path.join(out_dir, _CORPUS_MANIFEST)):
    with files.atomic_dir(out_dir, marker=_CORPUS_MANIFEST) as tmp:
      chats, code = _stdlib_examples()
      examples = {"chat": _topic_chats() + chats, "code": code}
      for name, rows in examples.items():
        with open(os.path.join(tmp, f"{name}.jsonl"), "w", encoding="utf-8") as f:
          for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
      manifest = dict(version=_CORPUS_VERSION, python=platform.python_version(),
                      **{name: len(rows) for name, rows in examples.items()})
      files.write_json(os.path.join(tmp, _CORPUS_MANIFEST), manifest)
  return paths


def corpus_texts(paths: Iterable[str]) -> Iterator[str]:
  """Every turn's content in the given jsonl files (either schema): tokenizer training text."""
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for line in f:
        for _, content in to_turns(json.loads(line)):
          yield content
