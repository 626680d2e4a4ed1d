"""Losses of joint training: token cross-entropy with masks, and L = L_base + lambda * sum_k w_k L_k.

Every per-step term is reduced to sums and a token count inside the drafter scan (never a stacked
[A, B, T, V] logits array), and means are taken over valid tokens only, so a batch with more padding
does not weigh less.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from gemma_mtp_jax.model import layers

Array = jax.Array


@flax.struct.dataclass
class TokenStats:
  """Sums over the valid tokens of one prediction (base, or one drafter step)."""
  loss_sum: Array  # float32: sum of -log p(label) (+ z-loss term)
  correct: Array  # float32: number of tokens whose argmax is the label
  count: Array  # float32: number of valid tokens
  z_sum: Array  # float32: sum of logsumexp^2 (the z-loss before its weight)

  @property
  def loss(self) -> Array:
    return self.loss_sum / jnp.maximum(self.count, 1.0)

  @property
  def accuracy(self) -> Array:
    return self.correct / jnp.maximum(self.count, 1.0)


def token_stats(logits_BTV: Array, labels_BT: Array, mask_BT: Array, softcap: float | None = None,
                z_loss_weight: float = 0.0, top_k: int = 1) -> TokenStats:
  """Masked cross-entropy, top-k hits and count, in float32.

  softcap: apply tanh soft-capping first (for raw logits; the base's logits arrive already capped).
  z_loss_weight: adds w * logsumexp^2 per token (PaLM's z-loss); off by default.
  top_k: a hit is the label among the k highest logits (1: the argmax).
  """
  logits_BTV = layers.softcap(logits_BTV.astype(jnp.float32), softcap)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  label_logit_BT = jnp.take_along_axis(logits_BTV, labels_BT[..., None].astype(jnp.int32),
                                       axis=-1)[..., 0]
  m = mask_BT.astype(jnp.float32)
  nll_BT = lse_BT - label_logit_BT
  z_BT = lse_BT * lse_BT
  loss_BT = nll_BT + z_loss_weight * z_BT if z_loss_weight else nll_BT
  if top_k == 1:
    hit_BT = (jnp.argmax(logits_BTV, axis=-1) == labels_BT).astype(jnp.float32)
  else:
    kth_BT = jax.lax.top_k(logits_BTV, top_k)[0][..., -1]
    hit_BT = (label_logit_BT >= kth_BT).astype(jnp.float32)
  return TokenStats(loss_sum=jnp.sum(loss_BT * m), correct=jnp.sum(hit_BT * m), count=jnp.sum(m),
                    z_sum=jnp.sum(z_BT * m))


def step_weights(num_draft_steps: int, weights: Sequence[float] | None) -> jnp.ndarray:
  """Per-step weights w_k as a float32 [A] array (all 1 when None)."""
  if weights is None:
    return jnp.ones((num_draft_steps,), jnp.float32)
  if len(weights) != num_draft_steps:
    raise ValueError(f"drafter step weights have {len(weights)} entries for {num_draft_steps} steps")
  return jnp.asarray(weights, jnp.float32)


def combine(base: TokenStats, steps: TokenStats, drafter_loss_weight: float,
            weights_A: Array, centroid: TokenStats | None = None,
            centroid_loss_weight: float = 0.0,
            step_norm_A: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """L = L_base + lambda * sum_k w_k (L_k + mu * L_k^centroid), each L a mean over its valid tokens.

  `steps` (and `centroid`) hold [A] arrays, one entry per drafter step. `step_norm_A`: divide each
  step's summed loss by this count instead of its own (NeMo's composite: the base's count). Returns
  (loss, metrics) with per-step losses (per-token means) and top-1 accuracies as `drafter/loss_k`
  and `drafter/acc_k` (k from 1).
  """
  step_loss_A = steps.loss
  if step_norm_A is None:
    mean = lambda s: s.loss
  else:
    mean = lambda s: s.loss_sum / jnp.maximum(step_norm_A, 1.0)
  draft_A = mean(steps)
  if centroid is not None and centroid_loss_weight:
    draft_A = draft_A + centroid_loss_weight * mean(centroid)
  drafter_loss = jnp.sum(weights_A * draft_A)
  loss = base.loss + drafter_loss_weight * drafter_loss
  metrics = {
      "loss": loss,
      "base/loss": base.loss,
      "base/acc": base.accuracy,
      "base/tokens": base.count,
      "drafter/loss": drafter_loss,
  }
  for k in range(step_loss_A.shape[0]):
    metrics[f"drafter/loss_{k + 1}"] = step_loss_A[k]
    metrics[f"drafter/acc_{k + 1}"] = steps.accuracy[k]
    metrics[f"drafter/tokens_{k + 1}"] = steps.count[k]
    if centroid is not None:
      # Centroid "accuracy" here is recall: the label's cluster is among the top-k selected.
      metrics[f"drafter/centroid_loss_{k + 1}"] = centroid.loss[k]
      metrics[f"drafter/centroid_recall_{k + 1}"] = centroid.accuracy[k]
  return loss, metrics


def masked_logits(logits_xV: Array, cent_xC: Array, clusters_V: Array, top_k: int) -> Array:
  """The centroid-masked head (`Drafter.masked_logits`, HF's) from the dense logits: the tokens of
  the top-k centroids keep their logit, every other token gets min(selected) - 1. Its argmax is the
  dense argmax over the selected tokens (ties: the lowest id in both)."""
  _, top_xk = jax.lax.top_k(cent_xC, top_k)
  selected_xC = jnp.any(jax.nn.one_hot(top_xk, cent_xC.shape[-1], dtype=bool), axis=-2)
  allowed_xV = jnp.take(selected_xC, clusters_V, axis=-1)
  fill_x1 = jnp.min(jnp.where(allowed_xV, logits_xV, jnp.inf), axis=-1, keepdims=True) - 1.0
  return jnp.where(allowed_xV, logits_xV, fill_x1)


@flax.struct.dataclass
class HeadOut:
  """What `head_stats` returns: the stats, and with `predictions` the argmaxes [B, T]."""
  stats: TokenStats
  argmax_BT: Array | None = None  # of the head the stats score
  masked_argmax_BT: Array | None = None  # of the centroid-masked head (= argmax_BT without one)


@flax.struct.dataclass
class Head:
  """An LM head: `hidden @ table^T` in `dtype`, soft-capped by `softcap`; with `clusters_V` and
  centroid scores, the centroid-masked head is available too (`masked`: the stats score it)."""
  table_VD: Array
  clusters_V: Array | None = None
  dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)
  softcap: float | None = flax.struct.field(pytree_node=False, default=None)
  top_k: int = flax.struct.field(pytree_node=False, default=1)
  masked: bool = flax.struct.field(pytree_node=False, default=False)


def head_stats(head: Head, hidden_BTD: Array, labels_BT: Array, mask_BT: Array, *,
               cent_BTC: Array | None = None, chunk: int = 0, z_loss_weight: float = 0.0,
               predictions: bool = False) -> HeadOut:
  """THE head + loss path (training's base and drafter steps, the eval, chunked or not): the
  `token_stats` of `head` applied to `hidden_BTD`, and with `predictions` the argmax of that head
  and of the centroid-masked one (`cent_BTC` needed for the latter and for `head.masked`).

  chunk > 0: positions `chunk` at a time, each chunk's logits reduced and dropped (`jax.checkpoint`
  recomputes them in the backward pass), so [B, T, V] logits never exist: peak memory
  O(B * chunk * V) instead of O(B * T * V); at V = 262144, T = 4096 that is a 4 GiB float32 array
  per sequence and drafter step against a few hundred MB. Same numbers as chunk = 0 up to float32
  summation order.
  """
  def one(h_BUD, lab_BU, m_BU, cent_BUC, constrain=True):
    logits_BUV = layers.head_logits(h_BUD, head.table_VD, head.dtype, None, constrain)
    masked_BUV = None
    if cent_BUC is not None and head.clusters_V is not None:  # capped after masking, as decoded
      masked_BUV = layers.softcap(
          masked_logits(logits_BUV, cent_BUC, head.clusters_V, head.top_k), head.softcap)
    logits_BUV = layers.softcap(logits_BUV, head.softcap)
    scored_BUV = masked_BUV if head.masked else logits_BUV
    stats = token_stats(scored_BUV, lab_BU, m_BU, z_loss_weight=z_loss_weight)
    if not predictions:
      return stats, None, None
    argmax_BU = jnp.argmax(scored_BUV, axis=-1).astype(jnp.int32)
    masked_BU = (argmax_BU if masked_BUV is None
                 else jnp.argmax(masked_BUV, axis=-1).astype(jnp.int32))
    return stats, argmax_BU, masked_BU

  if chunk <= 0:
    return HeadOut(*one(hidden_BTD, labels_BT, mask_BT, cent_BTC))
  b, t = labels_BT.shape
  n = -(-t // chunk)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, n * chunk - t)) + ((0, 0),) * (x.ndim - 2))
  split = lambda x: jnp.swapaxes(pad(x).reshape(b, n, chunk, *x.shape[2:]), 0, 1)
  xs = tuple(None if x is None else split(x) for x in (hidden_BTD, labels_BT, mask_BT, cent_BTC))
  one_chunk = jax.checkpoint(lambda *x: one(*x, constrain=False))

  def body(acc, x):
    stats, argmax_BU, masked_BU = one_chunk(*x)
    return jax.tree.map(jnp.add, acc, stats), (argmax_BU, masked_BU)

  zero = TokenStats(*(jnp.zeros((), jnp.float32) for _ in range(4)))
  total, (argmax_chunks, masked_chunks) = jax.lax.scan(body, zero, xs)
  unsplit = lambda x: None if x is None else jnp.swapaxes(x, 0, 1).reshape(b, n * chunk)[:, :t]
  return HeadOut(total, unsplit(argmax_chunks), unsplit(masked_chunks))
