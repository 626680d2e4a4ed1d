"""The Gemma 4 text decoder (E2B, E4B, 26B-A4B, 31B) as a Flax Linen module.

Forward modes, one code path:
  * no cache (training, scoring): every layer attends this call's own K/V;
  * with a `KVCache` (prefill, decode, speculative verify): new K/V are appended at each row's fill
    offset and queries attend the whole cache under a causal + sliding-window + validity mask.
KV-shared layers (the last `num_kv_shared_layers`) own no K/V projections and attend the K/V of the
last earlier non-shared layer of their type (the "store" layer). Store-layer K/V is returned for the
drafter, which reads exactly those two layers.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp_jax.model import attention
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import kv_cache as kv_cache_lib
from gemma_mtp_jax.model import layers
from gemma_mtp_jax.model import moe
from gemma_mtp_jax.model import unified_vision

Array = jax.Array


@flax.struct.dataclass
class StoreKV:
  """K/V of a store layer with the metadata a reader needs to mask it.

  k/v: [B, S, K, H]; positions_BS: RoPE position per slot; valid_BS: slot may be attended;
  segment_BS: packed-document id per slot (None outside training).
  """
  k: Array
  v: Array
  positions_BS: Array
  valid_BS: Array
  segment_BS: Array | None = None


@flax.struct.dataclass
class Output:
  logits: Array | None  # [B, T, V] float32, soft-capped
  hidden: Array  # [B, T, D] final hidden state after the final norm (what the drafter consumes)
  store_kv: dict[str, StoreKV]  # layer type -> K/V of its store layer
  cache: kv_cache_lib.KVCache | None


def rope_tables(cfg: config_lib.ModelConfig, layer_type: str, positions_BT: Array, dtype):
  """cos/sin [B, T, H] for one layer type (RoPE differs between sliding and global layers)."""
  if layer_type == config_lib.SLIDING:
    inv = layers.rope_inv_freq(cfg.head_dim, cfg.rope_local_theta, cfg.local_rope_type,
                               cfg.local_partial_rotary_factor)
  else:
    inv = layers.rope_inv_freq(cfg.global_head_dim, cfg.rope_global_theta, cfg.global_rope_type,
                               cfg.global_partial_rotary_factor)
  return layers.rope_cos_sin(positions_BT, inv, dtype)


def window_for(cfg: config_lib.ModelConfig, layer_type: str) -> int | None:
  return cfg.sliding_window if layer_type == config_lib.SLIDING else None


class Block(nn.Module):
  """One decoder layer: attention, (MoE +) MLP, optional per-layer-embedding residual.

  The MoE block is `moe.IMPLS[cfg.moe_impl]` (routed by default, dense as the reference): the same
  parameters either way, and the same module in training, prefill and decode.
  """

  cfg: config_lib.ModelConfig
  layer_idx: int
  # The attention mask's sliding window for this layer (None: global), as `window_for` gives it;
  # the drafter's layers see one more position (`drafter.kv_window`).
  window_override: int | None = None

  @property
  def window(self) -> int | None:
    if self.window_override is not None:
      return self.window_override
    return window_for(self.cfg, self.cfg.layer_types[self.layer_idx])

  @nn.compact
  def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_BTS, kv_in=None, cache_start_B=None,
               ple_BTP=None):
    """Returns (x [B,T,D], the (k, v) this layer attended or None if KV-shared); see Attention."""
    cfg, i = self.cfg, self.layer_idx
    dt, pdt = layers.as_dtype(cfg.dtype), layers.as_dtype(cfg.param_dtype)
    norm = functools.partial(layers.RMSNorm, cfg.rms_norm_eps, param_dtype=pdt)

    attn = attention.Attention(
        embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, num_kv_heads=cfg.layer_kv_heads(i),
        head_dim=cfg.layer_head_dim(i), has_kv=not cfg.is_kv_shared(i), k_eq_v=cfg.layer_k_eq_v(i),
        eps=cfg.rms_norm_eps, attn_softcap=cfg.attn_logit_softcap,
        chunk_size=cfg.attention_chunk_size, window=self.window, dtype=dt, param_dtype=pdt,
        name="attn")
    h_BTD, kv_out = attn(norm(name="pre_attention_norm")(x_BTD), cos_BTH, sin_BTH, mask_BTS, kv_in,
                         cache_start_B)
    x_BTD = x_BTD + norm(name="post_attention_norm")(h_BTD)

    residual_BTD = x_BTD
    h_BTD = layers.MLP(cfg.layer_hidden_dim(i), cfg.hidden_activation, dt, pdt, name="mlp")(
        norm(name="pre_ffw_norm")(x_BTD))
    if cfg.enable_moe:
      h1_BTD = norm(name="post_ffw_norm_1")(h_BTD)
      experts = moe.IMPLS[cfg.moe_impl](cfg.num_experts, cfg.top_k_experts, cfg.moe_hidden_dim,
                                        cfg.rms_norm_eps, cfg.hidden_activation, dt, pdt, name="moe")
      h2_BTD = experts(residual_BTD, norm(name="pre_ffw_norm_2")(residual_BTD))
      h_BTD = h1_BTD + norm(name="post_ffw_norm_2")(h2_BTD)
    x_BTD = residual_BTD + norm(name="post_ffw_norm")(h_BTD)

    if cfg.ple_dim:
      gate_DP = layers.param_with_axes(self, "ple_gate", layers.default_kernel_init,
                                       (cfg.embed_dim, cfg.ple_dim), pdt, ("embed", "ple"))
      proj_PD = layers.param_with_axes(self, "ple_proj", layers.default_kernel_init,
                                       (cfg.ple_dim, cfg.embed_dim), pdt, ("ple", "embed"))
      g_BTP = layers.activation(cfg.hidden_activation)(
          jnp.einsum("btd,dp->btp", x_BTD.astype(dt), gate_DP.astype(dt)))
      h_BTD = jnp.einsum("btp,pd->btd", g_BTP * ple_BTP.astype(dt), proj_PD.astype(dt))
      x_BTD = x_BTD + norm(name="post_ple_norm")(h_BTD)

    # A per-layer scalar that HF stores as a buffer (ones at init; checkpoints may differ).
    layer_scalar = layers.param_with_axes(self, "layer_scalar", nn.initializers.ones, (1,), pdt,
                                          (None,))
    x_BTD = x_BTD * layer_scalar.astype(x_BTD.dtype)
    x_BTD = nn.with_logical_constraint(
        x_BTD, ("activation_batch", "activation_length", "activation_embed"))
    return x_BTD, kv_out


MAX_SCAN_PERIOD = 8


def scan_plan(cfg: config_lib.ModelConfig) -> tuple[tuple[int, int, int], ...]:
  """Splits the layers into (first, period, repeats) runs for `scan_layers`.

  A run repeats a period of layers whose structure (type, KV-shared, MLP width) is identical from
  one repeat to the next, so one traced period serves all repeats: E4B's 42 layers become runs
  like (0, 6, 4) + (24, 6, 3). Layers that repeat nothing form runs of (i, 1, 1) and stay plain.
  """
  sig = [cfg.layer_signature(i) for i in range(cfg.num_layers)]
  n, i, plan = cfg.num_layers, 0, []
  while i < n:
    best = (1, 1)
    for p in range(1, min(MAX_SCAN_PERIOD, n - i) + 1):
      r = 1
      while i + (r + 1) * p <= n and sig[i + r * p:i + (r + 1) * p] == sig[i:i + p]:
        r += 1
      if r >= 2 and p * r > best[0] * best[1]:
        best = (p, r)
    plan.append((i, *best))
    i += best[0] * best[1]
  return tuple(plan)


class ScanPeriod(nn.Module):
  """One period of layers; `nn.scan` stacks its params over the repeats of a run."""

  cfg: config_lib.ModelConfig
  first: int
  period: int

  @nn.compact
  def __call__(self, x_BTD, xs, bc):
    ple_BTLP, cache_kv = xs  # per repeat: PLE inputs of the period's L layers, their cache buffers
    rope, masks, shared_kv, start_B = bc  # the same for every repeat
    block = layers.remat(Block, self.cfg.remat_policy)
    kv_outs = []
    for j in range(self.period):
      i = self.first + j
      lt = self.cfg.layer_types[i]
      kv_in = shared_kv[j] if self.cfg.is_kv_shared(i) else (
          cache_kv[j] if cache_kv is not None else None)
      ple_BTP = ple_BTLP[:, :, j] if ple_BTLP is not None else None
      x_BTD, kv_out = block(self.cfg, i, name=f"layer_{j}")(
          x_BTD, rope[lt][0], rope[lt][1], masks[lt], kv_in, start_B, ple_BTP)
      kv_outs.append(kv_out)
    return x_BTD, tuple(kv_outs)


def scanned_layers(cfg: config_lib.ModelConfig, first: int, period: int, repeats: int, name: str):
  # Sown router statistics (`moe.STATS_COLLECTION`) stack over the repeats like the params.
  return nn.scan(ScanPeriod, variable_axes={"params": 0, moe.STATS_COLLECTION: 0},
                 split_rngs={"params": True},
                 in_axes=(0, nn.broadcast), length=repeats,
                 metadata_params={nn.PARTITION_NAME: "layers"})(cfg, first, period, name=name)


class Transformer(nn.Module):
  """Gemma 4 text decoder with tied (or untied) LM head and final logit soft-capping."""

  cfg: config_lib.ModelConfig

  def setup(self):
    cfg = self.cfg
    pdt = layers.as_dtype(cfg.param_dtype)
    self.embedding = layers.param_with_axes(self, "embedding", nn.initializers.normal(1.0),
                                            (cfg.vocab_size, cfg.embed_dim), pdt, ("vocab", "embed"))
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.param_with_axes(self, "lm_head", layers.default_kernel_init,
                                            (cfg.embed_dim, cfg.vocab_size), pdt, ("embed", "vocab"))
    if cfg.ple_dim:
      lp = cfg.num_layers * cfg.ple_dim
      self.ple_embedding = layers.param_with_axes(
          self, "ple_embedding", nn.initializers.normal(1.0), (cfg.ple_vocab_size, lp), pdt,
          ("ple_vocab", "ple_layers"))
      self.ple_projection = layers.param_with_axes(
          self, "ple_projection", layers.default_kernel_init, (cfg.embed_dim, lp), pdt,
          ("embed", "ple_layers"))
      self.ple_norm = layers.RMSNorm(cfg.rms_norm_eps, param_dtype=pdt)
    block = layers.remat(Block, cfg.remat_policy)
    if cfg.scan_layers:
      self.plan = scan_plan(cfg)
      self.blocks = [block(cfg, f, name=f"layer_{f}") if r == 1 else
                     scanned_layers(cfg, f, p, r, name=f"scan_{f}") for f, p, r in self.plan]
    else:
      self.plan = tuple((i, 1, 1) for i in range(cfg.num_layers))
      self.blocks = [block(cfg, i, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.final_norm = layers.RMSNorm(cfg.rms_norm_eps, param_dtype=pdt)
    if cfg.vision is not None:  # gemma4's tower, or the 12B's patch embedder (by config type)
      self.vision = unified_vision.make_image_encoder(cfg.vision, cfg.embed_dim, cfg.dtype,
                                                      cfg.param_dtype, cfg.remat_policy)

  # -------------------------------------------------------------------------- pieces
  def embed(self, tokens_BT: Array) -> Array:
    """Token embedding times sqrt(D); the scale is rounded to the weight dtype as HF does."""
    return layers.embed_lookup(self.embedding, tokens_BT, layers.as_dtype(self.cfg.dtype))

  def per_layer_inputs(self, tokens_BT: Array, x_BTD: Array) -> Array:
    """PLE: (norm(proj(x) / sqrt(D)) + embed_ple(tok) * sqrt(P)) / sqrt(2), [B, T, L, P]."""
    cfg = self.cfg
    b, t = tokens_BT.shape
    dt = layers.as_dtype(cfg.dtype)
    tok_scale = jnp.asarray(cfg.ple_dim ** 0.5, dtype=self.ple_embedding.dtype)
    l, p = cfg.num_layers, cfg.ple_dim
    tok_BTLP = jnp.take(self.ple_embedding, tokens_BT, axis=0).reshape(b, t, l, p)
    tok_BTLP = (tok_BTLP * tok_scale).astype(dt)
    proj_DLP = self.ple_projection.astype(dt).reshape(cfg.embed_dim, l, p)
    proj_BTLP = jnp.einsum("btd,dlp->btlp", x_BTD, proj_DLP)
    proj_BTLP = self.ple_norm(proj_BTLP * jnp.asarray(cfg.embed_dim ** -0.5, dt))
    return (proj_BTLP + tok_BTLP) * jnp.asarray(2.0 ** -0.5, dt)

  def logits(self, hidden_BTD: Array) -> Array:
    """Final-norm hidden -> soft-capped float32 logits [B, T, V]."""
    params = {"embedding": self.embedding}
    if not self.cfg.tie_word_embeddings:
      params["lm_head"] = self.lm_head
    return layers.head_logits(hidden_BTD, head_VD(self.cfg, params), layers.as_dtype(self.cfg.dtype),
                              self.cfg.final_logit_softcap)

  # -------------------------------------------------------------------------- images
  def embed_inputs(self, tokens_BT: Array, image_soft=None) -> tuple[Array, Array | None, Array]:
    """(x [B,T,D], PLE inputs [B,T,L,P] or None, image_BT: image-token positions).

    As HF's `Gemma4Model`: on a multimodal model (`image_token_id` set) image, video and audio
    placeholder positions are embedded as the pad token, and their PLE token part is the pad's, with
    or without images (a decode step that emits one sees the pad too); the soft tokens then replace
    x at image positions, and the PLE projection part reads the merged x.
    """
    cfg = self.cfg
    image_BT = jnp.zeros(tokens_BT.shape, bool)
    if cfg.image_token_id is not None:
      image_BT = tokens_BT == cfg.image_token_id
      ids = [t for t in (cfg.video_token_id, cfg.audio_token_id) if t is not None]
      placeholder_BT = image_BT | jnp.isin(tokens_BT, jnp.asarray(ids, jnp.int32))
      tokens_BT = jnp.where(placeholder_BT, cfg.pad_token_id, tokens_BT)
    x_BTD = self.embed(tokens_BT)
    if image_soft is not None:
      x_BTD = merge_image_soft(x_BTD, image_BT, *image_soft)
    ple_BTLP = self.per_layer_inputs(tokens_BT, x_BTD) if cfg.ple_dim else None
    return x_BTD, ple_BTLP, image_BT

  def encode_images(self, pixel_values_Bipc: Array, pixel_positions_Bip2: Array):
    """The vision tower + embedder on a row's image slots: (soft_BisD, valid_Bis)."""
    if not hasattr(self, "vision"):
      raise ValueError("images given to a model without a vision tower (ModelConfig.vision is None)")
    return self.vision(pixel_values_Bipc, pixel_positions_Bip2)

  # -------------------------------------------------------------------------- forward
  def __call__(self, tokens_BT: Array, positions_BT: Array, valid_BT: Array | None = None,
               segment_ids_BT: Array | None = None, cache: kv_cache_lib.KVCache | None = None,
               return_logits: bool = True, image_soft: tuple[Array, Array] | None = None,
               images: tuple[Array, Array] | None = None) -> Output:
    """Runs the decoder.

    Args:
      tokens_BT: int token ids.
      positions_BT: int RoPE positions (per packed document in training; after left padding,
        count real tokens only).
      valid_BT: bool, False on padding (never attended). Defaults to all True.
      segment_ids_BT: packed-document ids; attention never crosses documents (no cache only).
      cache: a KVCache to append to and attend (prefill / decode / verify), or None.
      image_soft: (soft_BisD, valid_Bis), image soft tokens already in the text width: row b's
        valid ones fill, in order, its positions whose token is `image_token_id`.
      images: (pixel_values_Bipc, pixel_positions_Bip2) image slots, encoded by the "vision"
        submodule into `image_soft`.
    With images (either form) and `use_bidirectional_attention == "vision"`, each run of image
    tokens attends itself both ways (on the layer types of `image_overlay`; HF applies that only
    on calls given `mm_token_type_ids`: the prefill in `generate`; decode steps are causal, as here).
    """
    cfg = self.cfg
    if images is not None:
      if image_soft is not None:
        raise ValueError("pass either images or image_soft, not both")
      image_soft = self.encode_images(*images)
    if valid_BT is None:
      valid_BT = jnp.ones(tokens_BT.shape, bool)
    x_BTD, ple_BTLP, image_BT = self.embed_inputs(tokens_BT, image_soft)
    types = sorted(set(cfg.layer_types))
    rope = {lt: rope_tables(cfg, lt, positions_BT, x_BTD.dtype) for lt in types}
    bidirectional = image_soft is not None and cfg.use_bidirectional_attention == "vision"

    start_B, block_BT, kv_block_BS = None, None, None
    if cache is not None:
      start_B = cache.length_B
      if bidirectional:
        block_BT = attention.image_blocks(image_BT, offset_B=start_B)
      cache = kv_cache_lib.write_meta(cache, positions_BT, valid_BT, block_BT)
      kv_pos_BS, kv_valid_BS, kv_seg_BS = cache.positions_BS, cache.attend_mask(), None
      kv_block_BS = cache.block_BS if bidirectional else None
      segment_ids_BT = None
    else:
      kv_pos_BS, kv_valid_BS, kv_seg_BS = positions_BT, valid_BT, segment_ids_BT
      if bidirectional:
        block_BT = kv_block_BS = attention.image_blocks(image_BT, segment_ids_BT)
    masks = {}
    overlay, in_window = image_overlay(cfg)
    for lt in types:
      blocks = (block_BT, kv_block_BS) if lt in overlay else (None, None)
      masks[lt] = attention.causal_mask(positions_BT, kv_pos_BS, kv_valid_BS, window_for(cfg, lt),
                                        segment_ids_BT, kv_seg_BS, *blocks, in_window)
      if bidirectional and lt in overlay:
        masks[lt] = attention.Lookahead(masks[lt])

    x_BTD, layer_kv = self.run_layers(x_BTD, rope, masks, ple_BTLP, cache, start_B)
    hidden_BTD = self.final_norm(x_BTD)
    store_kv = {
        lt: StoreKV(layer_kv[i][0], layer_kv[i][1], kv_pos_BS, kv_valid_BS, kv_seg_BS)
        for lt, i in cfg.store_layers.items()
    }
    if cache is not None:
      cache = cache.replace(k={i: layer_kv[i][0] for i in cache.k},
                            v={i: layer_kv[i][1] for i in cache.v})
    logits_BTV = self.logits(hidden_BTD) if return_logits else None
    return Output(logits=logits_BTV, hidden=hidden_BTD, store_kv=store_kv, cache=cache)

  def run_layers(self, x_BTD, rope, masks, ple_BTLP, cache, start_B):
    """Every decoder layer (plain or scanned runs); returns (x, layer index -> the K/V it owns)."""
    cfg = self.cfg
    layer_kv: dict[int, tuple[Array, Array]] = {}  # K/V each owning layer attended
    for block, (first, period, repeats) in zip(self.blocks, self.plan):
      if repeats == 1:
        i, lt = first, cfg.layer_types[first]
        if cfg.is_kv_shared(i):
          kv_in = layer_kv[cfg.kv_source[i]]
        else:
          kv_in = (cache.k[i], cache.v[i]) if cache is not None else None
        ple_BTP = ple_BTLP[:, :, i, :] if ple_BTLP is not None else None
        x_BTD, kv_out = block(x_BTD, rope[lt][0], rope[lt][1], masks[lt], kv_in, start_B, ple_BTP)
        if kv_out is not None:
          layer_kv[i] = kv_out
        continue
      # A scanned run: per-repeat inputs are stacked on a leading axis, outputs unstacked.
      idx = [[first + k * period + j for k in range(repeats)] for j in range(period)]
      ple_xs = None
      if ple_BTLP is not None:
        b, t = ple_BTLP.shape[:2]
        ple_xs = ple_BTLP[:, :, first:first + period * repeats].reshape(
            b, t, repeats, period, cfg.ple_dim).transpose(2, 0, 1, 3, 4)
      cache_xs = None
      if cache is not None:
        cache_xs = tuple(None if cfg.is_kv_shared(ii[0]) else
                         (jnp.stack([cache.k[i] for i in ii]), jnp.stack([cache.v[i] for i in ii]))
                         for ii in idx)
      shared = tuple(layer_kv[cfg.kv_source[ii[0]]] if cfg.is_kv_shared(ii[0]) else None
                     for ii in idx)
      x_BTD, kv_ys = block(x_BTD, (ple_xs, cache_xs), (rope, masks, shared, start_B))
      for ii, kv in zip(idx, kv_ys):
        if kv is not None:
          for k, i in enumerate(ii):
            layer_kv[i] = (kv[0][k], kv[1][k])
    return x_BTD, layer_kv


