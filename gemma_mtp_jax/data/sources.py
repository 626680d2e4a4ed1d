"""Data sources: datasets rows in one chat schema, loaded from files, the hub or the local corpus,
and split into train / held-out by a hash of each example's content.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import datasets
import numpy as np

from gemma_mtp_jax.data import corpus
from gemma_mtp_jax.utils import files as files_lib
from gemma_mtp_jax.data.chat import (SCHEMA_COLUMNS, DataError, Doc, detect_schema, encode_example,
                                     to_turns)


@dataclasses.dataclass(frozen=True)
class Source:
  """Rows of a `datasets.Dataset` in one schema; `indices` are the rows in this split, in order."""

  name: str
  dataset: datasets.Dataset
  schema: str
  indices: np.ndarray  # int64[N]

  def __len__(self) -> int:
    return len(self.indices)

  def turns(self, i: int) -> list[tuple[str, str]]:
    row = int(self.indices[i])
    try:
      return to_turns(self.dataset[row], self.schema)
    except DataError as e:
      raise DataError(f"data source {self.name!r}, row {row}: {e}") from None

  def encode(self, i: int, tokenizer) -> Doc:
    row = int(self.indices[i])
    try:
      return encode_example(self.dataset[row], tokenizer, self.schema)
    except DataError as e:
      raise DataError(f"data source {self.name!r}, row {row}: {e}") from None

  def select(self, keep: np.ndarray) -> "Source":
    """The sub-source of rows where the bool[N] `keep` is True."""
    return dataclasses.replace(self, indices=self.indices[keep])


def source_from_dataset(dataset: datasets.Dataset, name: str, schema: str | None = None) -> Source:
  """Wraps a loaded dataset; checks it is non-empty and has the schema's columns."""
  if len(dataset) == 0:
    raise DataError(f"data source {name!r} is empty")
  if schema in (None, "", "auto"):
    schema = detect_schema(dataset.column_names, f"data source {name!r}")
  elif schema not in SCHEMA_COLUMNS:
    raise DataError(f"data source {name!r}: unknown schema {schema!r}; expected one of "
                    f"{sorted(SCHEMA_COLUMNS)}")
  missing = [c for c in SCHEMA_COLUMNS[schema] if c not in dataset.column_names]
  if missing:
    raise DataError(f"data source {name!r}: schema {schema!r} needs columns {missing}, "
                    f"it has {dataset.column_names}")
  return Source(name, dataset, schema, np.arange(len(dataset), dtype=np.int64))


_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def spec_dict(spec: str | Mapping[str, Any]) -> dict[str, Any]:
  """A data source spec (a path, or a mapping / ConfigDict with `path`) as a plain dict."""
  if isinstance(spec, str):
    return {"path": spec}
  spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
  if not spec.get("path"):
    raise DataError(f"data source spec {spec} has no 'path'")
  return spec


def _local_files(path: str) -> list[str]:
  """The data files at a local path (a file, or every json/jsonl/parquet file under a dir)."""
  if os.path.isdir(path):
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                   if os.path.splitext(f)[1] in _FORMATS)
    if not files:
      raise DataError(f"data source {path!r}: no {'/'.join(_FORMATS)} files in this directory")
  else:
    files = [path]
  for f in files:
    if os.path.splitext(f)[1] not in _FORMATS:
      raise DataError(f"data source {f!r}: unsupported file type; expected one of "
                      f"{sorted(_FORMATS)}")
    if os.path.getsize(f) == 0:
      raise DataError(f"data source {f!r} is empty")
  if len({_FORMATS[os.path.splitext(f)[1]] for f in files}) > 1:
    raise DataError(f"data source {path!r} mixes json and parquet files")
  return files


def _looks_local(path: str) -> bool:
  # Hub datasets are "org/name" (`files.is_hub_id`: no local "org/") or a bare canonical name;
  # a data file's extension or any other path-like form is local, so a missing one is reported.
  if os.path.splitext(path)[1] in _FORMATS or path.startswith(("/", ".", "~")):
    return True
  return "/" in path and not files_lib.is_hub_id(path)


def _check_utf8(path: str, chunk: int = 1 << 24) -> None:
  """Refuses a JSON data file with a non-UTF-8 byte, as `file:line` (`datasets` would load it
  silently mangled). One streamed pass, at about the speed of reading the file."""
  decoder = codecs.getincrementaldecoder("utf-8")()
  lines = 0
  with open(path, "rb") as f:
    while True:
      pending = decoder.getstate()[0]  # an incomplete character carried over from the last block
      block = f.read(chunk)
      try:
        decoder.decode(block, final=not block)
      except UnicodeDecodeError as e:
        data, bad = pending + block, e.start
        nl = b"\n"
        line = lines - pending.count(nl) + data.count(nl, 0, bad) + 1
        column = bad - (data.rfind(nl, 0, bad) + 1) + 1
        raise DataError(f"data source {path}:{line}: not UTF-8 (byte {data[bad:bad + 1]!r} at "
                        f"column {column})") from None
      if not block:
        return
      lines += block.count(b"\n")


