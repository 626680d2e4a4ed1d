"""Joint training of Gemma 4 and its assistant drafter: one forward, one loss, one train step.

`joint_forward` runs the base once (no cache) over the packed batch, then the drafter for every anchor
row t in parallel, K steps by a `lax.scan`:

  step 1 at row t consumes (x_{t+1}, the base's final hidden h_t);
  step k > 1 consumes (x_{t+k}, the drafter's carried hidden from step k - 1), teacher-forced;
  every step's queries at row t read only base K/V at positions <= t (sliding layers: t - W .. t),
  at query position t + 1 ("next", HF/MLX) or t ("anchor", vLLM/tpu-inference);
  the label of step k at row t is x_{t+k+1}.

That is exactly the draft API (`drafter.draft`) run from the prefix x_0..x_{t+1} with the base's K/V
of x_0..x_t: at inference the base has verified positions <= t when it produces x_{t+1}, and the
drafter never sees anything later (tests/test_joint.py proves the equality for every t and k).
Why not a naive shift: the NeMo composite runs each drafter step over the shifted sequence with
the ordinary causal mask, so the query that predicts x_{t+k+1} can read base K/V of positions after
t (up to t + k - 1) and sits at RoPE position t. At inference those positions are not verified yet
(the base has K/V only up to t) and HF's query sits at t + 1: that trains a task the drafter never
meets when drafting, with a gap that grows with k. Here the mask is built from the anchor's position
and is the same [T, S] mask for every k.

Training switches (fields of `training.config.TrainConfig`):
  freeze_base: the base gets no gradient and no optimizer state (its leaves are left out of the
    differentiated and optimized tree, `partition`).
  share_embedding_with_base: the drafter's input embedding IS the base's table (HF feeds
    `target_model_input_embeddings`; dims [V, M] differ from the drafter's own [V, D] head, so there
    is no second table to tie). With sharing, the drafter loss's gradient through that lookup flows
    into the base embedding and sums with the base loss's (one param); without it the lookup is
    stop-gradient'ed. The drafter's own `embedding` (its tied LM head) is always the drafter's.
  drafter_grads_to_base: whether the drafter loss also reaches the base through h_t and the store
    K/V (True: true joint training; False: the base learns from L_base alone, up to the shared
    embedding above).
Remat of base and drafter blocks follows each config's `remat_policy`; with a drafter policy the
scan body is checkpointed too, so the backward keeps one carried hidden per step, not K logits.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp

from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import drafter as drafter_lib
from gemma_mtp_jax.model import layers
from gemma_mtp_jax.training import losses
from gemma_mtp_jax.training.config import TrainConfig
from gemma_mtp_jax.model import transformer

Array = jax.Array
Batch = Mapping[str, Array]


# ------------------------------------------------------------------------------ batch layout
def batch_arrays(batch: Batch):
  """(tokens, positions, valid, segment_ids, loss_mask), each [B, T], with the defaults of
  `gemma_mtp_jax.data` (segment 0 = padding): one document per row, every valid token a target."""
  tokens_BT = jnp.asarray(batch["tokens"]).astype(jnp.int32)
  b, t = tokens_BT.shape
  seg_BT = batch.get("segment_ids")
  seg_BT = jnp.ones((b, t), jnp.int32) if seg_BT is None else jnp.asarray(seg_BT).astype(jnp.int32)
  valid_BT = batch.get("valid")
  valid_BT = seg_BT != 0 if valid_BT is None else jnp.asarray(valid_BT).astype(bool)
  pos_BT = batch.get("positions")
  if pos_BT is None:
    pos_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  pos_BT = jnp.asarray(pos_BT).astype(jnp.int32)
  lm_BT = batch.get("loss_mask")
  lm_BT = valid_BT if lm_BT is None else jnp.asarray(lm_BT).astype(bool) & valid_BT
  return tokens_BT, pos_BT, valid_BT, seg_BT, lm_BT


@flax.struct.dataclass
class Targets:
  """The batch padded on the right by K + 1 columns, so `at(j)` reads column t + j for every row t."""
  tokens: Array  # [B, T + K + 1]
  seg: Array  # -1 past the end: never the same document
  loss_mask: Array  # False past the end (also False on padding)
  anchor_ok_BT: Array  # row t is a real token (its hidden and K/V exist)
  anchor_seg_BT: Array

  @classmethod
  def build(cls, tokens_BT, seg_BT, valid_BT, lm_BT, num_draft_steps: int) -> "Targets":
    pad = ((0, 0), (0, num_draft_steps + 1))
    return cls(tokens=jnp.pad(tokens_BT, pad), seg=jnp.pad(seg_BT, pad, constant_values=-1),
               loss_mask=jnp.pad(lm_BT, pad), anchor_ok_BT=valid_BT, anchor_seg_BT=seg_BT)

  def at(self, j) -> tuple[Array, Array]:
    """(x_{t+j} [B, T], mask [B, T]): the token j ahead of each row and whether it is a target of
    row t (same document, a loss token, row t real). `j` may be traced (inside the scan over k)."""
    t = self.anchor_ok_BT.shape[1]
    tok = jax.lax.dynamic_slice_in_dim(self.tokens, j, t, axis=1)
    seg = jax.lax.dynamic_slice_in_dim(self.seg, j, t, axis=1)
    lm = jax.lax.dynamic_slice_in_dim(self.loss_mask, j, t, axis=1)
    # Documents are contiguous, so the same document at t and t + j covers every token between.
    return tok, self.anchor_ok_BT & lm & (seg == self.anchor_seg_BT)


# ------------------------------------------------------------------------------ forward
@flax.struct.dataclass
class JointOutput:
  base_logits: Array | None  # [B, T, V] float32, soft-capped; only with the default step_fn
  base_hidden: Array  # [B, T, M]
  steps: Any  # what `step_fn` returned for each step, stacked on a leading A axis
  targets: Targets  # the batch's labels and masks (`targets.at(1)`: the base's)


def drafter_variables(params: Mapping, buffers: Mapping | None) -> dict:
  return {"params": params, "buffers": buffers} if buffers else {"params": params}


def base_head(params: Mapping, base_cfg: config_lib.ModelConfig) -> losses.Head:
  """The base's LM head (tied or lm_head, `transformer.head_VD`), soft-capped."""
  return losses.Head(transformer.head_VD(base_cfg, params["base"]),
                     dtype=layers.as_dtype(base_cfg.dtype), softcap=base_cfg.final_logit_softcap)


