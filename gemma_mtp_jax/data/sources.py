"""Data sources: datasets rows in one chat schema, loaded from files, a `datasets.save_to_disk`
dir, the hub or the local corpus, and split into train / held-out by a hash of each example's
content. A local source remembers which file each row came from: its errors name the file and the
record's index in it, and relative image paths resolve against that file's dir.
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

from gemma_mtp_jax.data import corpus, vision_qa
from gemma_mtp_jax.utils import files as files_lib
from gemma_mtp_jax.data.chat import DataError, Doc, encode_example
from gemma_mtp_jax.data.schemas import AUTO, detect_schema, get_schema, to_turns


@dataclasses.dataclass(frozen=True)
class Source:
  """Rows of a `datasets.Dataset` in one registered schema (`schemas`, by name); `indices` are the
  rows in this split, in order."""

  name: str
  dataset: datasets.Dataset
  schema: str
  indices: np.ndarray  # int64[N]
  # (first row, file) of each local data file, in row order; () for hub datasets. A
  # save_to_disk dir is one "file": the dir.
  files: tuple[tuple[int, str], ...] = ()

  def __len__(self) -> int:
    return len(self.indices)

  def _file(self, row: int) -> tuple[int, str] | None:
    starts = [start for start, _ in self.files]
    k = int(np.searchsorted(starts, row, side="right")) - 1
    return self.files[k] if k >= 0 else None

  def where(self, row: int) -> str:
    """`record k` (k: the row's index in its file; `file record k` for a dir of files) for local
    data, else `row N`."""
    found = self._file(row)
    if not found:
      return f"row {row}"
    # One file: the source's name already names it.
    return f"record {row}" if len(self.files) == 1 else f"{found[1]} record {row - found[0]}"

  def base_dir(self, row: int) -> str | None:
    """The dir relative image paths of `row` resolve against: its data file's dir."""
    found = self._file(row)
    if found is None:
      return None
    return found[1] if os.path.isdir(found[1]) else os.path.dirname(os.path.abspath(found[1]))

  def turns(self, i: int) -> list[tuple[str, Any]]:
    row = int(self.indices[i])
    try:
      return to_turns(self.dataset[row], self.schema)
    except DataError as e:
      raise DataError(f"data source {self.name!r}, {self.where(row)}: {e}") from None

  def encode(self, i: int, tokenizer, image_processor=None) -> Doc:
    """Example i as a document (`chat.encode_example`); errors name the file and record."""
    row = int(self.indices[i])
    try:
      doc = encode_example(self.dataset[row], tokenizer, self.schema,
                           image_processor=image_processor, base_dir=self.base_dir(row))
    except DataError as e:
      raise DataError(f"data source {self.name!r}, {self.where(row)}: {e}") from None
    if "image_spans" in doc:  # packing names it if its images cannot fit a row
      doc["record"] = f"data source {self.name!r}, {self.where(row)}"
    return doc

  def select(self, keep: np.ndarray) -> "Source":
    """The sub-source of rows where the bool[N] `keep` is True."""
    return dataclasses.replace(self, indices=self.indices[keep])


def source_from_dataset(dataset: datasets.Dataset, name: str, schema: str | None = None,
                        files: tuple[tuple[int, str], ...] = ()) -> Source:
  """Wraps a loaded dataset; checks it is non-empty and has the columns of `schema` (a registered
  schema's name; None, "" or "auto": the first registered schema whose columns it has)."""
  if len(dataset) == 0:
    raise DataError(f"data source {name!r} is empty")
  if schema in AUTO:
    schema = detect_schema(dataset.column_names, f"data source {name!r}")
  missing = [c for c in get_schema(schema, f"data source {name!r}").columns
             if c not in dataset.column_names]
  if missing:
    raise DataError(f"data source {name!r}: schema {schema!r} needs columns {missing}, "
                    f"it has {dataset.column_names}")
  return Source(name, dataset, schema, np.arange(len(dataset), dtype=np.int64), files)


VISION_QA = "vision_qa"  # builtin:vision_qa, the generated image QA set (`vision_qa`)
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


def _is_saved_dataset(path: str) -> bool:
  """A dir written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
  return os.path.isdir(path) and any(
      os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def _rows_in(path: str) -> int | None:
  """The rows `datasets` reads from one data file, counted cheaply; None when unsure."""
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".json"):
    try:
      doc = json.loads(text)
      return len(doc) if isinstance(doc, list) else None
    except ValueError:
      pass  # JSON lines
  return sum(1 for line in text.split("\n") if line.strip())


def _file_starts(paths: list[str], total: int) -> tuple[tuple[int, str], ...]:
  """(first row, file) per file, when the files' row counts add up to what `datasets` loaded."""
  if len(paths) == 1:
    return ((0, paths[0]),)
  counts = [_rows_in(p) for p in paths]
  if None in counts or sum(counts) != total:
    return ()
  return tuple(zip(np.cumsum([0] + counts[:-1]).tolist(), paths))


def _load_saved(local: str, split: str | None) -> datasets.Dataset:
  loaded = datasets.load_from_disk(local)
  if isinstance(loaded, datasets.DatasetDict):
    split = split or "train"
    if split not in loaded:
      raise DataError(f"data source {local!r}: no split {split!r}; it has {sorted(loaded)}")
    loaded = loaded[split]
  return loaded


def _load_local(local: str, cache_dir: str | None,
                split: str | None = None) -> tuple[datasets.Dataset, tuple[tuple[int, str], ...]]:
  """The rows of local data files (or a save_to_disk dir) and (first row, file) of each file; a
  JSON row that does not decode is named as `file:line`."""
  if _is_saved_dataset(local):
    return _load_saved(local, split), ((0, local),)
  paths = _local_files(local)
  fmt = _FORMATS[os.path.splitext(paths[0])[1]]
  if fmt == "json":
    for p in paths:
      _check_utf8(p)
  try:
    dataset = datasets.load_dataset(fmt, data_files=paths, split="train", cache_dir=cache_dir)
  except Exception:
    if fmt == "json":  # `datasets` names neither the file nor the line: find them
      for p in paths:
        bad = _bad_json_line(p)
        if bad:
          raise DataError(f"data source {bad}") from None
    raise
  return dataset, _file_starts(paths, len(dataset))


def _rename_columns(dataset: datasets.Dataset, columns: Mapping[str, str] | None,
                    path: str) -> datasets.Dataset:
  """`columns` maps a schema's column name to the dataset's (e.g. {"image": "img"})."""
  if not columns:
    return dataset
  columns = dict(columns)
  missing = [theirs for theirs in columns.values() if theirs not in dataset.column_names]
  if missing:
    raise DataError(f"data source {path!r}: columns {missing} (from the spec's 'columns') are not "
                    f"in the data; it has {dataset.column_names}")
  drop = [ours for ours, theirs in columns.items()
          if ours in dataset.column_names and ours != theirs and ours not in columns.values()]
  dataset = dataset.remove_columns(drop)
  return dataset.rename_columns({theirs: ours for ours, theirs in columns.items() if ours != theirs})


def _builtin(path: str, corpus_dir: str | None) -> str:
  """The local file behind a `builtin:` source, built on first use."""
  key = path[len(corpus.BUILTIN):]
  builtins = [*corpus.CORPUS_PARTS, VISION_QA]
  if key not in builtins:
    raise DataError(f"data source {path!r}: unknown builtin; expected one of "
                    f"{[corpus.BUILTIN + k for k in builtins]}")
  corpus_dir = corpus_dir or os.path.join(corpus.default_cache_dir(), "corpus")
  if key == VISION_QA:
    return vision_qa.build_vision_qa(os.path.join(corpus_dir, f"{VISION_QA}_v{vision_qa.VERSION}"))
  return corpus.build_local_corpus(corpus_dir)[key]


def load_source(spec: str | Mapping[str, Any], *, cache_dir: str | None = None,
                corpus_dir: str | None = None) -> Source:
  """Loads one data source with `datasets`.

  Args:
    spec: a path / hub id, or a mapping with `path` and optionally `name` (used in errors),
      `schema` (a registered schema's name, `schemas.SCHEMAS`, or "auto"), `split` (hub
      datasets; default "train"), `subset` (hub config name), `limit` (keep only the first N
      rows; 0 = all), `columns` (a schema column -> the data's column name, e.g. {"image":
      "img", "answer": "label"} for the `image_qa` schema). `path` is a local
      .json/.jsonl/.parquet file or a dir of them, a `datasets` save_to_disk dir (e.g. with an
      Image column; `split` picks a DatasetDict's), a hub id ("allenai/tulu-3-sft-mixture"), or
      "builtin:chat" / "builtin:code" (the local corpus, built on first use in `corpus_dir`) or
      "builtin:vision_qa" (the generated image QA set, in `corpus_dir`/vision_qa_v<VERSION>).
    cache_dir: `datasets`' cache dir (None: its default).
    corpus_dir: where the builtin corpus lives (None: `corpus.default_cache_dir()/corpus`).
  Raises:
    DataError naming the source: missing file, empty data, unreadable file, unknown schema.
  """
  spec = spec_dict(spec)
  path = str(spec["path"])
  if path.startswith(corpus.BUILTIN):
    path = _builtin(path, corpus_dir)
  # Errors from here on name both the config's name for the source and the file behind it.
  name = f"{spec['name']} ({path})" if spec.get("name") else path
  if spec.get("schema") not in AUTO:  # a misspelt schema is reported before a hub download
    get_schema(spec["schema"], f"data source {name!r}")
  local = os.path.expanduser(path)
  files = ()
  try:
    if os.path.exists(local):
      dataset, files = _load_local(local, cache_dir, spec.get("split") or None)
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
  dataset = _rename_columns(dataset, spec.get("columns"), path)
  return source_from_dataset(dataset, name, spec.get("schema"), files)


def _split_keys(*columns: list, schema: str) -> dict[str, list[float]]:
  """Batched: each example's position in [0, 1), a hash of its normalized turns."""
  keys, found = [], get_schema(schema)
  for values in zip(*columns):
    turns = found.to_turns(dict(zip(found.columns, values)))
    text = json.dumps(turns, ensure_ascii=False, default=lambda part: {"image": part.key()})
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
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
        _split_keys, batched=True, input_columns=list(get_schema(source.schema).columns),
        remove_columns=source.dataset.column_names, fn_kwargs={"schema": source.schema},
        desc=f"hashing {source.name} for the eval split")
  except DataError as e:
    raise DataError(f"data source {source.name!r}: {e}") from None
  is_eval = np.asarray(keys["split_key"])[source.indices] < eval_fraction
  return source.select(~is_eval), source.select(is_eval)