def _bad_json_line(path: str) -> str | None:
  """`file:line: why` for the first row of a JSON / JSON-lines file that is not JSON (a `.json`
  file may also be one JSON document); None when every row parses."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".json"):
    try:
      json.loads(text)
      return None
    except ValueError:
      pass  # not one document: read it as JSON lines below
  for lineno, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      json.loads(line)
    except ValueError as e:
      return f"{path}:{lineno}: invalid JSON ({getattr(e, 'msg', e)})"
  return None


def _load_local(local: str, cache_dir: str | None) -> datasets.Dataset:
  """The rows of local data files; a JSON row that does not decode is named as `file:line`."""
  paths = _local_files(local)
  fmt = _FORMATS[os.path.splitext(paths[0])[1]]
  if fmt == "json":
    for p in paths:
      _check_utf8(p)
  try:
    return datasets.load_dataset(fmt, data_files=paths, split="train", cache_dir=cache_dir)
  except Exception:
    if fmt == "json":  # `datasets` names neither the file nor the line: find them
      for p in paths:
        bad = _bad_json_line(p)
        if bad:
          raise DataError(f"data source {bad}") from None
    raise


def load_source(spec: str | Mapping[str, Any], *, cache_dir: str | None = None,
                corpus_dir: str | None = None) -> Source:
  """Loads one data source with `datasets`.

  Args:
    spec: a path / hub id, or a mapping with `path` and optionally `name` (used in errors),
      `schema` ("messages", "problem_solution", or "auto"), `split` (hub datasets; default "train"),
      `subset` (hub config name), `limit` (keep only the first N rows; 0 = all). `path` is a local
      .json/.jsonl/.parquet file or a dir of them, a hub id ("allenai/tulu-3-sft-mixture"), or
      "builtin:chat" / "builtin:code" (the local corpus, built on first use in `corpus_dir`).
    cache_dir: `datasets`' cache dir (None: its default).
    corpus_dir: where the builtin corpus lives (None: `corpus.default_cache_dir()/corpus`).
  Raises:
    DataError naming the source: missing file, empty data, unreadable file, unknown schema.
  """
  spec = spec_dict(spec)
  path = str(spec["path"])
  if path.startswith(corpus.BUILTIN):
    key = path[len(corpus.BUILTIN):]
    if key not in corpus.CORPUS_PARTS:
      raise DataError(f"data source {path!r}: unknown builtin; expected one of "
                      f"{[corpus.BUILTIN + k for k in corpus.CORPUS_PARTS]}")
    corpus_dir = corpus_dir or os.path.join(corpus.default_cache_dir(), "corpus")
    path = corpus.build_local_corpus(corpus_dir)[key]
  local = os.path.expanduser(path)
  try:
    if os.path.exists(local):
      dataset = _load_local(local, cache_dir)
    elif _looks_local(path):
      raise DataError(f"data source {path!r}: file not found")
    else:
      dataset = datasets.load_dataset(path, spec.get("subset") or None,
                                      split=spec.get("split") or "train", cache_dir=cache_dir)
  except DataError:
    raise
  except Exception as e:  # datasets raises many types; the user needs the source and the cause
    raise DataError(f"data source {path!r}: could not load it ({type(e).__name__}: {e})") from e
  if spec.get("limit"):
    dataset = dataset.select(range(min(int(spec["limit"]), len(dataset))))
  # Errors from here on name both the config's name for the source and the file behind it.
  name = f"{spec['name']} ({path})" if spec.get("name") else path
  return source_from_dataset(dataset, name, spec.get("schema"))


def _split_keys(*columns: list, schema: str) -> dict[str, list[float]]:
  """Batched: each example's position in [0, 1), a hash of its normalized turns."""
  keys = []
  for values in zip(*columns):
    turns = to_turns(dict(zip(SCHEMA_COLUMNS[schema], values)), schema)
    digest = hashlib.blake2b(json.dumps(turns, ensure_ascii=False).encode(), digest_size=8).digest()
    keys.append((int.from_bytes(digest, "little") >> 11) / 2.0**53)
  return {"split_key": keys}


def split_source(source: Source, eval_fraction: float) -> tuple[Source, Source]:
  """(train, eval): an example is held out iff the hash of its content is < eval_fraction.

  Hashing content rather than row numbers keeps exact duplicates on the same side (no eval leak) and
  the split is the same for every training seed and row order. `datasets` caches the hashes of
  cached datasets, so a large hub dataset pays for them once.
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
  if eval_fraction == 0.0:
    return source, source.select(np.zeros(len(source), bool))
  try:
    keys = source.dataset.map(
        _split_keys, batched=True, input_columns=list(SCHEMA_COLUMNS[source.schema]),
        remove_columns=source.dataset.column_names, fn_kwargs={"schema": source.schema},
        desc=f"hashing {source.name} for the eval split")
  except DataError as e:
    raise DataError(f"data source {source.name!r}: {e}") from None
  is_eval = np.asarray(keys["split_key"])[source.indices] < eval_fraction
  return source.select(~is_eval), source.select(is_eval)