def drafter_head(params: Mapping, buffers: Mapping | None, dcfg: config_lib.DrafterConfig,
                 jcfg: TrainConfig) -> losses.Head:
  """The drafter's tied head as trained: dense, or centroid-masked without `jcfg.dense_head`; with
  ordered embeddings it also knows each token's centroid (for the masked head and its argmax)."""
  ordered = dcfg.use_ordered_embeddings
  return losses.Head(params["drafter"]["embedding"],
                     clusters_V=token_clusters(buffers, dcfg) if ordered else None,
                     dtype=layers.as_dtype(dcfg.text.dtype), softcap=jcfg.drafter_logit_softcap,
                     top_k=dcfg.centroid_intermediate_top_k, masked=ordered and not jcfg.dense_head)


def _step_logits(head: losses.Head):
  """The default step function: keeps each step's logits ([A, B, T, V] after the scan), the head
  the drafter trains (`drafter_head`), for tests and inspection."""
  def step_fn(k, hidden_BTD, cent_BTC, labels_BT, mask_BT):
    del k, labels_BT, mask_BT
    logits_BTV = layers.head_logits(hidden_BTD, head.table_VD, head.dtype)
    if head.masked:
      logits_BTV = losses.masked_logits(logits_BTV, cent_BTC, head.clusters_V, head.top_k)
    return layers.softcap(logits_BTV, head.softcap)
  return step_fn


