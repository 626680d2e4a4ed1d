"""The Gemma 4 vision tower and multimodal embedder in Flax (HF `Gemma4VisionModel` +
`Gemma4MultimodalEmbedder`): image patches in, soft tokens of the text model's width out.

  pixels [B, i, p, c] --(2(x - 0.5), input_proj, + 2-D position table)--> [X, p, d]
    --(encoder layers: bidirectional attention over the image's real patches, 2-D RoPE)-->
    --(pooler: average k x k patch blocks into s = p / k^2 slots, * sqrt(d) in float32)-->
    --(standardize, when configured)--> features [X, s, d]
    --(embedder: scale-free RMSNorm, projection d -> D)--> soft tokens [B, i, s, D]

X = B * i (every image slot of the batch, flattened); d is the tower's width, D the text model's.
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
from gemma_mtp_jax.model.common import ConfigError
from gemma_mtp_jax.model.vision_config import (  # re-exported: the vision API
    BUFFER_NAMES, MULTIMODAL_TOKEN_FIELDS, VisionConfig, as_vision_config, is_buffer)

__all__ = ["BUFFER_NAMES", "MULTIMODAL_TOKEN_FIELDS", "VisionConfig", "as_vision_config",
           "is_buffer", "dummy_images", "VisionEncoder",
           "VisionLayer", "VisionAttention", "VisionMLP", "ClippableLinear", "pool", "rope_cos_sin",
           "apply_rope_2d", "REMAT_POLICIES"]
Array = jax.Array
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


def dummy_images(cfg: VisionConfig, batch: int = 1) -> tuple[Array, Array]:
  """(pixel_values_Bipc, pixel_positions_Bip2) of one empty slot per row with the fewest patches a
  pooled image can have (k**2): what `init` needs to create the tower's params."""
  p = cfg.pooling_kernel_size ** 2
  return (jnp.zeros((batch, 1, p, cfg.channels), jnp.float32),
          jnp.full((batch, 1, p, 2), -1, jnp.int32))


# ------------------------------------------------------------------ modules
def _remat(cls, policy: str):
  """`cls` under `nn.remat` with the text model's policy names (see `transformer.remat_block`)."""
  if policy == "none":
    return cls
  policies = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots,
              "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}
  if policy not in policies:
    raise ConfigError(f"unknown remat policy {policy!r}; expected one of {REMAT_POLICIES}")
  return nn.remat(cls, policy=policies[policy])


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


def rope_cos_sin(positions_Xp2: Array, cfg: VisionConfig, dtype) -> tuple[Array, Array]:
  """HF `Gemma4VisionRotaryEmbedding`: cos/sin [X, p, H] laid out [x, x, y, y] (each a quarter:
  head_dim // 4 frequencies of theta over head_dim // 2). Padding's -1 positions go in as they are
  (their keys are masked and their outputs never pooled)."""
  spatial = cfg.head_dim // 2
  inv = (1.0 / (np.float32(cfg.rope_theta) ** (
      np.arange(0, spatial, 2, dtype=np.int64).astype(np.float32) / np.float32(spatial))))
  freqs_Xp2h = positions_Xp2[..., None].astype(jnp.float32) * jnp.asarray(inv, jnp.float32)
  fx, fy = freqs_Xp2h[:, :, 0], freqs_Xp2h[:, :, 1]
  angles_XpH = jnp.concatenate([fx, fx, fy, fy], axis=-1)
  return jnp.cos(angles_XpH).astype(dtype), jnp.sin(angles_XpH).astype(dtype)


def apply_rope_2d(x_XpNH: Array, cos_XpH: Array, sin_XpH: Array) -> Array:
  """HF `apply_multidimensional_rope` with 2 dims: the first half of each head rotates by x, the
  second by y, each half with its own rotate_half."""
  half = x_XpNH.shape[-1] // 2
  return jnp.concatenate([
      layers.apply_rope(x_XpNH[..., :half], cos_XpH[..., :half], sin_XpH[..., :half]),
      layers.apply_rope(x_XpNH[..., half:], cos_XpH[..., half:], sin_XpH[..., half:])], axis=-1)


