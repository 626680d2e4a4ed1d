"""The 12B's encoder-free image front end in Flax (HF `Gemma4UnifiedVisionEmbedder`): no tower, one
soft token per merged "model patch".

  pixels [B, i, p, c]   (c = 3 * (patch_size * pooling_kernel_size)**2: 6912 for 48 x 48 patches)
    --(LayerNorm, dense c -> d with bias, LayerNorm)-->
    --(+ x-row and y-row of the (mm_posemb_size, 2, d) position table, LayerNorm)--> [B, i, p, d]
    --(embedder: scale-free RMSNorm with the vision eps, projection d -> D)--> soft [B, i, s = p, D]

d is mm_embed_dim, D the text model's width. The image processor (transformers'
`Gemma4UnifiedImageProcessor`) merges k x k patches of patch_size pixels into one model patch,
pads every image to max_soft_tokens slots and gives each model patch its (x, y) position on the
merged grid, (-1, -1) on padding. Here every slot is embedded (static shapes) and `valid_Bis` marks
the real ones: HF's `get_image_features` drops a slot unless both coordinates are >= 0 (`!= -1`),
and a coordinate of -1 adds no position row (HF multiplies each axis's row by `pos != -1`).

The LayerNorms use torch's default eps (`UNIFIED_LAYER_NORM_EPS`, 1e-5) and, like every norm of
the package, compute in float32. The call contract is `model.vision.VisionEncoder`'s, so
`Transformer` takes either (`make_image_encoder`).

Logical axis names: vision_patch (c), vision_embed (d), vision_pos (table rows), norm; the
projection is (vision_embed, embed).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_mtp_jax.model import layers
from gemma_mtp_jax.model import vision as vision_lib
from gemma_mtp_jax.model.vision_config import UNIFIED_LAYER_NORM_EPS, UnifiedVisionConfig

Array = jax.Array


class LayerNorm(nn.Module):
  """torch nn.LayerNorm over the last axis (biased variance, weight "scale" and "bias"), in
  float32; the result in `dtype`."""

  eps: float = UNIFIED_LAYER_NORM_EPS
  axis_name: str = "norm"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n = x.shape[-1]
    scale = layers.param_with_axes(self, "scale", nn.initializers.ones, (n,), self.param_dtype,
                                   (self.axis_name,))
    bias = layers.param_with_axes(self, "bias", nn.initializers.zeros, (n,), self.param_dtype,
                                  (self.axis_name,))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def dummy_images(cfg: UnifiedVisionConfig, batch: int = 1) -> tuple[Array, Array]:
  """(pixel_values_Bipc, pixel_positions_Bip2) of one empty one-patch slot per row: what `init`
  needs to create the embedder's params."""
  return (jnp.zeros((batch, 1, 1, cfg.channels), jnp.float32),
          jnp.full((batch, 1, 1, 2), -1, jnp.int32))