def image_overlay(cfg: config_lib.ModelConfig) -> tuple[tuple[str, ...], bool]:
  """(layer types whose mask gets the bidirectional image-block overlay, whether the sliding
  window also bounds it): `cfg.image_block_layers` and `cfg.image_block_in_window`, which the
  family table (`checkpoint.hf_config`) sets to what HF's `generate` runs with its default
  (dynamic) cache.

  gemma4 (`Gemma4Model.forward`, `create_masks_for_vision_model`): sliding layers only, as
  AND(window, OR(causal, block)). The 12B (`Gemma4UnifiedModel.forward`) passes the block ids to
  masking_utils' `create_masks_for_generate` instead: the overlay on full AND sliding layers, the
  sliding one as OR(AND(window, causal), block), so an image longer than the window still sees
  all of itself. (transformers 5.23's unified `create_masks_for_generate` static method, used only
  with compileable caches, builds gemma4's masks instead: an HF inconsistency; we follow the
  dynamic-cache forward, which `generate` and a plain forward call run.)
  """
  return cfg.image_block_layers, cfg.image_block_in_window


def merge_image_soft(x_BTD: Array, image_BT: Array, soft_BisD: Array, valid_Bis: Array) -> Array:
  """x with row b's valid soft tokens written, in slot order, at its image-token positions (HF's
  masked_scatter, per row). Static shapes: the valid tokens are compacted by a stable sort, the
  k-th image token of a row takes the k-th of them; image tokens beyond the row's valid soft tokens
  keep x (HF raises on that mismatch; `decoding` checks it on the host)."""
  b, i, s, d = soft_BisD.shape
  soft_BnD = soft_BisD.reshape(b, i * s, d).astype(x_BTD.dtype)
  valid_Bn = valid_Bis.reshape(b, i * s)
  order_Bn = jnp.argsort(jnp.where(valid_Bn, 0, 1), axis=1, stable=True)
  soft_BnD = jnp.take_along_axis(soft_BnD, order_Bn[..., None], axis=1)
  k_BT = jnp.cumsum(image_BT, axis=1, dtype=jnp.int32) - 1
  take_BT = image_BT & (k_BT < jnp.sum(valid_Bn, axis=1, dtype=jnp.int32)[:, None])
  got_BTD = jnp.take_along_axis(soft_BnD, jnp.clip(k_BT, 0, i * s - 1)[..., None], axis=1)
  return jnp.where(take_BT[..., None], got_BTD, x_BTD)