class VisionAttention(nn.Module):
  """Bidirectional self-attention over an image's patches: q/k RMSNorm with scale, v without,
  2-D RoPE on q and k, scaling 1.0 (the norms set the scale), padding patches masked as keys."""

  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_XpD: Array, cos_XpH, sin_XpH, valid_Xp: Array) -> Array:
    c = self.cfg
    d, n, k, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    lin = functools.partial(ClippableLinear, clipped=c.use_clipped_linears, dtype=self.dtype,
                            param_dtype=self.param_dtype)
    heads_in = lambda name, nh, ax: lin((d, nh, h), ("vision_embed", ax, "vision_head_dim"),
                                        "xpd,dnh->xpnh", name=name)(x_XpD)
    norm = functools.partial(layers.RMSNorm, c.rms_norm_eps, param_dtype=self.param_dtype)
    q_XpNH = apply_rope_2d(norm(name="q_norm")(heads_in("q", n, "vision_heads")), cos_XpH, sin_XpH)
    k_XpKH = apply_rope_2d(norm(name="k_norm")(heads_in("k", k, "vision_kv_heads")), cos_XpH,
                           sin_XpH)
    v_XpKH = norm(with_scale=False, name="v_norm")(heads_in("v", k, "vision_kv_heads"))
    xb, p = q_XpNH.shape[:2]
    q_XpKGH = q_XpNH.reshape(xb, p, k, n // k, h)
    s_XKGpq = jnp.einsum("xpkgh,xqkh->xkgpq", q_XpKGH, k_XpKH, preferred_element_type=jnp.float32)
    # A finite floor (as HF's additive mask): an empty image's rows stay finite, not NaN.
    s_XKGpq = jnp.where(valid_Xp[:, None, None, None, :], s_XKGpq, jnp.finfo(jnp.float32).min)
    w_XKGpq = jax.nn.softmax(s_XKGpq, axis=-1).astype(self.dtype)
    o_XpKGH = jnp.einsum("xkgpq,xqkh->xpkgh", w_XKGpq, v_XpKH.astype(self.dtype))
    o_XpNH = o_XpKGH.reshape(xb, p, n, h)
    return lin((n, h, d), ("vision_heads", "vision_head_dim", "vision_embed"), "xpnh,nhd->xpd",
               name="o")(o_XpNH)


class VisionMLP(nn.Module):
  """Gated MLP of clippable linears: down(act(gate(x)) * up(x))."""

  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_XpD: Array) -> Array:
    c = self.cfg
    lin = functools.partial(ClippableLinear, clipped=c.use_clipped_linears, dtype=self.dtype,
                            param_dtype=self.param_dtype)
    up = ("vision_embed", "vision_mlp")
    g_XpF = lin((c.hidden_size, c.intermediate_size), up, "xpd,df->xpf", name="gate")(x_XpD)
    u_XpF = lin((c.hidden_size, c.intermediate_size), up, "xpd,df->xpf", name="up")(x_XpD)
    h_XpF = layers.activation(c.hidden_activation)(g_XpF) * u_XpF
    return lin((c.intermediate_size, c.hidden_size), ("vision_mlp", "vision_embed"), "xpf,fd->xpd",
               name="down")(h_XpF)


class VisionLayer(nn.Module):
  """One encoder layer (HF `Gemma4VisionEncoderLayer`): sandwich norms around attention and MLP."""

  cfg: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_XpD: Array, cos_XpH, sin_XpH, valid_Xp) -> Array:
    c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(layers.RMSNorm, c.rms_norm_eps, param_dtype=self.param_dtype)
    h = VisionAttention(c, name="attn", **kw)(norm(name="pre_attention_norm")(x_XpD), cos_XpH,
                                              sin_XpH, valid_Xp)
    x_XpD = x_XpD + norm(name="post_attention_norm")(h)
    h = VisionMLP(c, name="mlp", **kw)(norm(name="pre_ffw_norm")(x_XpD))
    x_XpD = x_XpD + norm(name="post_ffw_norm")(h)
    return nn.with_logical_constraint(
        x_XpD, ("activation_batch", "activation_length", "activation_embed"))


