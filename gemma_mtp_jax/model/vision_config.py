"""The image front ends' configurations: `VisionConfig` (gemma4's tower, `model.vision`) and
`UnifiedVisionConfig` (the 12B's encoder-free patch embedder, `model.unified_vision`), and which
one a `ModelConfig.vision_front_end` names (`FRONT_ENDS`). Free of JAX, so `config` (and the light
`checkpoint.hf_names`) can import it; `model.vision` re-exports these names. Their HF config dicts
are `checkpoint.hf_config`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from gemma_mtp_jax.model.common import ACTIVATIONS, ConfigError

# HF buffers kept as params (never trained; see `model.vision`): clip bounds, standardisation.
BUFFER_NAMES = ("input_min", "input_max", "output_min", "output_max", "std_bias", "std_scale")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Hyper-parameters of the Gemma 4 vision tower; field names are HF `Gemma4VisionConfig`'s."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 16
  num_attention_heads: int = 12
  num_key_value_heads: int = 12
  head_dim: int = 64
  patch_size: int = 16
  pooling_kernel_size: int = 3
  position_embedding_size: int = 10 * 1024
  rope_theta: float = 100.0  # rope_parameters["rope_theta"] (rope_type "axial", the only one)
  rms_norm_eps: float = 1e-6
  hidden_activation: str = "gelu_pytorch_tanh"
  use_clipped_linears: bool = False
  standardize: bool = False

  def __post_init__(self):
    def need(cond, field, msg):
      if not cond:
        raise ConfigError(f"vision config field '{field}': {msg}")

    for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "patch_size", "pooling_kernel_size",
              "position_embedding_size"):
      v = getattr(self, f)
      need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f,
           f"must be a positive integer, got {v!r}")
    need(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
         f"{self.num_attention_heads} is not divisible by num_key_value_heads="
         f"{self.num_key_value_heads}")
    # The 2-D RoPE rotates two halves of each head (x, y), each with rotate_half inside.
    need(self.head_dim % 4 == 0, "head_dim", f"must be divisible by 4, got {self.head_dim}")
    need(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
    need(self.hidden_activation in ACTIVATIONS, "hidden_activation",
         f"unsupported activation {self.hidden_activation!r}; expected one of {ACTIVATIONS}")

  @property
  def channels(self) -> int:
    """Values of one patch (c): 3 * patch_size**2."""
    return 3 * self.patch_size ** 2

  @property
  def patches_per_soft_token(self) -> int:
    """Patch slots pooled into one soft token: pooling_kernel_size**2."""
    return self.pooling_kernel_size ** 2

  def soft_tokens(self, num_patches: int) -> int:
    """Soft-token slots (s) of an image of `num_patches` patch slots (p): p / k**2."""
    k2 = self.pooling_kernel_size ** 2
    if num_patches % k2:
      raise ConfigError(f"{num_patches} patches are not divisible by pooling_kernel_size**2={k2}")
    return num_patches // k2


@dataclasses.dataclass(frozen=True)
class UnifiedVisionConfig:
  """Hyper-parameters of the 12B's encoder-free patch embedder; field names are HF
  `Gemma4UnifiedVisionConfig`'s. One "model patch" of model_patch_size = patch_size *
  pooling_kernel_size pixels a side (the processor merges k x k patches) is one soft token, so an
  image's p patch slots are its s soft-token slots. The LayerNorms' eps is HF's nn.LayerNorm default
  (`UNIFIED_LAYER_NORM_EPS`), not a config field."""

  patch_size: int = 16
  pooling_kernel_size: int = 3
  mm_embed_dim: int = 3840
  mm_posemb_size: int = 1120
  output_proj_dims: int = 3840
  rms_norm_eps: float = 1e-6

  def __post_init__(self):
    for f in ("patch_size", "pooling_kernel_size", "mm_embed_dim", "mm_posemb_size",
              "output_proj_dims"):
      v = getattr(self, f)
      if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        raise ConfigError(f"vision config field '{f}': must be a positive integer, got {v!r}")
    # HF feeds the pos_norm output (mm_embed_dim wide) to a projection of output_proj_dims inputs.
    if self.output_proj_dims != self.mm_embed_dim:
      raise ConfigError(f"vision config field 'output_proj_dims': {self.output_proj_dims} must "
                        f"equal mm_embed_dim={self.mm_embed_dim} (the embedder projects the patch "
                        "embedding)")

  @property
  def model_patch_size(self) -> int:
    """Pixels a side of one merged "model patch" (48 in the 12B)."""
    return self.patch_size * self.pooling_kernel_size

  @property
  def channels(self) -> int:
    """Values of one model patch (c): 3 * model_patch_size**2 (6912 in the 12B)."""
    return 3 * self.model_patch_size ** 2

  @property
  def patches_per_soft_token(self) -> int:
    """Patch slots per soft token: 1 (the processor already merged k x k patches)."""
    return 1

  def soft_tokens(self, num_patches: int) -> int:
    """Soft-token slots (s) of an image of `num_patches` model-patch slots: one each."""
    return num_patches


UNIFIED_LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm's default, which HF's embedder keeps


# ------------------------------------------------------------------ ModelConfig's vision fields
# ModelConfig's placeholder token ids (named as the HF multimodal configs name them).
MULTIMODAL_TOKEN_FIELDS = ("image_token_id", "boi_token_id", "eoi_token_id", "video_token_id",
                           "audio_token_id")
# `ModelConfig.vision_front_end` -> the config class of that front end: gemma4's tower
# (`model.vision.VisionEncoder`) or the 12B's patch embedder (`model.unified_vision`).
FRONT_ENDS = {"tower": VisionConfig, "patch_embedder": UnifiedVisionConfig}


def as_vision_config(v, front_end: str = "tower"):
  """None, a config, or a dict of its fields (a preset / dumped config) -> the config class of
  `front_end` (`FRONT_ENDS`); a config of another front end's class is refused."""
  if front_end not in FRONT_ENDS:
    raise ConfigError(f"model config field 'vision_front_end': unknown front end {front_end!r}; "
                      f"expected one of {sorted(FRONT_ENDS)}")
  cls = FRONT_ENDS[front_end]
  if v is None or isinstance(v, cls):
    return v
  if isinstance(v, tuple(FRONT_ENDS.values())):
    raise ConfigError(f"model config field 'vision': a {type(v).__name__} does not fit "
                      f"vision_front_end {front_end!r} (it takes a {cls.__name__})")
  if hasattr(v, "to_dict"):
    v = v.to_dict()
  if not isinstance(v, Mapping):
    raise ConfigError(f"model config field 'vision': expected a dict of {cls.__name__} fields, "
                      f"got {type(v).__name__}")
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(v) - names)
  if unknown:
    raise ConfigError(f"unknown config key 'vision.{unknown[0]}' ({cls.__name__} fields: "
                      f"{sorted(names)})")
  return cls(**v)


def is_buffer(path) -> bool:
  """Whether a params path (tuple of keys, or jax key entries) names a non-trainable constant."""
  last = path[-1]
  return str(getattr(last, "key", last)) in BUFFER_NAMES
