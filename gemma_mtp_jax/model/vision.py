"""The Gemma 4 vision tower and multimodal embedder in Flax (HF `Gemma4VisionModel` +
`Gemma4MultimodalEmbedder`): image patches in, soft tokens of the text model's width out.

  pixels [B, i, p, c] --(2(x - 0.5), input_proj, + 2-D position table)--> [b, p, d]
    --(encoder layers: bidirectional attention over the image's real patches, 2-D RoPE)-->
    --(pooler: average k x k patch blocks into s = p / k^2 slots, * sqrt(d) in float32)-->
    --(standardize, when configured)--> features [b, s, d]
    --(embedder: scale-free RMSNorm, projection d -> D)--> soft tokens [B, i, s, D]

The shape letters are the package's (`gemma_mtp_jax.model`; the tower's own: b, d, h, q).
Padding patches (position (-1, -1), as HF's image processor pads) get no position embedding, are
never attended to, and add nothing to the pool; an empty slot (all patches padding) yields no valid
soft token. HF's `get_image_features` strips invalid slots; here they stay in place (zeroed) with
`valid_Bis` saying which are real, so shapes are static.

Non-trainable constants (HF buffers: the clip bounds `input_min/input_max/output_min/output_max`
of each clipped linear when `use_clipped_linears`, and `std_bias/std_scale` when `standardize`) are
kept as ordinary leaves of the params tree under their HF names (`BUFFER_NAMES`), so one tree
converts and exports bit for bit. The forward reads them through `jax.lax.stop_gradient`: their
gradient is exactly zero, and being scalars / vectors they get no weight decay
(`training.optimizer.decay_mask`), so AdamW leaves them unchanged even when the tower trains. A
trainer that wants them out of the optimizer state altogether can mask them with `is_buffer`.

`VisionConfig` lives in the JAX-free `model.vision_config` and is re-exported here (its HF config
dict is `checkpoint.hf_config`'s).

Logical axis names of the params (no rule names them by default, so they are replicated; add rules
to shard the tower): vision_patch (c), vision_embed (d), vision_pos (position table rows),
vision_heads, vision_kv_heads, vision_head_dim, vision_mlp, norm; the embedder's projection is
(vision_embed, embed).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp_jax.model import layers
from gemma_mtp_jax.model.vision_config import (  # re-exported: the vision API
    BUFFER_NAMES, MULTIMODAL_TOKEN_FIELDS, VisionConfig, as_vision_config, is_buffer)

__all__ = ["BUFFER_NAMES", "MULTIMODAL_TOKEN_FIELDS", "VisionConfig", "as_vision_config",
           "is_buffer", "dummy_images", "VisionEncoder",
           "VisionLayer", "VisionAttention", "VisionMLP", "ClippableLinear", "pool", "rope_cos_sin",
           "apply_rope_2d"]
Array = jax.Array


def dummy_images(cfg: VisionConfig, batch: int = 1) -> tuple[Array, Array]:
  """(pixel_values_Bipc, pixel_positions_Bip2) of one empty slot per row with the fewest patches a
  pooled image can have (k**2): what `init` needs to create the tower's params."""
  p = cfg.pooling_kernel_size ** 2
  return (jnp.zeros((batch, 1, p, cfg.channels), jnp.float32),
          jnp.full((batch, 1, p, 2), -1, jnp.int32))


# ------------------------------------------------------------------ modules
def _const(module: nn.Module, name: str, init, shape, dtype, axes) -> Array:
  """A non-trainable constant kept in params (see the module docstring): no gradient flows."""
  return jax.lax.stop_gradient(layers.param_with_axes(module, name, init, shape, dtype, axes))


class ClippableLinear(nn.Module):
  """HF `Gemma4ClippableLinear`: `eqn`(x, kernel), with input and output clamped to the stored
  bounds when `clipped` (bounds init to +-max of the dtype: no clipping until a checkpoint sets them)."""

  kernel_shape: tuple[int, ...]
  axes: tuple[str, ...]
  eqn: str
  clipped: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = layers.param_with_axes(self, "kernel", layers.default_kernel_init, self.kernel_shape,
                                    self.param_dtype, self.axes)
    x = x.astype(self.dtype)
    if self.clipped:
      big = float(jnp.finfo(self.param_dtype).max)
      bound = lambda n, v: _const(self, n, nn.initializers.constant(v), (), self.param_dtype, ())
      lo_in, hi_in = bound("input_min", -big), bound("input_max", big)
      lo_out, hi_out = bound("output_min", -big), bound("output_max", big)
      x = jnp.clip(x, lo_in.astype(x.dtype), hi_in.astype(x.dtype))
    y = jnp.einsum(self.eqn, x, kernel.astype(self.dtype))
    if self.clipped:
      y = jnp.clip(y, lo_out.astype(y.dtype), hi_out.astype(y.dtype))
    return y


