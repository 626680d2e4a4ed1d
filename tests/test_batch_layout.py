"""One batch layout (`data.batch_layout`): packing, the eval's greedy rows and the AOT plan's abstract
batch hold exactly its arrays, shapes and dtypes, with and without image slots."""

import jax
import numpy as np
import pytest

from gemma_mtp_jax import aot
from gemma_mtp_jax import presets
from gemma_mtp_jax.data import batch_layout
from gemma_mtp_jax.data import packing
from gemma_mtp_jax.training import config as train_config
from gemma_mtp_jax.training import evaluate

SLOTS = (2, 6, 4)  # i image slots of p patches of c values


def _specs(batch) -> dict:
  """name -> (shape, dtype) of a dict of arrays (numpy or abstract)."""
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}


def _want(rows, seq_len, slots):
  return {k: (s.shape, s.dtype) for k, s in batch_layout.batch_layout(rows, seq_len, slots).items()}


def test_layout_names_shapes_dtypes_and_fills():
  layout = batch_layout.batch_layout(3, 8, SLOTS)
  assert list(layout) == ["tokens", "segment_ids", "positions", "loss_mask", "pixel_values",
                          "pixel_positions"]
  assert layout["loss_mask"] == ((3, 8), np.dtype(bool), 0)
  assert layout["pixel_values"] == ((3, 2, 6, 4), np.dtype(np.float32), 0)
  assert layout["pixel_positions"] == ((3, 2, 6, 2), np.dtype(np.int32), -1)
  assert list(batch_layout.batch_layout(3, 8)) == ["tokens", "segment_ids", "positions",
                                                   "loss_mask"]
  empty = batch_layout.empty_batch(3, 8, SLOTS)
  assert (empty["pixel_positions"] == -1).all()
  assert not any(v.any() for k, v in empty.items() if k != "pixel_positions")


@pytest.mark.parametrize("slots", [None, SLOTS])
def test_packed_batch_is_the_layout(slots):
  docs = [dict(tokens=np.arange(1, 6, dtype=np.int32), loss_mask=np.array([0, 1, 1, 1, 1], bool))]
  if slots is not None:  # one image block of 2 tokens, pixels of the slot's shape
    docs[0].update(pixel_values=np.ones((1, 6, 4), np.float32),
                   pixel_positions=np.zeros((1, 6, 2), np.int32),
                   image_spans=np.asarray([[1, 3]], np.int32))
  batch = packing.pack_batch(packing.ListStream(lambda i: docs[i], 1), 10, 3, slots)
  assert _specs(batch) == _want(3, 10, slots)
  assert list(batch) == list(_want(3, 10, slots))


@pytest.mark.parametrize("slots", [None, SLOTS])
def test_greedy_batch_is_the_layout(slots):
  prompts = [np.array([2, 5, 6], np.int32), np.array([2, 7], np.int32)]
  conts = [np.array([8, 9], np.int32), np.array([8], np.int32)]
  images = None if slots is None else [None, (np.ones((1, 6, 4), np.float32),
                                              np.zeros((1, 6, 2), np.int32))]
  g = evaluate.build_greedy_batch(prompts, conts, 12, images, slots)
  assert _specs(g.batch) == _want(2, 12, slots)


@pytest.mark.parametrize("slots", [None, SLOTS])
def test_aot_abstract_batch_is_the_layout(slots):
  """The tiny preset's trainer batch (batch_size x seq_len rows) as the AOT plan compiles it."""
  _, _, tcfg = train_config.validate_config(presets.load_config("tiny"))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = aot.abstract_batch(tcfg.batch_size, tcfg.seq_len, slots, sharding)
  assert _specs(abstract) == _want(tcfg.batch_size, tcfg.seq_len, slots)
  assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding == sharding
             for x in abstract.values())