def joint_forward(params: Mapping, buffers: Mapping | None, batch: Batch,
                  base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig,
                  jcfg: TrainConfig, step_fn: Callable | None = None,
                  centroids: bool = False) -> JointOutput:
  """Base forward + K teacher-forced drafter steps for every anchor row (see the module docstring).

  Args:
    params: {"base": Transformer params, "drafter": Drafter params}.
    buffers: the drafter's "buffers" collection (token_ordering), or None.
    batch: `tokens` [B, T] and optionally `positions`, `segment_ids` (0 = padding), `valid`,
      `loss_mask` (as `gemma_mtp_jax.data` makes them).
    step_fn: (k, final-norm hidden [B,T,D], centroid logits [B,T,C] or None, labels [B,T],
      mask [B,T]) -> any pytree, called inside the scan (k from 0), so a loss applies the head
      (`losses.head_stats`, chunked or not) and reduces without stacking K logits arrays. None:
      keep the base's and every step's logits (tests and inspection; any `loss_chunk_size`).
    centroids: compute the centroid logits even when the loss does not need them (the eval's
      masked head); with ordered embeddings only.
  """
  tokens_BT, pos_BT, valid_BT, seg_BT, lm_BT = batch_arrays(batch)
  inspect = step_fn is None
  if inspect:
    step_fn = _step_logits(drafter_head(params, buffers, dcfg, jcfg))
  base_out = transformer.Transformer(base_cfg).apply(
      {"params": params["base"]}, tokens_BT, pos_BT, valid_BT, seg_BT, return_logits=inspect)
  store_kv, h_BTM = base_out.store_kv, base_out.hidden
  if not jcfg.drafter_grads_to_base:
    store_kv, h_BTM = jax.lax.stop_gradient((store_kv, h_BTM))
  embedding_VM = params["base"]["embedding"]
  if not jcfg.share_embedding_with_base:
    embedding_VM = jax.lax.stop_gradient(embedding_VM)

  # One [B, T, S] mask per layer type, the same for every k: the drafter never reads its own drafts.
  masks = drafter_lib.kv_masks(dcfg, store_kv, pos_BT, seg_BT)
  q_pos_BT = drafter_lib.query_positions(pos_BT, jcfg.draft_query_position)
  targets = Targets.build(tokens_BT, seg_BT, valid_BT, lm_BT, jcfg.num_draft_steps)
  model = drafter_lib.Drafter(dcfg)
  variables = drafter_variables(params["drafter"], buffers)
  dt = layers.as_dtype(dcfg.text.dtype)
  with_centroids = dcfg.use_ordered_embeddings and (
      centroids or jcfg.centroid_loss_weight > 0 or not jcfg.dense_head)

  def body(h_BTM_, k):
    tok_BT, _ = targets.at(k + 1)  # x_{t+k+1}: the input of 0-based step k
    emb_BTM = drafter_lib.embed_tokens(embedding_VM, tok_BT, dt)
    labels_BT, mask_BT = targets.at(k + 2)
    hidden_BTD, h_next_BTM = model.apply(variables, emb_BTM, h_BTM_, q_pos_BT, store_kv, masks)
    cent_BTC = (model.apply(variables, hidden_BTD, method=drafter_lib.Drafter.centroid_logits)
                if with_centroids else None)
    return h_next_BTM, step_fn(k, hidden_BTD, cent_BTC, labels_BT, mask_BT)

  if dcfg.text.remat_policy != "none":
    # Keep only the carried hidden per step for the backward pass, not each step's [B, T, V] logits
    # (step_fn reduces them inside the body); the step is recomputed, which the drafter makes cheap.
    body = jax.checkpoint(body, prevent_cse=False)
  _, steps = jax.lax.scan(body, h_BTM.astype(dt), jnp.arange(jcfg.num_draft_steps))
  return JointOutput(base_logits=base_out.logits, base_hidden=base_out.hidden, steps=steps,
                     targets=targets)


def token_clusters(buffers: Mapping, dcfg: config_lib.DrafterConfig) -> Array:
  """int32 [V]: the centroid whose token list holds each token (inverse of `token_ordering`)."""
  v = dcfg.text.vocab_size
  ordering_V = jnp.asarray(buffers["token_ordering"]).astype(jnp.int32)
  slot_V = jnp.zeros((v,), jnp.int32).at[ordering_V].set(jnp.arange(v, dtype=jnp.int32))
  return slot_V // (v // dcfg.num_centroids)


def loss_fn(params: Mapping, buffers: Mapping | None, batch: Batch,
            base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig,
            jcfg: TrainConfig) -> tuple[Array, dict[str, Array]]:
  """L = L_base + lambda * sum_k w_k L_k (means over valid targets); returns (loss, metrics)."""
  head = drafter_head(params, buffers, dcfg, jcfg)
  kw = dict(chunk=jcfg.loss_chunk_size, z_loss_weight=jcfg.z_loss_weight)
  centroid_loss = dcfg.use_ordered_embeddings and jcfg.centroid_loss_weight > 0

  def step_fn(k, hidden_BTD, cent_BTC, labels_BT, mask_BT):
    del k
    stats = losses.head_stats(head, hidden_BTD, labels_BT, mask_BT, cent_BTC=cent_BTC, **kw).stats
    if not centroid_loss:
      return stats, None
    cent = losses.token_stats(cent_BTC, head.clusters_V[labels_BT], mask_BT,
                              top_k=dcfg.centroid_intermediate_top_k)
    return stats, cent

  out = joint_forward(params, buffers, batch, base_cfg, dcfg, jcfg, step_fn)
  labels_BT, mask_BT = out.targets.at(1)
  base = losses.head_stats(base_head(params, base_cfg), out.base_hidden, labels_BT, mask_BT,
                           **kw).stats
  step_stats, cent_stats = out.steps
  return losses.combine(base, step_stats, jcfg.drafter_loss_weight,
                        losses.step_weights(jcfg.num_draft_steps, jcfg.step_weights), cent_stats,
                        jcfg.centroid_loss_weight)