def rope_cos_sin(positions_bp2: Array, cfg: VisionConfig, dtype) -> tuple[Array, Array]:
  """HF `Gemma4VisionRotaryEmbedding`: cos/sin [b, p, H] laid out [x, x, y, y] (each a quarter:
  head_dim // 4 frequencies of theta over head_dim // 2). Padding's -1 positions go in as they are
  (their keys are masked and their outputs never pooled)."""
  spatial = cfg.head_dim // 2
  inv = (1.0 / (np.float32(cfg.rope_theta) ** (
      np.arange(0, spatial, 2, dtype=np.int64).astype(np.float32) / np.float32(spatial))))
  freqs_bp2h = positions_bp2[..., None].astype(jnp.float32) * jnp.asarray(inv, jnp.float32)
  fx, fy = freqs_bp2h[:, :, 0], freqs_bp2h[:, :, 1]
  angles_bpH = jnp.concatenate([fx, fx, fy, fy], axis=-1)
  return jnp.cos(angles_bpH).astype(dtype), jnp.sin(angles_bpH).astype(dtype)


def apply_rope_2d(x_bpNH: Array, cos_bpH: Array, sin_bpH: Array) -> Array:
  """HF `apply_multidimensional_rope` with 2 dims: the first half of each head rotates by x, the
  second by y, each half with its own rotate_half."""
  half = x_bpNH.shape[-1] // 2
  return jnp.concatenate([
      layers.apply_rope(x_bpNH[..., :half], cos_bpH[..., :half], sin_bpH[..., :half]),
      layers.apply_rope(x_bpNH[..., half:], cos_bpH[..., half:], sin_bpH[..., half:])], axis=-1)


class VisionAttention(nn.Module):
  """Bidirectional self-attention over an image's patches: q/k RMSNorm with scale, v without,
  2-D RoPE on q and k, scaling 1.0 (the norms set the scale), padding patches masked as keys."""

  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_bpd: Array, cos_bpH, sin_bpH, valid_bp: Array) -> Array:
    c = self.cfg
    d, n, k, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    lin = functools.partial(ClippableLinear, clipped=c.use_clipped_linears, dtype=self.dtype,
                            param_dtype=self.param_dtype)
    heads_in = lambda name, nh, ax: lin((d, nh, h), ("vision_embed", ax, "vision_head_dim"),
                                        "bpd,dnh->bpnh", name=name)(x_bpd)
    norm = functools.partial(layers.RMSNorm, c.rms_norm_eps, param_dtype=self.param_dtype)
    q_bpNH = apply_rope_2d(norm(name="q_norm")(heads_in("q", n, "vision_heads")), cos_bpH, sin_bpH)
    k_bpKH = apply_rope_2d(norm(name="k_norm")(heads_in("k", k, "vision_kv_heads")), cos_bpH,
                           sin_bpH)
    v_bpKH = norm(with_scale=False, name="v_norm")(heads_in("v", k, "vision_kv_heads"))
    nb, p = q_bpNH.shape[:2]
    q_bpKGH = q_bpNH.reshape(nb, p, k, n // k, h)
    s_bKGpq = jnp.einsum("bpkgh,bqkh->bkgpq", q_bpKGH, k_bpKH, preferred_element_type=jnp.float32)
    # A finite floor (as HF's additive mask): an empty image's rows stay finite, not NaN.
    s_bKGpq = jnp.where(valid_bp[:, None, None, None, :], s_bKGpq, jnp.finfo(jnp.float32).min)
    w_bKGpq = jax.nn.softmax(s_bKGpq, axis=-1).astype(self.dtype)
    o_bpKGH = jnp.einsum("bkgpq,bqkh->bpkgh", w_bKGpq, v_bpKH.astype(self.dtype))
    o_bpNH = o_bpKGH.reshape(nb, p, n, h)
    return lin((n, h, d), ("vision_heads", "vision_head_dim", "vision_embed"), "bpnh,nhd->bpd",
               name="o")(o_bpNH)


class VisionMLP(nn.Module):
  """Gated MLP of clippable linears: down(act(gate(x)) * up(x))."""

  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_bpd: Array) -> Array:
    c = self.cfg
    lin = functools.partial(ClippableLinear, clipped=c.use_clipped_linears, dtype=self.dtype,
                            param_dtype=self.param_dtype)
    up = ("vision_embed", "vision_mlp")
    g_bpF = lin((c.hidden_size, c.intermediate_size), up, "bpd,df->bpf", name="gate")(x_bpd)
    u_bpF = lin((c.hidden_size, c.intermediate_size), up, "bpd,df->bpf", name="up")(x_bpd)
    h_bpF = layers.activation(c.hidden_activation)(g_bpF) * u_bpF
    return lin((c.intermediate_size, c.hidden_size), ("vision_mlp", "vision_embed"), "bpf,fd->bpd",
               name="down")(h_bpF)


