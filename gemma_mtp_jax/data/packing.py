"""Documents -> fixed-length packed rows: the training mixture, packing, the resumable iterator.

Batches are dicts of numpy arrays, B rows of T tokens, laid out as `batch_layout` says (the arrays,
their shapes and dtypes, and what each entry means are written there, once).

A document longer than T is truncated to its first T tokens (prompt first, then as much of the
answer as fits): splitting it would start rows with answer text whose prompt the model cannot see.
A document with no loss token left in its first T tokens is skipped: it costs compute, teaches
nothing. Truncation never cuts an image's token block: it cuts before the block instead (and drops
that image and the ones after it). A document whose images do not fit in the free slots of a row
starts the next row; one with more images (within its first T tokens) than a row has slots is a
DataError naming its record: the data config's `max_images_per_row` must be raised, silently
dropping such documents would bias the data.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from gemma_mtp_jax.data import batch_layout
from gemma_mtp_jax.data import images as images_lib
from gemma_mtp_jax.data.chat import DataError, Doc
from gemma_mtp_jax.data.sources import Source

Batch = dict[str, np.ndarray]

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


def _kept(doc: Doc, seq_len: int) -> tuple[int, int]:
  """(tokens, images) of `doc` that go into a row: its first `seq_len` tokens, cut before an image
  block that would not fit whole, and the images whose blocks are inside."""
  length = min(len(doc["tokens"]), seq_len)
  spans = doc.get("image_spans")
  if spans is None or not len(spans):
    return length, 0
  cut = [int(start) for start, stop in spans if start < length < stop]
  length = cut[0] if cut else length
  return length, int((spans[:, 1] <= length).sum())


def _check_images(doc: Doc, images: int, image_slots) -> None:
  where = doc.get("record", "a document")
  if image_slots is None:
    raise DataError(f"{where} has images but the data config has no image slots (data.vision)")
  if images > image_slots[0]:
    raise DataError(f"{where} has {images} images in its first tokens but a row holds at most "
                    f"{image_slots[0]}; raise the data config's vision.max_images_per_row")
  if doc["pixel_values"].shape[1:] != image_slots[1:]:
    raise DataError(f"{where}: image arrays of shape {doc['pixel_values'].shape[1:]}, the batch's "
                    f"slots are {image_slots[1:]}")


def pack_batch(stream: DocStream, seq_len: int, num_rows: int,
               image_slots: tuple[int, int, int] | None = None) -> Batch | None:
  """Greedily lays documents from `stream`, in order, into `num_rows` rows of `seq_len` tokens.

  A document that does not fit in what is left of a row (tokens, or image slots) starts the next
  row; one longer than `seq_len` is truncated (never inside an image block); one with no loss token
  in what is kept is skipped. The document that does not fit in the last row stays in the stream
  for the next batch.
  Args:
    image_slots: (i, p, c): i image slots per row of `images.slot_shape` (p, c); None = text only.
  Returns None if the stream ends before any document is packed; otherwise a batch of
  `batch_layout.batch_layout(num_rows, seq_len, image_slots)`, rows after the stream's end being
  padding.
  """
  batch = batch_layout.empty_batch(num_rows, seq_len, image_slots)
  row, col, used, segment, packed, skips = 0, 0, 0, 0, 0, 0
  while row < num_rows:
    doc = stream.peek()
    if doc is None:
      break
    length, images = _kept(doc, seq_len)
    if not doc["loss_mask"][:length].any():
      stream.advance()
      skips += 1
      if skips > _MAX_SKIPS:
        raise DataError(f"{_MAX_SKIPS} documents in a row have no model-turn tokens in their "
                        f"first {seq_len} tokens; check the data's roles or raise seq_len")
      continue
    skips = 0
    if images:
      _check_images(doc, images, image_slots)
    if col + length > seq_len or (images and used + images > image_slots[0]):
      row, col, used, segment = row + 1, 0, 0, 0
      continue
    segment += 1
    span = slice(col, col + length)
    batch["tokens"][row, span] = doc["tokens"][:length]
    batch["segment_ids"][row, span] = segment
    batch["positions"][row, span] = np.arange(length)
    batch["loss_mask"][row, span] = doc["loss_mask"][:length]
    if images:
      batch["pixel_values"][row, used:used + images] = doc["pixel_values"][:images]
      batch["pixel_positions"][row, used:used + images] = doc["pixel_positions"][:images]
    col, used, packed = col + length, used + images, packed + 1
    stream.advance()
  return batch if packed else None


def image_slots(image_processor, max_images_per_row: int) -> tuple[int, int, int] | None:
  """(i, p, c) image slots per row for `pack_batch`; None (text only) without an image processor."""
  if image_processor is None:
    return None
  if max_images_per_row < 1:
    raise DataError(f"max_images_per_row must be >= 1 with images, got {max_images_per_row}")
  return (int(max_images_per_row), *images_lib.slot_shape(image_processor))


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

  def __init__(self, sources: Sequence[Source], weights: Sequence[float], tokenizer, seed: int,
               image_processor=None):
    self.sources, self.tokenizer = list(sources), tokenizer
    self.image_processor = image_processor
    self.mixture = Mixture([len(s) for s in sources], weights, seed)
    self.doc = 0  # index of the current document in the stream
    self.seen = [0] * len(sources)  # documents drawn from each source so far
    self._current: tuple[int, Doc] | None = None

  def peek(self) -> Doc:
    if self._current is None or self._current[0] != self.doc:
      s = self.mixture.source(self.doc)
      k = self.mixture.example(s, self.seen[s])
      self._current = (self.doc, self.sources[s].encode(k, self.tokenizer, self.image_processor))
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
               process_count: int = 1, image_processor=None, max_images_per_row: int = 0):
    _check_sharding(batch_size, process_index, process_count)
    for s in sources:
      if not len(s):
        raise DataError(f"data source {s.name!r} has no training examples")
    self._stream = _MixtureStream(sources, weights, tokenizer, seed, image_processor)
    self.image_slots = image_slots(image_processor, max_images_per_row)
    self.seq_len, self.batch_size = seq_len, batch_size
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = batch_size // process_count
    self._step = 0

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> Batch:
    """Returns this process's rows: each array has shape [batch_size // process_count, seq_len]."""
    batch = pack_batch(self._stream, self.seq_len, self.batch_size, self.image_slots)
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
                      max_batches: int = 0, process_index: int = 0, process_count: int = 1,
                      image_processor=None, max_images_per_row: int = 0) -> list[Batch]:
  """Packs the held-out examples, sources interleaved round-robin, into a fixed list of batches.

  Args:
    max_batches: keep at most this many global batches (0 = all held-out examples).
    image_processor, max_images_per_row: as for `DataIterator`.
  Returns:
    this process's rows of each batch; the last batch is padded (segment id 0) where data runs out.
  """
  _check_sharding(batch_size, process_index, process_count)
  longest = max((len(s) for s in sources), default=0)
  order = [(s, i) for i in range(longest) for s in range(len(sources)) if i < len(sources[s])]
  stream = ListStream(
      lambda j: sources[order[j][0]].encode(order[j][1], tokenizer, image_processor), len(order))
  slots = image_slots(image_processor, max_images_per_row)
  batches = []
  while not max_batches or len(batches) < max_batches:
    batch = pack_batch(stream, seq_len, batch_size, slots)
    if batch is None:
      break
    batches.append(_process_rows(batch, process_index, process_count))
  return batches
