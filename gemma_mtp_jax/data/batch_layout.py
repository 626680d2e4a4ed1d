"""The batch layout, written once: which arrays a training batch holds, their shapes and dtypes.

Batches are dicts of numpy arrays, B rows of T tokens:
  tokens       int32[B, T]
  segment_ids  int32[B, T]  0 = padding, 1, 2, ... = the documents of the row, in order
  positions    int32[B, T]  restart at 0 in every document (0 on padding)
  loss_mask    bool[B, T]   tokens[b, t] is produced by the model: model-turn content or its closing
                            `<turn|>`. Prompt, user/system turns, role headers, padding are False.

and, only when the data has images (`image_slots` = (i, p, c) set), i image slots per row:
  pixel_values     float32[B, i, p, c]  the k-th image of row b is the k-th block of image tokens
                                        of row b, in order; empty slots are zeros
  pixel_positions  int32[B, i, p, 2]    patch (x, y) positions; padding patches and empty slots -1

Nothing is shifted. The base model's target at position t is tokens[t + 1] when
segment_ids[t + 1] == segment_ids[t] != 0, weighted by loss_mask[t + 1]; the drafter's k-step-ahead
targets come from the same arrays. Every document starts with `<bos>` (never a target), so a target
never has to cross a document boundary.

Who reads `batch_layout`: packing (`packing.pack_batch` allocates its batch with `empty_batch`), the
trainer's eval (`training.evaluate.build_greedy_batch`, its greedy rows) and the AOT plan
(`aot.abstract_batch`, the compiled step's abstract batch). No JAX here: data/ is below sharding.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ArraySpec(NamedTuple):
  """One array of a batch: its shape, dtype and the value of an empty entry (padding, a slot)."""
  shape: tuple[int, ...]
  dtype: np.dtype
  fill: int | float = 0


def batch_layout(rows: int, seq_len: int,
                 image_slots: tuple[int, int, int] | None = None) -> dict[str, ArraySpec]:
  """name -> ArraySpec of a batch of `rows` rows of `seq_len` tokens (the module docstring), with
  the image arrays when `image_slots` = (i, p, c) is given: i slots of p patches of c values."""
  row = (rows, seq_len)
  layout = {"tokens": ArraySpec(row, np.dtype(np.int32)),
            "segment_ids": ArraySpec(row, np.dtype(np.int32)),
            "positions": ArraySpec(row, np.dtype(np.int32)),
            "loss_mask": ArraySpec(row, np.dtype(bool))}
  if image_slots is not None:
    i, p, c = image_slots
    layout["pixel_values"] = ArraySpec((rows, i, p, c), np.dtype(np.float32))
    layout["pixel_positions"] = ArraySpec((rows, i, p, 2), np.dtype(np.int32), -1)
  return layout


def empty_batch(rows: int, seq_len: int,
                image_slots: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
  """A batch of `batch_layout` arrays holding only padding and empty image slots."""
  return {name: np.zeros(s.shape, s.dtype) if s.fill == 0 else np.full(s.shape, s.fill, s.dtype)
          for name, s in batch_layout(rows, seq_len, image_slots).items()}
