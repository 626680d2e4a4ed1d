"""Losses of joint training: token cross-entropy with masks, and L = L_base + lambda * sum_k w_k L_k.

Every per-step term is reduced to sums and a token count inside the drafter scan (never a stacked
[K, B, T, V] logits array), and means are taken over valid tokens only, so a batch with more padding
does not weigh less.
"""

from __future__ import annotations

from typing import Sequence

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
  """Per-step weights w_k as a float32 [K] array (all 1 when None)."""
  if weights is None:
    return jnp.ones((num_draft_steps,), jnp.float32)
  if len(weights) != num_draft_steps:
    raise ValueError(f"drafter step weights have {len(weights)} entries for {num_draft_steps} steps")
  return jnp.asarray(weights, jnp.float32)


def combine(base: TokenStats, steps: TokenStats, drafter_loss_weight: float,
            weights_K: Array, centroid: TokenStats | None = None,
            centroid_loss_weight: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """L = L_base + lambda * sum_k w_k (L_k + mu * L_k^centroid), each L a mean over its valid tokens.

  `steps` (and `centroid`) hold [K] arrays, one entry per drafter step. Returns (loss, metrics) with
  per-step losses and top-1 accuracies as `drafter/loss_k` and `drafter/acc_k` (k from 1).
  """
  step_loss_K = steps.loss
  draft_K = step_loss_K
  if centroid is not None and centroid_loss_weight:
    draft_K = draft_K + centroid_loss_weight * centroid.loss
  drafter_loss = jnp.sum(weights_K * draft_K)
  loss = base.loss + drafter_loss_weight * drafter_loss
  metrics = {
      "loss": loss,
      "base/loss": base.loss,
      "base/acc": base.accuracy,
      "base/tokens": base.count,
      "drafter/loss": drafter_loss,
  }
  for k in range(step_loss_K.shape[0]):
    metrics[f"drafter/loss_{k + 1}"] = step_loss_K[k]
    metrics[f"drafter/acc_{k + 1}"] = steps.accuracy[k]
    metrics[f"drafter/tokens_{k + 1}"] = steps.count[k]
    if centroid is not None:
      # Centroid "accuracy" here is recall: the label's cluster is among the top-k selected.
      metrics[f"drafter/centroid_loss_{k + 1}"] = centroid.loss[k]
      metrics[f"drafter/centroid_recall_{k + 1}"] = centroid.accuracy[k]
  return loss, metrics


def chunked_head_stats(hidden_BTD: Array, head_VD: Array, labels_BT: Array, mask_BT: Array,
                       chunk: int, softcap: float | None = None, z_loss_weight: float = 0.0,
                       dtype=jnp.float32) -> TokenStats:
  """`token_stats` of `hidden @ head^T` without ever holding the [B, T, V] logits.

  The rows are split into chunks of `chunk` positions; each chunk's logits are computed, reduced to
  sums and dropped, and `jax.checkpoint` recomputes them in the backward pass. Peak memory is
  O(B * chunk * V) instead of O(B * T * V): at V = 262144 and T = 4096 that is the difference
  between a 4 GiB float32 logits array per sequence (times the K drafter steps) and a few hundred MB.
  Same numbers as `token_stats(logits)` up to float32 summation order.
  """
  b, t, d = hidden_BTD.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
    labels_BT = jnp.pad(labels_BT, ((0, 0), (0, pad)))
    mask_BT = jnp.pad(mask_BT, ((0, 0), (0, pad)))
  split = lambda x: jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)
  xs = (split(hidden_BTD), split(labels_BT), split(mask_BT))

  @jax.checkpoint
  def one(h_BCD, lab_BC, m_BC):
    logits_BCV = jnp.einsum("bcd,vd->bcv", h_BCD.astype(dtype), head_VD.astype(dtype),
                            preferred_element_type=jnp.float32)
    return token_stats(logits_BCV, lab_BC, m_BC, softcap=softcap, z_loss_weight=z_loss_weight)

  def body(acc, x):
    s = one(*x)
    return jax.tree.map(jnp.add, acc, s), None

  zero = TokenStats(*(jnp.zeros((), jnp.float32) for _ in range(4)))
  total, _ = jax.lax.scan(body, zero, xs)
  return total
