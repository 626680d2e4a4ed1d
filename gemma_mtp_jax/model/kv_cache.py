"""KV cache for decoding with the base model, shared by plain and speculative decoding.

One buffer per layer that owns K/V (KV-shared layers read their store layer's buffer). Slots are
token indices of the row (prompt padding included); each row has its own fill length, so a batch of
speculative rows can accept different numbers of tokens, and rolling back is only a length change:
slots at or beyond `length_B` are never attended, whatever stale entries they hold.

Every layer keeps the full length (no sliding-window ring buffer): the sliding window is applied by
the mask from slot positions. That costs memory on long contexts for sliding layers, but keeps the
rollback exact and the verify step a plain write; a ring buffer would need W + K + 1 slots to survive
the rollback of K rejected drafts.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from gemma_mtp_jax.model import config as config_lib

Array = jax.Array


@flax.struct.dataclass
class KVCache:
  k: dict[int, Array]  # layer index -> [B, S, K, H]
  v: dict[int, Array]  # layer index -> [B, S, K, H]
  positions_BS: Array  # int32 RoPE position of each slot
  valid_BS: Array  # bool: slot holds a real (non-padding) token
  length_B: Array  # int32 number of filled slots per row
  # int32 image-block id of each slot (-1: not an image token, or written without images), so a
  # later query of the same block (a prefill's image tokens) sees it bidirectionally.
  block_BS: Array

  @property
  def max_length(self) -> int:
    return self.positions_BS.shape[1]

  def attend_mask(self) -> Array:
    """bool [B, S]: slots that may be attended (filled and not padding)."""
    slots = jnp.arange(self.max_length, dtype=jnp.int32)
    return self.valid_BS & (slots[None, :] < self.length_B[:, None])

  def rollback(self, length_B: Array) -> "KVCache":
    """Forget every slot at or beyond `length_B` (e.g. rejected draft tokens)."""
    return self.replace(length_B=jnp.minimum(self.length_B, length_B.astype(jnp.int32)))


def init_cache(cfg: config_lib.ModelConfig, batch: int, max_length: int, dtype=None) -> KVCache:
  """An empty cache for `batch` rows of up to `max_length` tokens."""
  dtype = dtype or jnp.dtype(cfg.dtype)
  k, v = {}, {}
  for i in range(cfg.num_layers):
    if cfg.is_kv_shared(i):
      continue
    shape = (batch, max_length, cfg.layer_kv_heads(i), cfg.layer_head_dim(i))
    k[i] = jnp.zeros(shape, dtype)
    v[i] = jnp.zeros(shape, dtype)  # k_eq_v layers too: V is normalised differently from K
  return KVCache(
      k=k, v=v,
      positions_BS=jnp.zeros((batch, max_length), jnp.int32),
      valid_BS=jnp.zeros((batch, max_length), bool),
      length_B=jnp.zeros((batch,), jnp.int32),
      block_BS=jnp.full((batch, max_length), -1, jnp.int32),
  )


def _write_rows(buf_BS_, new_BT_, start_B):
  """Writes new_BT_ into buf_BS_ at a per-row slot offset."""
  def one(buf, new, s):
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (s,) + (0,) * (buf.ndim - 1))
  return jax.vmap(one)(buf_BS_, new_BT_, start_B)


def write_meta(cache: KVCache, positions_BT: Array, valid_BT: Array,
               block_BT: Array | None = None) -> KVCache:
  """Appends slot metadata for T new tokens (image-block ids: -1 when None) and advances the row
  lengths."""
  t = positions_BT.shape[1]
  if block_BT is None:
    block_BT = jnp.full(positions_BT.shape, -1, jnp.int32)
  return cache.replace(
      positions_BS=_write_rows(cache.positions_BS, positions_BT.astype(jnp.int32), cache.length_B),
      valid_BS=_write_rows(cache.valid_BS, valid_BT, cache.length_B),
      block_BS=_write_rows(cache.block_BS, block_BT.astype(jnp.int32), cache.length_B),
      length_B=cache.length_B + t,
  )


def write_kv(k_BSKH: Array, k_BTKH: Array, start_B: Array) -> Array:
  """Appends T new K (or V) entries at each row's offset `start_B`."""
  return _write_rows(k_BSKH, k_BTKH, start_B)