def pool(x_XpD: Array, positions_Xp2: Array, valid_Xp: Array, k: int, dtype) -> tuple[Array, Array]:
  """HF `Gemma4VisionPooler`: (float32 [X, s, D] averages of each k x k block of patches, laid out
  row-major over the image's block grid, times sqrt(D); valid_Xs: slots holding a real patch).

  Differs from HF only where HF is degenerate: an all-padding image has no valid slot (HF's mask
  marks slot 0) and k == 1 marks the real patches valid (HF returns the padding mask there)."""
  x_XpD = jnp.where(valid_Xp[..., None], x_XpD, 0).astype(dtype)
  p, d = x_XpD.shape[1:]
  if k == 1:
    out_XsD, valid_Xs = x_XpD, valid_Xp
  else:
    s = p // (k * k)
    pos_Xp2 = jnp.maximum(positions_Xp2, 0)
    width_X1 = jnp.max(pos_Xp2[..., 0], axis=-1, keepdims=True) + 1
    block_Xp2 = pos_Xp2 // k
    slot_Xp = block_Xp2[..., 0] + (width_X1 // k) * block_Xp2[..., 1]
    onehot_Xps = jax.nn.one_hot(slot_Xp, s, dtype=jnp.float32)
    out_XsD = jnp.einsum("xps,xpd->xsd", onehot_Xps / (k * k), x_XpD.astype(jnp.float32))
    out_XsD = out_XsD.astype(dtype)
    valid_Xs = jnp.any((onehot_Xps > 0) & valid_Xp[..., None], axis=1)
  return out_XsD.astype(jnp.float32) * float(d) ** 0.5, valid_Xs


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
    layer = _remat(VisionLayer, self.remat_policy)
    self.layers = [layer(c, layers.as_dtype(self.dtype), pdt, name=f"layer_{j}")
                   for j in range(c.num_hidden_layers)]
    if c.standardize:
      self.std_bias = _const(self, "std_bias", nn.initializers.zeros, (c.hidden_size,), pdt,
                             ("vision_embed",))
      self.std_scale = _const(self, "std_scale", nn.initializers.ones, (c.hidden_size,), pdt,
                              ("vision_embed",))
    self.projection = p("projection", layers.default_kernel_init, (c.hidden_size, self.text_dim),
                        axes=("vision_embed", "embed"))

  def embed_patches(self, pixels_Xpc: Array, positions_Xp2: Array, valid_Xp: Array) -> Array:
    """HF `Gemma4VisionPatchEmbedder`: input_proj(2 (x - 0.5)) + x-row + y-row of the table."""
    dt = layers.as_dtype(self.dtype)
    x_Xpc = (2 * (pixels_Xpc - 0.5)).astype(dt)
    h_XpD = jnp.einsum("xpc,cd->xpd", x_Xpc, self.input_proj.astype(dt))
    pos_Xp2 = jnp.maximum(positions_Xp2, 0)
    table = self.position_table
    pe_XpD = jnp.take(table[0], pos_Xp2[..., 0], axis=0) + jnp.take(table[1], pos_Xp2[..., 1], axis=0)
    return h_XpD + jnp.where(valid_Xp[..., None], pe_XpD, 0).astype(dt)

  def features(self, pixel_values_Bipc: Array, pixel_positions_Bip2: Array) -> tuple[Array, Array]:
    """The tower's output before the embedder (HF `Gemma4VisionModel`'s last_hidden_state, here
    per slot): (features_Bisd in `dtype`, valid_Bis)."""
    c, dt = self.cfg, layers.as_dtype(self.dtype)
    b, i, p, ch = pixel_values_Bipc.shape
    if ch != c.channels:
      raise ValueError(f"pixel values have {ch} values per patch; the vision config's "
                       f"patch_size={c.patch_size} needs 3 * {c.patch_size}**2 = {c.channels}")
    s = c.soft_tokens(p)
    pixels_Xpc = pixel_values_Bipc.reshape(b * i, p, ch)
    positions_Xp2 = pixel_positions_Bip2.reshape(b * i, p, 2).astype(jnp.int32)
    valid_Xp = jnp.any(positions_Xp2 != -1, axis=-1)  # HF: padding iff both coordinates are -1
    x_XpD = self.embed_patches(pixels_Xpc, positions_Xp2, valid_Xp)
    cos_XpH, sin_XpH = rope_cos_sin(positions_Xp2, c, dt)
    for layer in self.layers:
      x_XpD = layer(x_XpD, cos_XpH, sin_XpH, valid_Xp)
    x_XsD, valid_Xs = pool(x_XpD, positions_Xp2, valid_Xp, c.pooling_kernel_size, dt)
    if c.standardize:  # in float32: the bias cancels the large pooled values
      x_XsD = (x_XsD - self.std_bias.astype(jnp.float32)) * self.std_scale.astype(jnp.float32)
    return x_XsD.astype(dt).reshape(b, i, s, -1), valid_Xs.reshape(b, i, s)

  def __call__(self, pixel_values_Bipc: Array, pixel_positions_Bip2: Array) -> tuple[Array, Array]:
    """(soft_BisD, valid_Bis): HF `Gemma4MultimodalEmbedder` (scale-free RMSNorm with the vision
    eps, projection to the text width) on `features`; invalid slots are zero."""
    dt = layers.as_dtype(self.dtype)
    feats_Bisd, valid_Bis = self.features(pixel_values_Bipc, pixel_positions_Bip2)
    normed = layers.rms_normalize(feats_Bisd, self.cfg.rms_norm_eps).astype(feats_Bisd.dtype)
    soft_BisD = jnp.einsum("bisd,dD->bisD", normed.astype(dt), self.projection.astype(dt))
    return jnp.where(valid_Bis[..., None], soft_BisD, 0).astype(dt), valid_Bis
