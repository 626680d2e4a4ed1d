"""Gemma 4 attention: masks, grouped-query dot-product attention and the attention block.

Gemma 4 normalises q and k per head (RMSNorm with a learned scale) and v (RMSNorm without scale), so
the logits use scale 1.0, as in HF. Global layers can use a larger head dim, proportional partial
RoPE, fewer KV heads, and (31B/26B) reuse K as V (`attention_k_eq_v`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_mtp_jax import kv_cache
from gemma_mtp_jax import layers

Array = jax.Array
NEG_INF = -2.3819763e38  # large finite negative (as gm/MaxText); softmax of an all-masked row is uniform


def causal_mask(q_pos_BT: Array, kv_pos_BS: Array, kv_valid_BS: Array,
                sliding_window: int | None = None, q_seg_BT: Array | None = None,
                kv_seg_BS: Array | None = None) -> Array:
  """Boolean [B, T, S]: kv position <= query position, inside the window, valid, same segment.

  Positions are absolute token positions (what RoPE sees); `sliding_window` W keeps the W most recent
  positions including the query's own (HF: kv > q - W).
  """
  q = q_pos_BT[:, :, None]
  k = kv_pos_BS[:, None, :]
  m = (k <= q) & kv_valid_BS[:, None, :]
  if sliding_window is not None:
    m &= k > q - sliding_window
  if q_seg_BT is not None and kv_seg_BS is not None:
    m &= q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]
  return m


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


class Attention(nn.Module):
  """One Gemma 4 attention block (projections, norms, RoPE, attention, output projection).

  `has_kv=False` builds a query-only block (KV-shared layers and every drafter layer): it owns no
  k/v projections and attends the K/V it is given.
  """

  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  has_kv: bool = True
  k_eq_v: bool = False
  eps: float = 1e-6
  attn_softcap: float | None = None
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

    Query-only blocks attend `kv_in` (a base store layer's K/V, for KV-shared layers and drafter
    layers). Blocks with projections attend their own new K/V; given a cache (`kv_in` = its k/v
    buffers and `cache_start_B` the per-row fill offset) they first append the new entries.
    """
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
    out_BTNH = dot_product_attention(q_BTNH, k_BSKH.astype(self.dtype), v_BSKH.astype(self.dtype),
                                     mask_BTS, self.attn_softcap)
    return jnp.einsum("btnh,nhd->btd", out_BTNH, self.o_NHD.astype(self.dtype)), kv_out
