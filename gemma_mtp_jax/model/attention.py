"""Gemma 4 attention: masks, grouped-query dot-product attention and the attention block.

Gemma 4 normalises q and k per head (RMSNorm with a learned scale) and v (RMSNorm without scale), so
the logits use scale 1.0, as in HF. Global layers can use a larger head dim, proportional partial
RoPE, fewer KV heads, and (31B/26B) reuse K as V (`attention_k_eq_v`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gemma_mtp_jax.model import kv_cache
from gemma_mtp_jax.model import layers

Array = jax.Array
NEG_INF = -2.3819763e38  # large finite negative (as gm/MaxText); softmax of an all-masked row is uniform


def causal_mask(q_pos_BT: Array, kv_pos_BS: Array, kv_valid_BS: Array,
                sliding_window: int | None = None, q_seg_BT: Array | None = None,
                kv_seg_BS: Array | None = None, q_block_BT: Array | None = None,
                kv_block_BS: Array | None = None, block_in_window: bool = True) -> Array:
  """Boolean [B, T, S]: kv position <= query position, inside the window, valid, same segment.

  Positions are absolute token positions (what RoPE sees); `sliding_window` W keeps the W most recent
  positions including the query's own (HF: kv > q - W).
  q_block_BT / kv_block_BS: image-block ids (-1 outside images, `image_blocks`). A query inside a
  block also sees the block's later keys (HF's `blockwise_overlay` OR-ed with causality). With
  `block_in_window` (gemma4's `create_masks_for_vision_model`) the window's lower bound still
  applies: AND(kv > q - W, OR(causal, same block)); without it (the 12B's masks, see
  `transformer.image_overlay`) the whole block is seen: OR(AND(kv > q - W, causal), same block).
  """
  q = q_pos_BT[:, :, None]
  k = kv_pos_BS[:, None, :]
  m = k <= q
  if sliding_window is not None and not block_in_window:
    m &= k > q - sliding_window
  if q_block_BT is not None and kv_block_BS is not None:
    qb = q_block_BT[:, :, None]
    m |= (qb == kv_block_BS[:, None, :]) & (qb >= 0)
  m &= kv_valid_BS[:, None, :]
  if sliding_window is not None and block_in_window:
    m &= k > q - sliding_window
  if q_seg_BT is not None and kv_seg_BS is not None:
    m &= q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]
  return m


def image_blocks(image_BT: Array, segment_BT: Array | None = None,
                 offset_B: Array | None = None) -> Array:
  """int32 [B, T] block id of every image token (-1 elsewhere): a block is a run of consecutive
  image tokens of one packed document (HF's `get_block_sequence_ids_for_mask`, with segments also
  ending a run). The id is the run's first slot (+ `offset_B`, a cache's fill offset), so blocks
  written by different calls into one cache never share an id."""
  b, t = image_BT.shape
  prev_BT = jnp.pad(image_BT[:, :-1], ((0, 0), (1, 0)))
  if segment_BT is not None:
    prev_BT &= jnp.pad(segment_BT[:, :-1] == segment_BT[:, 1:], ((0, 0), (1, 0)))
  slot_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  start_BT = jnp.where(image_BT & ~prev_BT, slot_BT, -1)
  first_BT = jax.lax.cummax(start_BT, axis=1)
  if offset_B is not None:
    first_BT = first_BT + offset_B[:, None].astype(jnp.int32)
  return jnp.where(image_BT, first_BT, -1)


@flax.struct.dataclass
class Lookahead:
  """A mask under which a query may attend keys AFTER it (bidirectional image blocks). Passing the
  mask wrapped tells `Attention` statically (by type) that chunked attention must not slice keys to
  the window behind each block of queries."""
  mask_BTS: Array


def dot_product_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array,
                          attn_softcap: float | None = None, scale: float = 1.0) -> Array:
  """Grouped-query attention; logits and softmax in float32, output in q's dtype. Returns [B,T,N,H]."""
  b, t, n, h = q_BTNH.shape
  kh = k_BSKH.shape[2]
  g = n // kh
  q_BTKGH = q_BTNH.reshape(b, t, kh, g, h)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * scale
  logits_BKGTS = layers.softcap(logits_BKGTS, attn_softcap)
  logits_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], logits_BKGTS, NEG_INF)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(b, t, n, h).astype(q_BTNH.dtype)


