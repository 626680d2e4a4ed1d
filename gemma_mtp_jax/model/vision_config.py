"""The image front ends' configurations and the vision fields of `ModelConfig` in and out of HF
configs: `VisionConfig` (gemma4's tower, `model.vision`) and `UnifiedVisionConfig` (the 12B's
encoder-free patch embedder, `model.unified_vision`). Free of JAX, so `config` (and the light
`checkpoint.hf_names`) can import it; `model.vision` re-exports these names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# HF buffers kept as params (never trained; see `model.vision`): clip bounds, standardisation.
BUFFER_NAMES = ("input_min", "input_max", "output_min", "output_max", "std_bias", "std_scale")
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "silu")


def _error(msg: str) -> Exception:
  from gemma_mtp_jax.model.config import ConfigError  # config imports this module
  return ConfigError(msg)


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
        raise _error(f"vision config field '{field}': {msg}")

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
    need(self.hidden_activation in _ACTIVATIONS, "hidden_activation",
         f"unsupported activation {self.hidden_activation!r}; expected one of {_ACTIVATIONS}")

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
      raise _error(f"{num_patches} patches are not divisible by pooling_kernel_size**2={k2}")
    return num_patches // k2

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any]) -> "VisionConfig":
    """From an HF `vision_config` dict (model_type gemma4_vision); HF's defaults fill gaps."""
    hf = dict(hf)
    if hf.get("model_type") not in (None, "gemma4_vision"):
      raise _error(f"vision_config model_type is {hf.get('model_type')!r}; expected 'gemma4_vision'")
    rope = dict(hf.get("rope_parameters") or {})
    if rope.get("rope_type", "axial") != "axial":
      raise _error(f"vision_config 'rope_parameters.rope_type' is {rope['rope_type']!r}; the "
                   "Gemma 4 tower supports only 'axial'")
    if hf.get("attention_bias"):
      raise _error("vision_config 'attention_bias' = true is not supported (Gemma 4 has none)")
    kw = {f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf}
    kw.pop("rope_theta", None)
    if "rope_theta" in rope:
      kw["rope_theta"] = float(rope["rope_theta"])
    return cls(**kw)

  def to_hf_config(self) -> dict[str, Any]:
    """The keyword dict of HF `Gemma4VisionConfig`."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope_theta"}
    out.update(model_type="gemma4_vision", attention_bias=False,
               rope_parameters={"rope_type": "axial", "rope_theta": self.rope_theta})
    return out


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
        raise _error(f"vision config field '{f}': must be a positive integer, got {v!r}")
    # HF feeds the pos_norm output (mm_embed_dim wide) to a projection of output_proj_dims inputs.
    if self.output_proj_dims != self.mm_embed_dim:
      raise _error(f"vision config field 'output_proj_dims': {self.output_proj_dims} must equal "
                   f"mm_embed_dim={self.mm_embed_dim} (the embedder projects the patch embedding)")

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

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any]) -> "UnifiedVisionConfig":
    """From an HF `vision_config` dict (model_type gemma4_unified_vision); HF's defaults fill gaps.
    `model_patch_size` (written by some releases) must agree; `num_soft_tokens` and
    `initializer_range` do not shape the model and are ignored."""
    hf = dict(hf)
    if hf.get("model_type") not in (None, "gemma4_unified_vision"):
      raise _error(f"vision_config model_type is {hf.get('model_type')!r}; expected "
                   "'gemma4_unified_vision'")
    out = cls(**{f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf})
    if hf.get("model_patch_size", out.model_patch_size) != out.model_patch_size:
      raise _error(f"vision_config 'model_patch_size' is {hf['model_patch_size']}; patch_size * "
                   f"pooling_kernel_size = {out.model_patch_size}")
    return out

  def to_hf_config(self) -> dict[str, Any]:
    """The keyword dict of HF `Gemma4UnifiedVisionConfig`."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out["model_type"] = "gemma4_unified_vision"
    return out


UNIFIED_LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm's default, which HF's embedder keeps


# ------------------------------------------------------------------ ModelConfig's vision fields
MULTIMODAL_TOKEN_FIELDS = ("image_token_id", "boi_token_id", "eoi_token_id", "video_token_id",
                           "audio_token_id")
_UNIFIED = "gemma4_unified"  # families.UNIFIED (families imports config, which imports this)
# `Gemma4UnifiedConfig`'s class defaults (a config.json written by transformers omits them).
_UNIFIED_TOKEN_DEFAULTS = dict(image_token_id=258_880, boi_token_id=255_999,
                               eoi_token_id=258_882, video_token_id=258_884, audio_token_id=258_881)


def vision_class(family: str):
  """The image front end's config class of a family: the unified embedder for the 12B."""
  return UnifiedVisionConfig if family == _UNIFIED else VisionConfig


def as_vision_config(v, family: str = "gemma4"):
  """None, a config, or a dict of its fields (a preset / dumped config) -> the family's config
  class (`vision_class`); a config of the other family's class is refused."""
  cls = vision_class(family)
  if v is None or isinstance(v, cls):
    return v
  if isinstance(v, (VisionConfig, UnifiedVisionConfig)):
    raise _error(f"model config field 'vision': a {type(v).__name__} does not fit hf_family "
                 f"{family!r} (it takes a {cls.__name__})")
  if hasattr(v, "to_dict"):
    v = v.to_dict()
  if not isinstance(v, Mapping):
    raise _error(f"model config field 'vision': expected a dict of {cls.__name__} fields, got "
                 f"{type(v).__name__}")
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(v) - names)
  if unknown:
    raise _error(f"unknown config key 'vision.{unknown[0]}' ({cls.__name__} fields: "
                 f"{sorted(names)})")
  return cls(**v)


def fields_from_hf(outer: Mapping[str, Any], family: str) -> dict[str, Any]:
  """ModelConfig's vision fields from a top-level HF config: {} unless it is a multimodal config
  of its family (gemma4 / gemma4_unified) with a `vision_config`; else the family's vision config
  and the placeholder token ids (the unified config class's defaults fill gaps)."""
  if outer.get("model_type") != family or not outer.get("vision_config"):
    return {}
  out = {"vision": vision_class(family).from_hf_config(outer["vision_config"])}
  defaults = _UNIFIED_TOKEN_DEFAULTS if family == _UNIFIED else {}
  for k in MULTIMODAL_TOKEN_FIELDS:
    out[k] = outer.get(k, defaults.get(k))
  if out["image_token_id"] is None:
    raise _error("config has a 'vision_config' but no 'image_token_id'")
  return out


def hf_config_out(cfg, text: dict[str, Any]) -> dict[str, Any]:
  """`ModelConfig.to_hf_config`: the text dict as is without a tower; with one, the keyword dict
  of HF `Gemma4Config` / `Gemma4UnifiedConfig` (text_config, vision_config, the image token ids;
  no audio tower)."""
  if cfg.vision is None:
    return text
  out = dict(model_type=cfg.hf_family, text_config=text, vision_config=cfg.vision.to_hf_config(),
             audio_config=None, tie_word_embeddings=cfg.tie_word_embeddings)
  out.update({k: getattr(cfg, k) for k in MULTIMODAL_TOKEN_FIELDS})
  return out


def is_buffer(path) -> bool:
  """Whether a params path (tuple of keys, or jax key entries) names a non-trainable constant."""
  last = path[-1]
  return str(getattr(last, "key", last)) in BUFFER_NAMES