def head_VD(cfg: config_lib.ModelConfig, params: Mapping) -> Array:
  """The base's LM head as a [V, D] matrix (the one place that decides tied vs lm_head): the
  embedding table when `tie_word_embeddings`, else the [D, V] `lm_head` transposed."""
  return params["embedding"] if cfg.tie_word_embeddings else params["lm_head"].T


def init_params(cfg: config_lib.ModelConfig, rng: Array, batch: int = 1, length: int = 4):
  """Random params (boxed with logical axes; `nn.unbox` them for plain arrays)."""
  tokens = jnp.zeros((batch, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  images = unified_vision.dummy_inputs(cfg.vision, batch) if cfg.vision is not None else None
  return Transformer(cfg).init(rng, tokens, positions, images=images)["params"]


def param_shapes(cfg: config_lib.ModelConfig):
  """Param ShapeDtypeStructs without allocating anything (jax.eval_shape)."""
  boxed = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
  return nn.unbox(boxed)


def count_params(cfg: config_lib.ModelConfig) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(param_shapes(cfg))))


def stack_layer_params(cfg: config_lib.ModelConfig, params: dict) -> dict:
  """Loop layout (`layer_{i}`) -> the `scan_layers` layout (`scan_{first}/layer_{j}`, stacked)."""
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  for first, period, repeats in scan_plan(cfg):
    if repeats == 1:
      out[f"layer_{first}"] = params[f"layer_{first}"]
      continue
    out[f"scan_{first}"] = {
        f"layer_{j}": jax.tree.map(
            lambda *xs: jnp.stack(xs),
            *[params[f"layer_{first + k * period + j}"] for k in range(repeats)])
        for j in range(period)}
  return out


def unstack_layer_params(cfg: config_lib.ModelConfig, params: dict) -> dict:
  """The `scan_layers` layout -> loop layout (what the HF converters read and write)."""
  out = {k: v for k, v in params.items() if not k.startswith("scan_")}
  for first, period, repeats in scan_plan(cfg):
    if repeats == 1:
      continue
    for j in range(period):
      stacked = params[f"scan_{first}"][f"layer_{j}"]
      for k in range(repeats):
        out[f"layer_{first + k * period + j}"] = jax.tree.map(lambda x: x[k], stacked)
  return out
