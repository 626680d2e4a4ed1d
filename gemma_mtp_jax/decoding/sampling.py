"""How the next token is chosen: greedy or temperature / top-k / top-p sampling, one filter
(`log_probs`) for the base's p and the drafter's q, and inverse-CDF sampling.

Shapes: lower-case x = any leading dims (rows, or rows and verify positions), V vocab.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from gemma_mtp_jax.utils.errors import UserError

Array = jax.Array


class GenerateError(UserError, ValueError):
  """A generation request that cannot run (bad prompt, sizes, drafter); the message says which."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. temperature 0 is greedy (argmax; top_k / top_p ignored)."""

  temperature: float = 0.0
  top_k: int = 0  # keep the k most likely tokens; 0 keeps all
  top_p: float = 1.0  # keep the smallest most-likely set with mass >= top_p; 1.0 keeps all

  def __post_init__(self):
    if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN fails both tests
      raise GenerateError(f"temperature must be a finite number >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise GenerateError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise GenerateError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def log_probs(logits_xV: Array, sampling: Sampling) -> Array:
  """Log of the filtered, renormalised sampling distribution [..., V]; -inf outside the filter.

  Temperature first, then top-k, then top-p (HF's order). Top-k keeps ties with the k-th logit,
  top-p always keeps the most likely token; both are decided on the same sorted logits, so p and q
  are filtered by exactly the same rule.
  """
  x_xV = logits_xV.astype(jnp.float32) / max(sampling.temperature, 1e-6)
  v = x_xV.shape[-1]
  if (0 < sampling.top_k < v) or sampling.top_p < 1.0:
    sorted_xV = -jnp.sort(-x_xV, axis=-1)  # descending
    keep_xV = jnp.ones(x_xV.shape, bool)
    if 0 < sampling.top_k < v:
      keep_xV &= x_xV >= sorted_xV[..., sampling.top_k - 1:sampling.top_k]
      sorted_xV = jnp.where(jnp.arange(v) < sampling.top_k, sorted_xV, -jnp.inf)
    if sampling.top_p < 1.0:
      probs_xV = jax.nn.softmax(sorted_xV, axis=-1)
      # The k-th sorted token is kept iff the mass strictly before it is < top_p.
      before_xV = jnp.cumsum(probs_xV, axis=-1) - probs_xV
      kept_xV = (before_xV < sampling.top_p) & (sorted_xV > -jnp.inf)
      cutoff_x1 = jnp.min(jnp.where(kept_xV, sorted_xV, jnp.inf), axis=-1, keepdims=True)
      keep_xV &= x_xV >= cutoff_x1
    x_xV = jnp.where(keep_xV, x_xV, -jnp.inf)
  return jax.nn.log_softmax(x_xV, axis=-1)


def sample(rng: Array, probs_xV: Array) -> Array:
  """One token per row [...] from unnormalised probabilities, by inverse CDF.

  One uniform per row instead of Gumbel-max's one per vocab entry: the random bits, not the
  arithmetic, dominate sampling cost on a CPU, and a round samples K + 1 times.
  """
  v = probs_xV.shape[-1]
  cdf_xV = jnp.cumsum(probs_xV, axis=-1)
  u_x1 = jax.random.uniform(rng, cdf_xV.shape[:-1] + (1,), cdf_xV.dtype) * cdf_xV[..., -1:]
  # The first entry whose cdf exceeds u has probability > 0; if rounding left none (u == total),
  # take the last entry with probability > 0.
  above_xV = cdf_xV > u_x1
  last_xV = (probs_xV > 0)[..., ::-1]
  token_x = jnp.where(jnp.any(above_xV, axis=-1), jnp.argmax(above_xV, axis=-1),
                      v - 1 - jnp.argmax(last_xV, axis=-1))
  return token_x.astype(jnp.int32)


def choose(logits_xV: Array, sampling: Sampling, rng: Array | None) -> Array:
  """The next token [...] under `sampling` (argmax when greedy; rng unused then)."""
  if sampling.greedy:
    return jnp.argmax(logits_xV, axis=-1).astype(jnp.int32)
  return sample(rng, jnp.exp(log_probs(logits_xV, sampling)))
