"""Training data: chat examples -> Gemma 4 chat tokens -> packed, segment-masked rows.

The pipeline, in the order of this file:

  source (`datasets`: hub id or local json/jsonl/parquet; schema `messages` or `problem_solution`)
    -> held-out split by a hash of each example's content (independent of the training seed)
    -> weighted mixture (e.g. Tulu-3 80% / Magicoder 20%), a fixed function of (seed, doc index)
    -> `encode_example`: Gemma 4 chat tokens + a loss mask on what the model must produce
    -> `pack_batch`: documents laid end to end in fixed-length rows, with segment ids and positions
    -> `DataIterator`: resumable from a dict of ints; each process takes its rows of a global batch

Batches are dicts of numpy arrays, B rows of T tokens:
  tokens       int32[B, T]
  segment_ids  int32[B, T]  0 = padding, 1, 2, ... = the documents of the row, in order
  positions    int32[B, T]  restart at 0 in every document (0 on padding)
  loss_mask    bool[B, T]   tokens[b, t] is produced by the model: model-turn content or its closing
                            `<turn|>`. Prompt, user/system turns, role headers, padding are False.

Nothing is shifted. The base model's target at position t is tokens[t + 1] when
segment_ids[t + 1] == segment_ids[t] != 0, weighted by loss_mask[t + 1]; the drafter's k-step-ahead
targets come from the same arrays. Every document starts with `<bos>` (never a target), so a target
never has to cross a document boundary.

A document longer than T is truncated to its first T tokens (prompt first, then as much of the
answer as fits): splitting it would start rows with answer text whose prompt the model cannot see.
A document with no loss token left in its first T tokens is skipped: it costs compute, teaches
nothing.

`build_local_corpus` makes the no-download default data from Python's own documentation: pydoc
topics and docstrings as chat, stdlib functions with their docstrings as code problems.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import platform
import sysconfig
import textwrap
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import datasets
import ml_collections
import numpy as np

from gemma_mtp_jax.data.tokenizer import (BOS, TURN_CLOSE, TURN_OPEN, atomic_dir, build_tiny_tokenizer,
                                     load_tokenizer)

Batch = dict[str, np.ndarray]
Doc = dict[str, np.ndarray]  # tokens int32[L], loss_mask bool[L]

MESSAGES = "messages"  # Tulu-3: messages = [{role, content}, ...]
PROBLEM_SOLUTION = "problem_solution"  # Magicoder OSS-Instruct: problem (user), solution (model)
SCHEMA_COLUMNS = {MESSAGES: ("messages",), PROBLEM_SOLUTION: ("problem", "solution")}

# Dataset roles -> Gemma 4 roles. Gemma 4's template spells the assistant `model` and renders a
# system (or developer) message as its own `system` turn.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "model",
         "model": "model"}
MODEL_ROLE = "model"


class DataError(ValueError):
  """Bad data or data config; the message names the source (file, dir or hub id) at fault."""


# ---------------------------------------------------------------------------------- schemas


def detect_schema(columns: Iterable[str], where: str = "example") -> str:
  """The schema whose columns `columns` has: `messages` first, then `problem_solution`."""
  columns = list(columns)
  for schema, needed in SCHEMA_COLUMNS.items():
    if set(needed) <= set(columns):
      return schema
  raise DataError(
      f"{where}: unknown schema; it has columns {columns}, expected 'messages' (a list of "
      "{role, content}) or 'problem' + 'solution'")


def _text(value: Any, what: str) -> str:
  if value is None:
    return ""
  if isinstance(value, str):
    return value
  # Multimodal-style content: [{"type": "text", "text": ...}, ...]; only text parts exist here.
  if isinstance(value, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                     for p in value):
    return "".join(p.get("text") or "" for p in value)
  raise DataError(f"{what} must be a string (or a list of text parts), got {type(value).__name__}")


def to_turns(example: Mapping[str, Any], schema: str | None = None) -> list[tuple[str, str]]:
  """One example of either schema -> [(gemma_role, content), ...] with roles system/user/model."""
  schema = schema or detect_schema(example.keys())
  if schema == MESSAGES:
    turns = []
    for i, message in enumerate(example["messages"] or ()):
      role = ROLES.get(message.get("role"))
      if role is None:
        raise DataError(f"message {i} has role {message.get('role')!r}; expected one of "
                        f"{sorted(ROLES)}")
      turns.append((role, _text(message.get("content"), f"message {i} content")))
    return turns
  if schema == PROBLEM_SOLUTION:
    return [("user", _text(example["problem"], "problem")),
            (MODEL_ROLE, _text(example["solution"], "solution"))]
  raise DataError(f"unknown schema {schema!r}; expected one of {sorted(SCHEMA_COLUMNS)}")


# ---------------------------------------------------------------------------------- chat format


def chat_pieces(turns: Sequence[tuple[str, str]]) -> list[tuple[str, bool, bool]]:
  """Gemma 4's rendering of `turns` as (text, is_control_token, is_target) pieces, in order.

  `<bos>` then, per turn, `<|turn>{role}\\n{content.strip()}<turn|>\\n`. Targets are a model turn's
  content and its `<turn|>`: what the model generates after the `<|turn>model\\n` prompt, up to the
  token it stops on. The "\\n" after `<turn|>` is never generated, so never a target.
  """
  pieces = [(BOS, True, False)]
  for role, content in turns:
    is_model = role == MODEL_ROLE
    pieces.append((TURN_OPEN, True, False))
    if is_model:
      pieces += [(f"{role}\n", False, False), (content.strip(), False, True)]
    else:  # one text piece, tokenized exactly as in the whole rendered string
      pieces.append((f"{role}\n{content.strip()}", False, False))
    pieces += [(TURN_CLOSE, True, is_model), ("\n", False, False)]
  return pieces


def render_chat(turns: Sequence[tuple[str, str]]) -> str:
  """The chat text that `encode_example` tokenizes (what Gemma 4's chat template writes)."""
  return "".join(text for text, _, _ in chat_pieces(turns))


_CONTROL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def control_ids(tokenizer) -> dict[str, int]:
  """{`<bos>`, `<|turn>`, `<turn|>`} -> their ids in `tokenizer`; never assumed, vocabs differ."""
  ids = _CONTROL_IDS.get(tokenizer)
  if ids is None:
    ids = {BOS: tokenizer.bos_token_id}
    for name in (TURN_OPEN, TURN_CLOSE):
      ids[name] = tokenizer.convert_tokens_to_ids(name)
    missing = [n for n, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
      raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no {missing} "
                      "token(s); Gemma 4 chat data needs a Gemma 4 tokenizer")
    _CONTROL_IDS[tokenizer] = ids
  return ids


def encode_example(example: Mapping[str, Any], tokenizer, schema: str | None = None) -> Doc:
  """One example -> Gemma 4 chat tokens and the mask of tokens the model must produce.

  Returns:
    tokens: int32[L], starting with `<bos>`.
    loss_mask: bool[L], True exactly on model-turn content tokens and their closing `<turn|>`.
  """
  pieces = chat_pieces(to_turns(example, schema))
  ids = control_ids(tokenizer)
  texts = [text for text, is_control, _ in pieces if not is_control]
  # split_special_tokens: a literal "<|turn>" inside the data stays text and cannot forge a turn
  # boundary (tokenizing the template's rendered string would turn it into the control token).
  encoded = iter(tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"])
  tokens, loss_mask = [], []
  for text, is_control, is_target in pieces:
    piece = [ids[text]] if is_control else next(encoded)
    tokens += piece
    loss_mask += [is_target] * len(piece)
  return dict(tokens=np.asarray(tokens, np.int32), loss_mask=np.asarray(loss_mask, bool))


# ---------------------------------------------------------------------------------- sources


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
BUILTIN = "builtin:"  # builtin:chat / builtin:code, the local corpus
CORPUS_PARTS = ("chat", "code")


def _spec_dict(spec: str | Mapping[str, Any]) -> dict[str, Any]:
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
  # Hub ids are "org/name"; anything path-like that does not exist is a missing file, not a hub id.
  return (path.startswith(("/", ".", "~")) or os.path.splitext(path)[1] in _FORMATS
          or path.count("/") > 1)


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
    corpus_dir: where the builtin corpus lives (None: `default_cache_dir()/corpus`).
  Raises:
    DataError naming the source: missing file, empty data, unreadable file, unknown schema.
  """
  spec = _spec_dict(spec)
  path = str(spec["path"])
  if path.startswith(BUILTIN):
    key = path[len(BUILTIN):]
    if key not in CORPUS_PARTS:
      raise DataError(f"data source {path!r}: unknown builtin; expected one of "
                      f"{[BUILTIN + k for k in CORPUS_PARTS]}")
    path = build_local_corpus(corpus_dir or os.path.join(default_cache_dir(), "corpus"))[key]
  local = os.path.expanduser(path)
  try:
    if os.path.exists(local):
      files = _local_files(local)
      fmt = _FORMATS[os.path.splitext(files[0])[1]]
      dataset = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=cache_dir)
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


# ---------------------------------------------------------------------------------- mixture


class Mixture:
  """The training stream's document order: a pure function of (seed, doc index, per-source count).

  Document n comes from source `source(n)`, drawn with probability weights[s] (by document, as the
  NeMo Tulu/Magicoder recipe interleaves examples). The k-th draw from source s is its example
  `example(s, k)`: each epoch of a source is a fresh permutation, so every example is seen once per
  epoch and small sources simply repeat more often.
  """

  def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int,
               block_size: int = 4096):
    w = np.asarray(weights, np.float64)
    if len(sizes) != len(w) or not len(w) or (w <= 0).any() or not np.isfinite(w).all():
      raise DataError(f"mixture weights must be positive, one per source; got {list(weights)}")
    self.sizes = [int(s) for s in sizes]
    self.weights = w / w.sum()
    self.seed = int(seed)
    self.block_size = block_size
    self._cdf = np.cumsum(self.weights)
    self._cdf[-1] = 1.0
    self._block = (-1, None)
    self._perms: dict[int, tuple[int, np.ndarray]] = {}

  def source(self, n: int) -> int:
    # Choices come in blocks drawn from a generator keyed by (seed, block), so any n is O(1) to
    # reach: resuming never replays the stream.
    b, i = divmod(n, self.block_size)
    if self._block[0] != b:
      u = np.random.default_rng([self.seed, 0, b]).random(self.block_size)
      self._block = (b, np.searchsorted(self._cdf, u, side="right"))
    return int(self._block[1][i])

  def example(self, s: int, k: int) -> int:
    epoch, i = divmod(k, self.sizes[s])
    cached = self._perms.get(s)
    if cached is None or cached[0] != epoch:
      cached = (epoch, np.random.default_rng([self.seed, 1, s, epoch]).permutation(self.sizes[s]))
      self._perms[s] = cached
    return int(cached[1][i])


# ---------------------------------------------------------------------------------- packing


class DocStream(Protocol):
  """What `pack_batch` reads: the current document (None at the end) and a step past it."""

  def peek(self) -> Doc | None: ...

  def advance(self) -> None: ...


class ListStream:
  """A finite stream of documents `get(0) ... get(length - 1)`, each built when first peeked."""

  def __init__(self, get: Callable[[int], Doc], length: int):
    self._get, self._length, self.index, self._doc = get, length, 0, None

  def peek(self) -> Doc | None:
    if self.index >= self._length:
      return None
    if self._doc is None:
      self._doc = self._get(self.index)
    return self._doc

  def advance(self) -> None:
    self.index, self._doc = self.index + 1, None


# Documents skipped in a row before packing gives up: the data has (almost) no model turns.
_MAX_SKIPS = 10_000


def pack_batch(stream: DocStream, seq_len: int, num_rows: int) -> Batch | None:
  """Greedily lays documents from `stream`, in order, into `num_rows` rows of `seq_len` tokens.

  A document that does not fit in what is left of a row starts the next row; one longer than
  `seq_len` is truncated; one with no loss token in its first `seq_len` tokens is skipped. The
  document that does not fit in the last row stays in the stream for the next batch.
  Returns None if the stream ends before any document is packed; otherwise the batch described in
  the module docstring, rows after the stream's end being padding.
  """
  tokens_BxT = np.zeros((num_rows, seq_len), np.int32)
  segment_ids_BxT = np.zeros((num_rows, seq_len), np.int32)
  positions_BxT = np.zeros((num_rows, seq_len), np.int32)
  loss_mask_BxT = np.zeros((num_rows, seq_len), bool)
  row, col, segment, packed, skips = 0, 0, 0, 0, 0
  while row < num_rows:
    doc = stream.peek()
    if doc is None:
      break
    length = min(len(doc["tokens"]), seq_len)
    if not doc["loss_mask"][:length].any():
      stream.advance()
      skips += 1
      if skips > _MAX_SKIPS:
        raise DataError(f"{_MAX_SKIPS} documents in a row have no model-turn tokens in their "
                        f"first {seq_len} tokens; check the data's roles or raise seq_len")
      continue
    skips = 0
    if col + length > seq_len:
      row, col, segment = row + 1, 0, 0
      continue
    segment += 1
    span = slice(col, col + length)
    tokens_BxT[row, span] = doc["tokens"][:length]
    segment_ids_BxT[row, span] = segment
    positions_BxT[row, span] = np.arange(length)
    loss_mask_BxT[row, span] = doc["loss_mask"][:length]
    col += length
    packed += 1
    stream.advance()
  if not packed:
    return None
  return dict(tokens=tokens_BxT, segment_ids=segment_ids_BxT, positions=positions_BxT,
              loss_mask=loss_mask_BxT)


def _process_rows(batch: Batch, process_index: int, process_count: int) -> Batch:
  rows = len(batch["tokens"]) // process_count
  return {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} is not in [0, process_count={process_count})")
  if batch_size % process_count:
    raise DataError(f"global batch_size {batch_size} is not divisible by process_count "
                    f"{process_count}")


# ---------------------------------------------------------------------------------- iterator


class _MixtureStream:
  """The infinite training stream of encoded documents drawn by a `Mixture`."""

  def __init__(self, sources: Sequence[Source], weights: Sequence[float], tokenizer, seed: int):
    self.sources, self.tokenizer = list(sources), tokenizer
    self.mixture = Mixture([len(s) for s in sources], weights, seed)
    self.doc = 0  # index of the current document in the stream
    self.seen = [0] * len(sources)  # documents drawn from each source so far
    self._current: tuple[int, Doc] | None = None

  def peek(self) -> Doc:
    if self._current is None or self._current[0] != self.doc:
      s = self.mixture.source(self.doc)
      k = self.mixture.example(s, self.seen[s])
      self._current = (self.doc, self.sources[s].encode(k, self.tokenizer))
    return self._current[1]

  def advance(self) -> None:
    self.seen[self.mixture.source(self.doc)] += 1
    self.doc += 1


class DataIterator:
  """Infinite iterator of packed training batches; this process's rows of each global batch.

  Every process packs the same global batch (packing is sequential in the document stream) and keeps
  rows [process_index * B / P, (process_index + 1) * B / P), so the processes' rows are disjoint
  documents and together are exactly the single-process batch.

  The state is a dict of ints, e.g. {"step": 12, "doc": 3402, "seen_0": 2731, "seen_1": 671}:
  batches produced, the next document of the mixture stream, and documents drawn per source (source
  s is in epoch seen_s // len(source s)). `set_state(get_state())` on a fresh iterator built with
  the same config continues with exactly the batches the original would have produced.

  Costs: every process encodes every document of the global batch (cheap next to a training step for
  Gemma-sized models; a shared prefetch thread would be the next step if it ever is not).
  """

  def __init__(self, sources: Sequence[Source], weights: Sequence[float], tokenizer, *,
               seq_len: int, batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    _check_sharding(batch_size, process_index, process_count)
    for s in sources:
      if not len(s):
        raise DataError(f"data source {s.name!r} has no training examples")
    self._stream = _MixtureStream(sources, weights, tokenizer, seed)
    self.seq_len, self.batch_size = seq_len, batch_size
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = batch_size // process_count
    self._step = 0

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> Batch:
    """Returns this process's rows: each array has shape [batch_size // process_count, seq_len]."""
    batch = pack_batch(self._stream, self.seq_len, self.batch_size)
    self._step += 1
    return _process_rows(batch, self.process_index, self.process_count)

  def get_state(self) -> dict[str, int]:
    state = {"step": self._step, "doc": self._stream.doc}
    state.update({f"seen_{i}": n for i, n in enumerate(self._stream.seen)})
    return state

  def set_state(self, state: Mapping[str, Any]) -> None:
    want = set(self.get_state())
    if set(state) != want:
      raise DataError(f"data iterator state has keys {sorted(state)}, expected {sorted(want)} "
                      "(was it saved with a different number of sources?)")
    self._step = int(state["step"])
    self._stream.doc = int(state["doc"])
    self._stream.seen = [int(state[f"seen_{i}"]) for i in range(len(self._stream.seen))]


def make_eval_batches(sources: Sequence[Source], tokenizer, *, seq_len: int, batch_size: int,
                      max_batches: int = 0, process_index: int = 0,
                      process_count: int = 1) -> list[Batch]:
  """Packs the held-out examples, sources interleaved round-robin, into a fixed list of batches.

  Args:
    max_batches: keep at most this many global batches (0 = all held-out examples).
  Returns:
    this process's rows of each batch; the last batch is padded (segment id 0) where data runs out.
  """
  _check_sharding(batch_size, process_index, process_count)
  longest = max((len(s) for s in sources), default=0)
  order = [(s, i) for i in range(longest) for s in range(len(sources)) if i < len(sources[s])]
  stream = ListStream(lambda j: sources[order[j][0]].encode(order[j][1], tokenizer), len(order))
  batches = []
  while not max_batches or len(batches) < max_batches:
    batch = pack_batch(stream, seq_len, batch_size)
    if batch is None:
      break
    batches.append(_process_rows(batch, process_index, process_count))
  return batches


# ---------------------------------------------------------------------------------- local corpus

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
    with atomic_dir(out_dir, _CORPUS_MANIFEST) as tmp:
      chats, code = _stdlib_examples()
      examples = {"chat": _topic_chats() + chats, "code": code}
      for name, rows in examples.items():
        with open(os.path.join(tmp, f"{name}.jsonl"), "w", encoding="utf-8") as f:
          for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
      manifest = dict(version=_CORPUS_VERSION, python=platform.python_version(),
                      **{name: len(rows) for name, rows in examples.items()})
      with open(os.path.join(tmp, _CORPUS_MANIFEST), "w") as f:
        json.dump(manifest, f)
  return paths


def corpus_texts(paths: Iterable[str]) -> Iterator[str]:
  """Every turn's content in the given jsonl files (either schema): tokenizer training text."""
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for line in f:
        for _, content in to_turns(json.loads(line)):
          yield content


# ---------------------------------------------------------------------------------- configs


def default_data_config() -> ml_collections.ConfigDict:
  """The tiny run: the local corpus, 80% chat / 20% code, and a tokenizer trained on it."""
  cfg = ml_collections.ConfigDict()
  cfg.sources = [
      dict(name="chat", path=BUILTIN + "chat", weight=0.8, schema=MESSAGES),
      dict(name="code", path=BUILTIN + "code", weight=0.2, schema=PROBLEM_SOLUTION),
  ]
  cfg.eval_fraction = 0.02  # of each source's examples, chosen by content hash
  cfg.eval_max_batches = 4  # 0 = every held-out example
  cfg.corpus_dir = ""  # "" = <default_cache_dir()>/corpus
  cfg.hf_cache_dir = ""  # "" = datasets' default cache
  cfg.tokenizer = ""  # dir or hub id; "" = the tiny tokenizer trained on the local corpus
  cfg.tiny_vocab_size = 4096
  return cfg


def tulu_magicoder_data_config() -> ml_collections.ConfigDict:
  """The NeMo joint-drafter recipe's text mix: Tulu-3 SFT 80% / Magicoder OSS-Instruct 20%."""
  cfg = default_data_config()
  cfg.sources = [
      dict(name="tulu3", path="allenai/tulu-3-sft-mixture", weight=0.8, schema=MESSAGES,
           split="train"),
      dict(name="magicoder", path="ise-uiuc/Magicoder-OSS-Instruct-75K", weight=0.2,
           schema=PROBLEM_SOLUTION, split="train"),
  ]
  cfg.eval_fraction = 0.002  # ~1.9k Tulu + ~150 Magicoder examples
  cfg.eval_max_batches = 16
  cfg.tokenizer = "google/gemma-4-E4B-it"
  return cfg


def _corpus_dir(data_cfg) -> str:
  return data_cfg.get("corpus_dir") or os.path.join(default_cache_dir(), "corpus")


def tokenizer_from_config(data_cfg):
  """`data_cfg.tokenizer` if set, else the tiny tokenizer of the local corpus (built once)."""
  if data_cfg.get("tokenizer"):
    return load_tokenizer(data_cfg.tokenizer)
  corpus_dir = _corpus_dir(data_cfg)
  corpus = build_local_corpus(corpus_dir)
  vocab_size = int(data_cfg.get("tiny_vocab_size") or 4096)
  return build_tiny_tokenizer(corpus_texts(corpus.values()),
                              os.path.join(corpus_dir, f"tokenizer_{vocab_size}"), vocab_size)


def make_datasets(data_cfg, tokenizer, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0,
                  process_count: int = 1) -> tuple[DataIterator, list[Batch]]:
  """Builds the training iterator and the fixed eval batches from a data config.

  Args:
    data_cfg: `default_data_config()`-shaped: `sources` (list of {path, weight, schema, name, split,
      subset, limit}), `eval_fraction`, `eval_max_batches`, `corpus_dir`, `hf_cache_dir`.
    tokenizer: an HF Gemma 4 tokenizer (or the tiny one).
    seq_len, batch_size: row length T and *global* rows per batch B.
    seed: the mixture order; the eval split does not depend on it.
    process_index, process_count: this process's share, B / process_count rows of each batch.
  Returns:
    (train_iter, eval_batches): an infinite `DataIterator` and a list of batches, both yielding
    dicts of tokens/segment_ids/positions/loss_mask of shape [B / process_count, T].
  """
  if not data_cfg.sources:
    raise DataError("data config has no sources")
  train, held_out, weights = [], [], []
  for spec in data_cfg.sources:
    spec = _spec_dict(spec)
    source = load_source(spec, cache_dir=data_cfg.get("hf_cache_dir") or None,
                         corpus_dir=_corpus_dir(data_cfg))
    train_part, eval_part = split_source(source, float(data_cfg.get("eval_fraction", 0.0)))
    train.append(train_part)
    held_out.append(eval_part)
    weights.append(float(spec.get("weight", 1.0)))
  train_iter = DataIterator(train, weights, tokenizer, seq_len=seq_len, batch_size=batch_size,
                            seed=seed, process_index=process_index, process_count=process_count)
  eval_batches = make_eval_batches(
      held_out, tokenizer, seq_len=seq_len, batch_size=batch_size,
      max_batches=int(data_cfg.get("eval_max_batches", 0)), process_index=process_index,
      process_count=process_count)
  return train_iter, eval_batches