class UnifiedVisionEmbedder(nn.Module):
  """HF `Gemma4UnifiedVisionEmbedder` (+ its `Gemma4UnifiedMultimodalEmbedder`):
  `__call__(pixel_values_Bipc, pixel_positions_Bip2) -> (soft_BisD, valid_Bis)` with s = p (soft
  tokens in the text width `text_dim`, zero at invalid slots)."""

  cfg: UnifiedVisionConfig
  text_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"  # nothing worth rematerialising: one dense layer; kept for the contract

  def setup(self):
    c, pdt, dt = self.cfg, layers.as_dtype(self.param_dtype), layers.as_dtype(self.dtype)
    ln = lambda axis: LayerNorm(axis_name=axis, dtype=dt, param_dtype=pdt)
    self.patch_ln1 = ln("vision_patch")
    self.patch_dense_kernel = layers.param_with_axes(
        self, "patch_dense", layers.default_kernel_init, (c.channels, c.mm_embed_dim), pdt,
        ("vision_patch", "vision_embed"))
    self.patch_dense_bias = layers.param_with_axes(
        self, "patch_dense_bias", nn.initializers.zeros, (c.mm_embed_dim,), pdt, ("vision_embed",))
    self.patch_ln2 = ln("vision_embed")
    # HF's layout (rows, axis, d) kept as is: the converter copies it bit for bit.
    self.pos_embedding = layers.param_with_axes(
        self, "pos_embedding", nn.initializers.normal(0.02), (c.mm_posemb_size, 2, c.mm_embed_dim),
        pdt, ("vision_pos", None, "vision_embed"))
    self.pos_norm = ln("vision_embed")
    self.projection = layers.param_with_axes(
        self, "projection", layers.default_kernel_init, (c.output_proj_dims, self.text_dim), pdt,
        ("vision_embed", "embed"))

  def features(self, pixel_values_Bipc: Array, pixel_positions_Bip2: Array) -> tuple[Array, Array]:
    """HF's `last_hidden_state` (pos_norm output) per slot: (features_Bisd in `dtype`, valid_Bis)."""
    c, dt = self.cfg, layers.as_dtype(self.dtype)
    ch = pixel_values_Bipc.shape[-1]
    if ch != c.channels:
      raise ValueError(f"pixel values have {ch} values per patch; the unified vision config's "
                       f"model patch of {c.patch_size} * {c.pooling_kernel_size} pixels needs "
                       f"3 * {c.model_patch_size}**2 = {c.channels}")
    positions_Bip2 = pixel_positions_Bip2.astype(jnp.int32)
    h = self.patch_ln1(pixel_values_Bipc.astype(dt))
    h = jnp.einsum("bipc,cd->bipd", h, self.patch_dense_kernel.astype(dt))
    h = self.patch_ln2(h + self.patch_dense_bias.astype(dt))
    # Positions past the table clip to its last row (torch would fail on them).
    pos_Bip2 = jnp.maximum(positions_Bip2, 0)
    table = self.pos_embedding
    pe_x = jnp.take(table[:, 0], pos_Bip2[..., 0], axis=0, mode="clip")
    pe_y = jnp.take(table[:, 1], pos_Bip2[..., 1], axis=0, mode="clip")
    on_Bip2 = positions_Bip2 != -1
    pe = (jnp.where(on_Bip2[..., :1], pe_x, 0) + jnp.where(on_Bip2[..., 1:], pe_y, 0)).astype(dt)
    return self.pos_norm(h + pe), jnp.all(on_Bip2, axis=-1)

  def __call__(self, pixel_values_Bipc: Array, pixel_positions_Bip2: Array) -> tuple[Array, Array]:
    """(soft_BisD, valid_Bis): scale-free RMSNorm (vision eps) and projection on `features`."""
    dt = layers.as_dtype(self.dtype)
    feats_Bisd, valid_Bis = self.features(pixel_values_Bipc, pixel_positions_Bip2)
    normed = layers.rms_normalize(feats_Bisd, self.cfg.rms_norm_eps).astype(dt)
    soft_BisD = jnp.einsum("bisd,dD->bisD", normed, self.projection.astype(dt))
    return jnp.where(valid_Bis[..., None], soft_BisD, 0).astype(dt), valid_Bis


def make_image_encoder(vision_cfg, text_dim: int, dtype, param_dtype, remat_policy: str,
                       name: str = "vision") -> nn.Module:
  """The image front end a vision config asks for: gemma4's tower (`VisionEncoder`) or the 12B's
  patch embedder (`UnifiedVisionEmbedder`); both map pixel slots to (soft_BisD, valid_Bis)."""
  cls = UnifiedVisionEmbedder if isinstance(vision_cfg, UnifiedVisionConfig) else (
      vision_lib.VisionEncoder)
  return cls(vision_cfg, text_dim, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
             name=name)


def dummy_inputs(vision_cfg, batch: int = 1) -> tuple[Array, Array]:
  """`init` inputs of either front end (`dummy_images` of its module)."""
  if isinstance(vision_cfg, UnifiedVisionConfig):
    return dummy_images(vision_cfg, batch)
  return vision_lib.dummy_images(vision_cfg, batch)
