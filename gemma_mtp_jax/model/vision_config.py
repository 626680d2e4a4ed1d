"""The vision tower's configuration (`VisionConfig`) and the vision fields of `ModelConfig` in and
out of HF configs. Free of JAX, so `config` (and the light `checkpoint.hf_names`) can import it; the
tower itself is `model.vision`, which re-exports these names.
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


# ------------------------------------------------------------------ ModelConfig's vision fields
MULTIMODAL_TOKEN_FIELDS = ("image_token_id", "boi_token_id", "eoi_token_id")


def as_vision_config(v) -> VisionConfig | None:
  """None, a VisionConfig, or a dict of its fields (a preset / dumped config) -> VisionConfig."""
  if v is None or isinstance(v, VisionConfig):
    return v
  if hasattr(v, "to_dict"):
    v = v.to_dict()
  if not isinstance(v, Mapping):
    raise _error(f"model config field 'vision': expected a dict of VisionConfig fields, got "
                 f"{type(v).__name__}")
  names = {f.name for f in dataclasses.fields(VisionConfig)}
  unknown = sorted(set(v) - names)
  if unknown:
    raise _error(f"unknown config key 'vision.{unknown[0]}' (VisionConfig fields: {sorted(names)})")
  return VisionConfig(**v)


def fields_from_hf(outer: Mapping[str, Any], family: str) -> dict[str, Any]:
  """ModelConfig's vision fields from a top-level HF config: {} unless it is a gemma4 (not the
  12B's unified) multimodal config with a `vision_config`; else the VisionConfig and token ids."""
  if family != "gemma4" or outer.get("model_type") != "gemma4" or not outer.get("vision_config"):
    return {}
  out = {"vision": VisionConfig.from_hf_config(outer["vision_config"])}
  for k in MULTIMODAL_TOKEN_FIELDS:
    out[k] = outer.get(k)
  if out["image_token_id"] is None:
    raise _error("config has a 'vision_config' but no 'image_token_id'")
  return out


def hf_config_out(cfg, text: dict[str, Any]) -> dict[str, Any]:
  """`ModelConfig.to_hf_config`: the text dict as is without a tower; with one, the keyword dict
  of HF `Gemma4Config` (text_config, vision_config, the image token ids; no audio tower)."""
  if cfg.vision is None:
    return text
  out = dict(model_type="gemma4", text_config=text, vision_config=cfg.vision.to_hf_config(),
             audio_config=None, tie_word_embeddings=cfg.tie_word_embeddings)
  out.update({k: getattr(cfg, k) for k in MULTIMODAL_TOKEN_FIELDS})
  return out


def is_buffer(path) -> bool:
  """Whether a params path (tuple of keys, or jax key entries) names a non-trainable constant."""
  last = path[-1]
  return str(getattr(last, "key", last)) in BUFFER_NAMES