class VisionLayer(nn.Module):
  """One encoder layer (HF `Gemma4VisionEncoderLayer`): sandwich norms around attention and MLP."""

  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_bpd: Array, cos_bpH, sin_bpH, valid_bp) -> Array:
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(layers.RMSNorm, c.rms_norm_eps, param_dtype=self.param_dtype)
    h = VisionAttention(c, name="attn", **kw)(norm(name="pre_attention_norm")(x_bpd), cos_bpH,
                                              sin_bpH, valid_bp)
    x_bpd = x_bpd + norm(name="post_attention_norm")(h)
    h = VisionMLP(c, name="mlp", **kw)(norm(name="pre_ffw_norm")(x_bpd))
    x_bpd = x_bpd + norm(name="post_ffw_norm")(h)
    return nn.with_logical_constraint(
        x_bpd, ("activation_batch", "activation_length", "activation_embed"))


def pool(x_bpd: Array, positions_bp2: Array, valid_bp: Array, k: int, dtype) -> tuple[Array, Array]:
  """HF `Gemma4VisionPooler`: (float32 [b, s, d] averages of each k x k block of patches, laid out
  row-major over the image's block grid, times sqrt(d); valid_bs: slots holding a real patch).

  Differs from HF only where HF is degenerate: an all-padding image has no valid slot (HF's mask
  marks slot 0) and k == 1 marks the real patches valid (HF returns the padding mask there)."""
  x_bpd = jnp.where(valid_bp[..., None], x_bpd, 0).astype(dtype)
  p, d = x_bpd.shape[1:]
  if k == 1:
    out_bsd, valid_bs = x_bpd, valid_bp
  else:
    s = p // (k * k)
    pos_bp2 = jnp.maximum(positions_bp2, 0)
    width_b1 = jnp.max(pos_bp2[..., 0], axis=-1, keepdims=True) + 1
    block_bp2 = pos_bp2 // k
    slot_bp = block_bp2[..., 0] + (width_b1 // k) * block_bp2[..., 1]
    onehot_bps = jax.nn.one_hot(slot_bp, s, dtype=jnp.float32)
    out_bsd = jnp.einsum("bps,bpd->bsd", onehot_bps / (k * k), x_bpd.astype(jnp.float32))
    out_bsd = out_bsd.astype(dtype)
    valid_bs = jnp.any((onehot_bps > 0) & valid_bp[..., None], axis=1)
  return out_bsd.astype(jnp.float32) * float(d) ** 0.5, valid_bs


class VisionEncoder(nn.Module):
  """The tower + multimodal embedder: `__call__(pixel_values_Bipc, pixel_positions_Bip2) ->
  (soft_BisD, valid_Bis)` (soft tokens in the text width `text_dim`, zero at invalid slots)."""

  cfg: VisionConfig
  text_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"

  def setup(self):
    c, pdt = self.cfg, layers.as_dtype(self.param_dtype)
    p = functools.partial(layers.param_with_axes, self, dtype=pdt)
    self.input_proj = p("input_proj", layers.default_kernel_init, (c.channels, c.hidden_size),
                        axes=("vision_patch", "vision_embed"))
    self.position_table = p("position_table", nn.initializers.normal(0.02),
                            (2, c.position_embedding_size, c.hidden_size),
                            axes=(None, "vision_pos", "vision_embed"))
    layer = layers.remat(VisionLayer, self.remat_policy)
    self.layers = [layer(c, layers.as_dtype(self.dtype), pdt, name=f"layer_{j}")
                   for j in range(c.num_hidden_layers)]
    if c.standardize:
      self.std_bias = _const(self, "std_bias", nn.initializers.zeros, (c.hidden_size,), pdt,
                             ("vision_embed",))
      self.std_scale = _const(self, "std_scale", nn.initializers.ones, (c.hidden_size,), pdt,
                              ("vision_embed",))
    self.projection = p("projection", layers.default_kernel_init, (c.hidden_size, self.text_dim),
                        axes=("vision_embed", "embed"))

  def embed_patches(self, pixels_bpc: Array, positions_bp2: Array, valid_bp: Array) -> Array:
    """HF `Gemma4VisionPatchEmbedder`: input_proj(2 (x - 0.5)) + x-row + y-row of the table."""
    dt = layers.as_dtype(self.dtype)
    x_bpc = (2 * (pixels_bpc - 0.5)).astype(dt)
    h_bpd = jnp.einsum("bpc,cd->bpd", x_bpc, self.input_proj.astype(dt))
    pos_bp2 = jnp.maximum(positions_bp2, 0)
    table = self.position_table
    pe_bpd = jnp.take(table[0], pos_bp2[..., 0], axis=0) + jnp.take(table[1], pos_bp2[..., 1], axis=0)
    return h_bpd + jnp.where(valid_bp[..., None], pe_bpd, 0).astype(dt)

  def features(self, pixel_values_Bipc: Array, pixel_positions_Bip2: Array) -> tuple[Array, Array]:
    """The tower's output before the embedder (HF `Gemma4VisionModel`'s last_hidden_state, here
    per slot): (features_Bisd in `dtype`, valid_Bis)."""
    c, dt = self.cfg, layers.as_dtype(self.dtype)
    b, i, p, ch = pixel_values_Bipc.shape
    if ch != c.channels:
      raise ValueError(f"pixel values have {ch} values per patch; the vision config's "
                       f"patch_size={c.patch_size} needs 3 * {c.patch_size}**2 = {c.channels}")
    s = c.soft_tokens(p)
    pixels_bpc = pixel_values_Bipc.reshape(b * i, p, ch)
    positions_bp2 = pixel_positions_Bip2.reshape(b * i, p, 2).astype(jnp.int32)
    valid_bp = jnp.any(positions_bp2 != -1, axis=-1)  # HF: padding iff both coordinates are -1
    x_bpd = self.embed_patches(pixels_bpc, positions_bp2, valid_bp)
    cos_bpH, sin_bpH = rope_cos_sin(positions_bp2, c, dt)
    for layer in self.layers:
      x_bpd = layer(x_bpd, cos_bpH, sin_bpH, valid_bp)
    x_bsd, valid_bs = pool(x_bpd, positions_bp2, valid_bp, c.pooling_kernel_size, dt)
    if c.standardize:  # in float32: the bias cancels the large pooled values
      x_bsd = (x_bsd - self.std_bias.astype(jnp.float32)) * self.std_scale.astype(jnp.float32)
    return x_bsd.astype(dt).reshape(b, i, s, -1), valid_bs.reshape(b, i, s)

  def __call__(self, pixel_values_Bipc: Array, pixel_positions_Bip2: Array) -> tuple[Array, Array]:
    """(soft_BisD, valid_Bis): HF `Gemma4MultimodalEmbedder` (scale-free RMSNorm with the vision
    eps, projection to the text width) on `features`; invalid slots are zero."""
    dt = layers.as_dtype(self.dtype)
    feats_Bisd, valid_Bis = self.features(pixel_values_Bipc, pixel_positions_Bip2)
    normed = layers.rms_normalize(feats_Bisd, self.cfg.rms_norm_eps).astype(feats_Bisd.dtype)
    soft_BisD = jnp.einsum("bisd,dD->bisD", normed.astype(dt), self.projection.astype(dt))
    return jnp.where(valid_Bis[..., None], soft_BisD, 0).astype(dt), valid_Bis