def chunked_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array,
                      chunk_size: int, window: int | None = None,
                      attn_softcap: float | None = None, scale: float = 1.0) -> Array:
  """`dot_product_attention` over chunks of U = `chunk_size` query rows, one chunk at a time.

  Each chunk is a `jax.checkpoint`ed step of a `lax.map`, so neither the forward nor the backward
  pass ever holds more than one [U, S] block of scores per head (the backward recomputes them):
  memory falls from O(T * S) to O(U * S) per head, FLOPs stay the same.

  window: the mask's sliding window (it attends positions q - window < p <= q). When the keys are
  this call's own tokens (S == T, no cache), and positions advance by at least one per slot within
  a document (true of packed training rows and of left-padded prompts), every key a row may attend
  lies within `window` slots before it, so the chunk of rows [c, c + U) reads only the U + window
  keys before c + U instead of S, which also cuts the sliding layers' FLOPs by S / (U + window).
  Returns [B, T, N, H], equal to `dot_product_attention` up to float summation order.
  """
  b, t, n, h = q_BTNH.shape
  s = k_BSKH.shape[1]
  u = chunk_size
  chunks = -(-t // u)
  pad = chunks * u - t
  if pad:
    q_BTNH = jnp.pad(q_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask_BTS = jnp.pad(mask_BTS, ((0, 0), (0, pad), (0, 0)))
  span = u + window if window is not None else s
  local = s == t and span < s
  q_uBUNH = jnp.moveaxis(q_BTNH.reshape(b, chunks, u, n, h), 1, 0)
  mask_uBUS = jnp.moveaxis(mask_BTS.reshape(b, chunks, u, s), 1, 0)

  @jax.checkpoint
  def chunk(args):
    i, q_BUNH, mask_BUS = args
    k, v = k_BSKH, v_BSKH
    if local:
      start = jnp.clip(i * u + u - span, 0, s - span)
      k = jax.lax.dynamic_slice_in_dim(k, start, span, axis=1)
      v = jax.lax.dynamic_slice_in_dim(v, start, span, axis=1)
      mask_BUS = jax.lax.dynamic_slice_in_dim(mask_BUS, start, span, axis=2)
    return dot_product_attention(q_BUNH, k, v, mask_BUS, attn_softcap, scale)

  out_uBUNH = jax.lax.map(chunk, (jnp.arange(chunks), q_uBUNH, mask_uBUS))
  return jnp.moveaxis(out_uBUNH, 0, 1).reshape(b, chunks * u, n, h)[:, :t]


class Attention(nn.Module):
  """One Gemma 4 attention block (projections, norms, RoPE, attention, output projection).

  `has_kv=False` builds a query-only block (KV-shared layers and every drafter layer): it owns no
  k/v projections and attends the K/V it is given.
  `chunk_size` > 0 attends in query blocks (`chunked_attention`) when T exceeds it; `window` is
  the mask's sliding window (None on global layers), which lets those blocks skip far keys.
  """

  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  has_kv: bool = True
  k_eq_v: bool = False
  eps: float = 1e-6
  attn_softcap: float | None = None
  chunk_size: int = 0
  window: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    d, n, k, h = self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim
    w = lambda name, shape, axes: layers.param_with_axes(
        self, name, layers.default_kernel_init, shape, self.param_dtype, axes)
    self.q_DNH = w("q", (d, n, h), ("embed", "q_heads", "head_dim"))
    self.o_NHD = w("o", (n, h, d), ("q_heads", "head_dim", "embed"))
    self.q_norm = layers.RMSNorm(self.eps, param_dtype=self.param_dtype)
    if self.has_kv:
      self.k_DKH = w("k", (d, k, h), ("embed", "kv_heads", "kv_head_dim"))
      if not self.k_eq_v:
        self.v_DKH = w("v", (d, k, h), ("embed", "kv_heads", "kv_head_dim"))
      self.k_norm = layers.RMSNorm(self.eps, param_dtype=self.param_dtype)

  def project_kv(self, x_BTD: Array, cos_BTH: Array, sin_BTH: Array) -> tuple[Array, Array]:
    """K (k-norm + RoPE) and V (scale-free v-norm), each [B, T, K, H], as HF stores them."""
    x_BTD = x_BTD.astype(self.dtype)
    k_BTKH = jnp.einsum("btd,dkh->btkh", x_BTD, self.k_DKH.astype(self.dtype))
    if self.k_eq_v:
      v_BTKH = k_BTKH
    else:
      v_BTKH = jnp.einsum("btd,dkh->btkh", x_BTD, self.v_DKH.astype(self.dtype))
    k_BTKH = layers.apply_rope(self.k_norm(k_BTKH), cos_BTH, sin_BTH)
    v_BTKH = layers.rms_normalize(v_BTKH, self.eps).astype(v_BTKH.dtype)
    return k_BTKH, v_BTKH

  def __call__(self, x_BTD: Array, cos_BTH: Array, sin_BTH: Array, mask_BTS: Array,
               kv_in: tuple[Array, Array] | None = None,
               cache_start_B: Array | None = None) -> tuple[Array, tuple[Array, Array] | None]:
    """Returns (output [B,T,D], the (k, v) [B,S,K,H] this block attended, or None if query-only).

    mask_BTS: bool [B, T, S], or a `Lookahead` holding one.

    Query-only blocks attend `kv_in` (a base store layer's K/V, for KV-shared layers and drafter
    layers). Blocks with projections attend their own new K/V; given a cache (`kv_in` = its k/v
    buffers and `cache_start_B` the per-row fill offset) they first append the new entries.
    """
    lookahead = isinstance(mask_BTS, Lookahead)
    if lookahead:
      mask_BTS = mask_BTS.mask_BTS
    x_BTD = x_BTD.astype(self.dtype)
    q_BTNH = jnp.einsum("btd,dnh->btnh", x_BTD, self.q_DNH.astype(self.dtype))
    q_BTNH = layers.apply_rope(self.q_norm(q_BTNH), cos_BTH, sin_BTH)
    if self.has_kv:
      k_BSKH, v_BSKH = self.project_kv(x_BTD, cos_BTH, sin_BTH)
      if kv_in is not None:
        k_BSKH = kv_cache.write_kv(kv_in[0], k_BSKH, cache_start_B)
        # Even with k_eq_v, V differs from K (v-norm of the raw projection vs k-norm + RoPE).
        v_BSKH = kv_cache.write_kv(kv_in[1], v_BSKH, cache_start_B)
      kv_out = (k_BSKH, v_BSKH)
    else:
      k_BSKH, v_BSKH = kv_in
      kv_out = None
    k_BSKH, v_BSKH = k_BSKH.astype(self.dtype), v_BSKH.astype(self.dtype)
    if self.chunk_size and q_BTNH.shape[1] > self.chunk_size:
      # Keys after a query (image blocks) lie outside the window-behind slice: read them all.
      out_BTNH = chunked_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, self.chunk_size,
                                   None if lookahead else self.window, self.attn_softcap)
    else:
      out_BTNH = dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, self.attn_softcap)
    return jnp.einsum("btnh,nhd->btd", out_BTNH, self.o_NHD.astype(self.dtype)), kv_out
