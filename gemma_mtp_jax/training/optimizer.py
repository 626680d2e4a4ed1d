"""The optimizer: optax AdamW, linear warmup then cosine decay to `min_learning_rate_ratio` of the
peak, global-norm clipping, weight decay on matrices only (`decay_mask`). It reads the run's
`TrainConfig`; gradient accumulation is the train step's (`step.train_step`)."""

from __future__ import annotations

import jax
import optax

from gemma_mtp_jax.training.config import TrainConfig


def decay_mask(params):
  """Weight decay on matrices (kernels, embedding tables, centroids), not on norm scales, layer
  scalars or other vectors: decaying a norm scale towards 0 fights the normalization."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(tcfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(AdamW with linear warmup + cosine decay and global-norm clipping, its learning-rate schedule)."""
  peak = tcfg.learning_rate
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=tcfg.warmup_steps,
      decay_steps=max(tcfg.num_steps, tcfg.warmup_steps + 1),
      end_value=peak * tcfg.min_learning_rate_ratio)
  parts = []
  if tcfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(tcfg.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps,
                           weight_decay=tcfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
