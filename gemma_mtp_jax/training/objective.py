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
Why not NeMo's pairing: NeMo-Automodel's composite (`Gemma4WithDrafter.forward`) pairs E(x_t) with
h_t in its round 0, so round 0 learns what h_t already predicts, and it calls the HF drafter on the
whole row, whose eager masks are not causal: a query reads base K/V of positions after it (full
layers: the whole row; sliding layers: an anti-diagonal band). At inference those positions are not
verified yet. `train.drafter_objective = "nemo_composite"` reproduces that forward exactly (see
`objectives.nemo_composite_pairing`) so the two can be compared (`python -m benchmarks objective`).
What the objectives differ in, and the names `train.drafter_objective` takes, are the registry of
`training/objectives.py`; this module reads it and switches on no objective's name.

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
from gemma_mtp_jax.model import moe
from gemma_mtp_jax.model import transformer
from gemma_mtp_jax.training import losses
from gemma_mtp_jax.training import objectives
from gemma_mtp_jax.training.config import TrainConfig

Array = jax.Array
Batch = Mapping[str, Array]


# ------------------------------------------------------------------------------ the batch
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


# ------------------------------------------------------------------------------ forward
@flax.struct.dataclass
class JointOutput:
  base_logits: Array | None  # [B, T, V] float32, soft-capped; only with the default step_fn
  base_hidden: Array  # [B, T, M]
  steps: Any  # what `step_fn` returned for each step, stacked on a leading A axis
  targets: objectives.Targets  # the batch's labels and masks (`targets.at(1)`: the base's)
  router: dict[str, Array] | None = None  # MoE bases: `moe.router_losses` of the base forward


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


def batch_images(batch: Batch):
  """The batch's image slots `(pixel_values_Bipc, pixel_positions_Bip2)`, or None for text-only
  data (`gemma_mtp_jax.data` adds them only when the data has images)."""
  if "pixel_values" not in batch:
    return None
  return batch["pixel_values"], batch["pixel_positions"]


def base_forward(base_params: Mapping, base_cfg: config_lib.ModelConfig, tokens_BT: Array,
                 pos_BT: Array, valid_BT: Array, seg_BT: Array | None, return_logits: bool,
                 images=None):
  """The base's forward; (transformer.Output, router metrics or None). `images`: the rows' image
  slots (`batch_images`), encoded by the base's vision tower into its image-token positions. An
  MoE base is applied with its router statistics collected (`moe.router_losses`: the optional
  router losses and the per-expert load the trainer logs)."""
  model = transformer.Transformer(base_cfg)
  args = (tokens_BT, pos_BT, valid_BT, seg_BT)
  kw = dict(return_logits=return_logits)
  if images is not None:
    kw["images"] = images
  if not base_cfg.enable_moe:
    return model.apply({"params": base_params}, *args, **kw), None
  out, state = model.apply({"params": base_params}, *args, **kw, mutable=[moe.STATS_COLLECTION])
  return out, moe.router_losses(state)


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
  base_out, router = base_forward(params["base"], base_cfg, tokens_BT, pos_BT, valid_BT, seg_BT,
                                  return_logits=inspect, images=batch_images(batch))
  store_kv, h_BTM = base_out.store_kv, base_out.hidden
  if not jcfg.drafter_grads_to_base:
    store_kv, h_BTM = jax.lax.stop_gradient((store_kv, h_BTM))
  embedding_VM = params["base"]["embedding"]
  if not jcfg.share_embedding_with_base:
    embedding_VM = jax.lax.stop_gradient(embedding_VM)

  # One [B, T, S] mask per layer type, the same for every k: the drafter never reads its own drafts.
  obj = objectives.get(jcfg.drafter_objective)
  pairing = obj.pairing(dcfg, jcfg, store_kv, pos_BT, seg_BT)
  if not obj.chunked_attention:  # chunks skip keys outside a causal window; these masks are none
    dcfg = dcfg.replace(text=dcfg.text.replace(attention_chunk_size=0))
  targets = objectives.Targets.build(tokens_BT, seg_BT, valid_BT, lm_BT, jcfg.num_draft_steps)
  model = drafter_lib.Drafter(dcfg)
  variables = drafter_variables(params["drafter"], buffers)
  dt = layers.as_dtype(dcfg.text.dtype)
  with_centroids = dcfg.use_ordered_embeddings and (
      centroids or jcfg.centroid_loss_weight > 0 or not jcfg.dense_head)

  def body(h_BTM_, k):
    tok_BT, labels_BT, mask_BT = pairing.step_arrays(targets, k)  # aligned: x_{t+k+1}, x_{t+k+2}
    emb_BTM = drafter_lib.embed_tokens(embedding_VM, tok_BT, dt)
    hidden_BTD, h_next_BTM = model.apply(variables, emb_BTM, h_BTM_, pairing.q_pos_BT, store_kv,
                                         pairing.masks)
    cent_BTC = (model.apply(variables, hidden_BTD, method=drafter_lib.Drafter.centroid_logits)
                if with_centroids else None)
    return h_next_BTM, step_fn(k, hidden_BTD, cent_BTC, labels_BT, mask_BT)

  if dcfg.text.remat_policy != "none":
    # Keep only the carried hidden per step for the backward pass, not each step's [B, T, V] logits
    # (step_fn reduces them inside the body); the step is recomputed, which the drafter makes cheap.
    body = jax.checkpoint(body, prevent_cse=False)
  _, steps = jax.lax.scan(body, h_BTM.astype(dt), jnp.arange(jcfg.num_draft_steps))
  return JointOutput(base_logits=base_out.logits, base_hidden=base_out.hidden, steps=steps,
                     targets=targets, router=router)


def token_clusters(buffers: Mapping, dcfg: config_lib.DrafterConfig) -> Array:
  """int32 [V]: the centroid whose token list holds each token (inverse of `token_ordering`)."""
  v = dcfg.text.vocab_size
  ordering_V = jnp.asarray(buffers["token_ordering"]).astype(jnp.int32)
  slot_V = jnp.zeros((v,), jnp.int32).at[ordering_V].set(jnp.arange(v, dtype=jnp.int32))
  return slot_V // (v // dcfg.num_centroids)


def loss_fn(params: Mapping, buffers: Mapping | None, batch: Batch,
            base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig,
            jcfg: TrainConfig) -> tuple[Array, dict[str, Array]]:
  """L = L_base + lambda * sum_k w_k L_k; returns (loss, metrics).

  Each L is a mean over its valid targets, except where the objective has a step normaliser
  (`objectives.Objective.step_norm`; "nemo_composite": `objectives.base_count_norm`, round k's
  summed CE over the BASE's target count). The per-step metrics (`drafter/loss_k`) stay per-token
  means either way."""
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
  step_norm = objectives.get(jcfg.drafter_objective).step_norm
  norm_A = step_norm(base, jcfg.num_draft_steps) if step_norm else None
  loss, metrics = losses.combine(
      base, step_stats, jcfg.drafter_loss_weight,
      losses.step_weights(jcfg.num_draft_steps, jcfg.step_weights), cent_stats,
      jcfg.centroid_loss_weight, step_norm_A=norm_A)
  if out.router is not None:
    loss = loss + (jcfg.router_aux_loss_weight * out.router["router_aux_loss"]
                   + jcfg.router_z_loss_weight * out.router["router_z_loss"])
    metrics["loss"] = loss
    metrics.update({f"router/{k.removeprefix('router_')}": v for k, v in out.router.items()})
  return loss, metrics
