"""Model configuration: one frozen dataclass for every Gemma 4 text variant and the assistant.

Built once at the boundary (from an ml_collections ConfigDict, a preset, or an HF `config.json`)
and passed around read-only. Derived per-layer structure (sliding layers, KV reuse, the "store"
layers the drafter reads) lives here as small pure helpers, so model code never recomputes it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Mapping, Sequence

from gemma_mtp_jax.model import families
from gemma_mtp_jax.model import vision_config as vision_lib
from gemma_mtp_jax.utils.errors import UserError

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

class ConfigError(UserError, ValueError):
  """A model configuration is invalid; the message names the field at fault."""


def _closest(key: str, valid: Sequence[str]) -> str:
  close = difflib.get_close_matches(key, list(valid), n=3)
  return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


# Fields that change how a model computes, not what it is (never part of an HF config).
NUMERICS_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_chunk_size", "moe_impl")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a Gemma 4 text decoder (base model or the assistant's inner decoder).

  Field names follow the short MaxText/gm style; `from_hf_config`/`to_hf_config` map them to the HF
  `Gemma4TextConfig` names.
  """

  vocab_size: int
  embed_dim: int  # hidden_size
  num_layers: int
  num_heads: int
  num_kv_heads: int  # sliding layers (and global layers unless overridden)
  head_dim: int  # sliding layers
  hidden_dim: int  # MLP intermediate size
  layer_types: tuple[str, ...]
  global_head_dim: int = 512
  num_global_kv_heads: int | None = None  # only honoured with attention_k_eq_v (as HF does)
  sliding_window: int = 512
  rope_local_theta: float = 10_000.0
  rope_global_theta: float = 1_000_000.0
  global_partial_rotary_factor: float = 0.25
  global_rope_type: str = "proportional"  # "proportional" or "default"
  local_partial_rotary_factor: float = 1.0
  local_rope_type: str = "default"
  final_logit_softcap: float | None = 30.0
  attn_logit_softcap: float | None = None
  rms_norm_eps: float = 1e-6
  # Per-layer embeddings (E2B/E4B); 0 disables.
  ple_dim: int = 0
  ple_vocab_size: int = 0
  num_kv_shared_layers: int = 0
  use_double_wide_mlp: bool = False
  attention_k_eq_v: bool = False
  # Mixture of experts (26B-A4B).
  enable_moe: bool = False
  num_experts: int = 0
  top_k_experts: int = 0
  moe_hidden_dim: int = 0
  moe_impl: str = "routed"  # numerics: "routed" (model/moe.py, top-k only) or "dense" (reference)
  hidden_activation: str = "gelu_pytorch_tanh"
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 131_072
  pad_token_id: int = 0
  bos_token_id: int = 2
  eos_token_id: int | tuple[int, ...] = 1
  # The transformers family (`families`): "gemma4" or "gemma4_unified" (12B). Same computation;
  # it decides the model_type / classes an export writes.
  hf_family: str = families.GEMMA4
  # Images (`model.vision`; the 12B: `model.unified_vision`): None is text only; the top-level HF
  # config's placeholder ids (video/audio embed as pad, as in HF); `use_bidirectional_attention`.
  vision: vision_lib.VisionConfig | vision_lib.UnifiedVisionConfig | None = None
  image_token_id: int | None = None
  boi_token_id: int | None = None
  eoi_token_id: int | None = None
  use_bidirectional_attention: str | None = None
  video_token_id: int | None = None
  audio_token_id: int | None = None
  # Numerics and compilation (not part of the HF config).
  dtype: str = "float32"  # activations / compute
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"  # none | full | dots | dots_with_no_batch_dims
  # > 0: queries attend in blocks of this many rows (`attention.chunked_attention`), so no [T, S]
  # score matrix is ever whole; sliding layers then also skip keys outside the window. 0: off.
  attention_chunk_size: int = 0

  def __post_init__(self):
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    object.__setattr__(self, "vision", vision_lib.as_vision_config(self.vision, self.hf_family))
    self.validate()

  # ------------------------------------------------------------------ validation
  def validate(self) -> None:
    def need(cond, field, msg):
      if not cond:
        raise ConfigError(f"model config field '{field}': {msg}")

    for f in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "hidden_dim", "global_head_dim", "sliding_window"):
      v = getattr(self, f)
      need(isinstance(v, int) and v > 0, f, f"must be a positive integer, got {v!r}")
    need(len(self.layer_types) == self.num_layers, "layer_types",
         f"has {len(self.layer_types)} entries but num_layers is {self.num_layers}")
    for i, t in enumerate(self.layer_types):
      need(t in LAYER_TYPES, "layer_types", f"entry {i} is {t!r}; expected one of {LAYER_TYPES}")
    need(self.num_heads % self.num_kv_heads == 0, "num_heads",
         f"{self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
    g = self.global_kv_heads
    need(self.num_heads % g == 0, "num_global_kv_heads",
         f"num_heads={self.num_heads} is not divisible by num_global_kv_heads={g}")
    need(0 <= self.num_kv_shared_layers <= self.num_layers, "num_kv_shared_layers",
         f"must be in [0, num_layers={self.num_layers}], got {self.num_kv_shared_layers}")
    if 0 < self.num_kv_shared_layers < self.num_layers:
      producers = set(self.layer_types[: self.first_kv_shared_layer])
      need(set(self.layer_types) <= producers, "num_kv_shared_layers",
           "the KV-shared layers need an earlier non-shared layer of every layer type they use")
    if self.ple_dim:
      need(self.ple_vocab_size > 0, "ple_vocab_size", "must be > 0 when ple_dim > 0")
    if self.enable_moe:
      for f in ("num_experts", "top_k_experts", "moe_hidden_dim"):
        need(getattr(self, f) > 0, f, "must be > 0 when enable_moe is set")
      need(self.top_k_experts <= self.num_experts, "top_k_experts",
           f"{self.top_k_experts} > num_experts={self.num_experts}")
    need(self.moe_impl in ("routed", "dense"), "moe_impl",
         f"model.moe_impl must be 'routed' or 'dense', got {self.moe_impl!r}")
    for key in ("global_rope_type", "local_rope_type"):
      need(getattr(self, key) in ("proportional", "default"), key,
           f"unknown rope type {getattr(self, key)!r}")
    need(self.remat_policy in ("none", "full", "dots", "dots_with_no_batch_dims"), "remat_policy",
         f"unknown remat policy {self.remat_policy!r}")
    need(isinstance(self.attention_chunk_size, int) and self.attention_chunk_size >= 0,
         "attention_chunk_size", f"must be an integer >= 0, got {self.attention_chunk_size!r}")
    need(self.hidden_activation in ("gelu_pytorch_tanh", "gelu", "silu"), "hidden_activation",
         f"unsupported activation {self.hidden_activation!r}")
    need(self.hf_family in families.FAMILIES, "hf_family",
         f"unknown family {self.hf_family!r}; expected one of {sorted(families.FAMILIES)}")
    need(self.hf_family != families.UNIFIED or not (self.ple_dim or self.enable_moe), "hf_family",
         "gemma4_unified models have no per-layer embeddings and no MoE block")
    need(self.use_bidirectional_attention in (None, "vision"), "use_bidirectional_attention",
         f"must be None or 'vision' (causal text decoders), got {self.use_bidirectional_attention!r}")
    need(self.vision is None or self.image_token_id is not None, "image_token_id",
         "a model with a vision tower (vision) needs the image placeholder's id")

  def architecture(self) -> "ModelConfig":
    """Numerics/compilation settings reset: equal iff two configs describe the same checkpoint."""
    return self.replace(**{f: getattr(ModelConfig, f) for f in NUMERICS_FIELDS})

  # ------------------------------------------------------------------ derived structure
  @property
  def global_kv_heads(self) -> int:
    if self.attention_k_eq_v and self.num_global_kv_heads:
      return self.num_global_kv_heads
    return self.num_kv_heads

  @property
  def first_kv_shared_layer(self) -> int:
    return self.num_layers - self.num_kv_shared_layers

  def is_sliding(self, i: int) -> bool:
    return self.layer_types[i] == SLIDING

  def layer_head_dim(self, i: int) -> int:
    return self.head_dim if self.is_sliding(i) else self.global_head_dim

  def layer_kv_heads(self, i: int) -> int:
    return self.num_kv_heads if self.is_sliding(i) else self.global_kv_heads

  def layer_k_eq_v(self, i: int) -> bool:
    return self.attention_k_eq_v and not self.is_sliding(i)

  def layer_hidden_dim(self, i: int) -> int:
    wide = self.use_double_wide_mlp and self.is_kv_shared(i)
    return self.hidden_dim * (2 if wide else 1)

  def is_kv_shared(self, i: int) -> bool:
    """Layer i owns no K/V projections and reads another layer's KV."""
    return i >= self.first_kv_shared_layer

  @functools.cached_property
  def store_layers(self) -> dict[str, int]:
    """Layer type -> the last non-shared layer of that type.

    Its KV is what later KV-shared layers reuse and what the assistant drafter reads. Unlike HF 5.23,
    which only returns these when num_kv_shared_layers > 0, they are defined for every model with
    at least one non-shared layer (26B-A4B and 31B drafters read them too).
    """
    out = {}
    for i in range(self.first_kv_shared_layer):
      out[self.layer_types[i]] = i
    return out

  @functools.cached_property
  def kv_source(self) -> tuple[int, ...]:
    """For each layer, the index of the layer whose KV it attends (itself unless KV-shared)."""
    store = self.store_layers
    return tuple(i if not self.is_kv_shared(i) else store[self.layer_types[i]]
                 for i in range(self.num_layers))

  def layer_signature(self, i: int) -> tuple:
    """Everything that makes layer i's parameter shapes and computation differ from another's."""
    return (self.layer_types[i], self.is_kv_shared(i), self.layer_hidden_dim(i))

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # ------------------------------------------------------------------ HF mapping
  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
    """Builds from an HF text config dict (gemma4_text, gemma4_unified_text) or a multimodal /
    assistant one holding it as `text_config` (gemma4, gemma4_unified, their assistants)."""
    outer = hf
    hf, family, model_type = families.split_text_config(hf)
    if family is None:
      raise ConfigError(f"config model_type is {model_type!r}; expected a Gemma 4 model "
                        f"({', '.join(families.TEXT_TYPES + families.MULTIMODAL_TYPES)})")
    n = hf.get("num_hidden_layers", 30)
    layer_types = hf.get("layer_types") or [
        SLIDING if (i + 1) % 6 else FULL for i in range(n)]
    layer_types = list(layer_types)
    if layer_types and layer_types[-1] != FULL:
      layer_types[-1] = FULL  # HF forces the last layer global
    rope = hf.get("rope_parameters") or {}
    rs, rf = rope.get(SLIDING, {}) or {}, rope.get(FULL, {}) or {}
    global_head_dim = hf.get("global_head_dim")
    num_global_kv = hf.get("num_global_key_value_heads")
    per_layer = hf.get("per_layer_config")
    if per_layer is not None:  # {} (global layers == sliding ones) too: global_head_dim = head_dim
      global_head_dim, num_global_kv = families.per_layer_geometry(hf, per_layer, layer_types)
    # "vision": image tokens attend each other both ways (text stays causal); "all": an encoder.
    if hf.get("use_bidirectional_attention") == "all":
      raise ConfigError("config 'use_bidirectional_attention' = 'all' is not supported "
                        "(causal text decoders only)")
    kw = dict(
        hf_family=family.name,
        vocab_size=hf.get("vocab_size", 262_144),
        embed_dim=hf.get("hidden_size", 2304),
        num_layers=n,
        num_heads=hf.get("num_attention_heads", 8),
        num_kv_heads=hf.get("num_key_value_heads", 4),
        head_dim=hf.get("head_dim", 256),
        hidden_dim=hf.get("intermediate_size", 9216),
        layer_types=tuple(layer_types),
        global_head_dim=global_head_dim or 512,
        num_global_kv_heads=num_global_kv,
        sliding_window=hf.get("sliding_window", 512),
        rope_local_theta=float(rs.get("rope_theta", 10_000.0)),
        local_rope_type=rs.get("rope_type", "default"),
        local_partial_rotary_factor=float(rs.get("partial_rotary_factor", 1.0)),
        rope_global_theta=float(rf.get("rope_theta", 1_000_000.0)),
        global_rope_type=rf.get("rope_type", "proportional"),
        global_partial_rotary_factor=float(rf.get("partial_rotary_factor", 0.25 if rf.get(
            "rope_type", "proportional") == "proportional" else 1.0)),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        ple_dim=hf.get("hidden_size_per_layer_input", 256) or 0,
        ple_vocab_size=hf.get("vocab_size_per_layer_input", 262_144) or 0,
        num_kv_shared_layers=hf.get("num_kv_shared_layers", 0) or 0,
        use_double_wide_mlp=bool(hf.get("use_double_wide_mlp", False)),
        attention_k_eq_v=bool(hf.get("attention_k_eq_v", False)),
        enable_moe=bool(hf.get("enable_moe_block", False)),
        num_experts=hf.get("num_experts") or 0,
        top_k_experts=hf.get("top_k_experts") or 0,
        moe_hidden_dim=hf.get("moe_intermediate_size") or 0,
        hidden_activation=hf.get("hidden_activation", "gelu_pytorch_tanh"),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        max_position_embeddings=hf.get("max_position_embeddings", 131_072),
        pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id", 0) is not None else 0,
        bos_token_id=hf.get("bos_token_id", 2) if hf.get("bos_token_id", 2) is not None else 2,
        eos_token_id=hf.get("eos_token_id", 1) if hf.get("eos_token_id", 1) is not None else 1,
        use_bidirectional_attention=hf.get("use_bidirectional_attention"),
        **vision_lib.fields_from_hf(outer, family.name),
    )
    if not kw["ple_dim"]:
      kw["ple_vocab_size"] = 0
    kw.update(overrides)
    return cls(**kw)

  def to_hf_config(self) -> dict[str, Any]:
    """The keyword dict of the family's HF text config class (`Gemma4TextConfig`, model_type
    gemma4_text; or `Gemma4UnifiedTextConfig`, gemma4_unified_text, without PLE/MoE keys); with a
    vision tower, that of `Gemma4Config` holding it as text_config (`vision.hf_config_out`)."""
    rope = {
        SLIDING: {"rope_type": self.local_rope_type, "rope_theta": self.rope_local_theta},
        FULL: {"rope_type": self.global_rope_type, "rope_theta": self.rope_global_theta},
    }
    if self.global_rope_type == "proportional" or self.global_partial_rotary_factor != 1.0:
      rope[FULL]["partial_rotary_factor"] = self.global_partial_rotary_factor
    if self.local_partial_rotary_factor != 1.0:
      rope[SLIDING]["partial_rotary_factor"] = self.local_partial_rotary_factor
    out = dict(
        model_type="gemma4_text",
        vocab_size=self.vocab_size,
        hidden_size=self.embed_dim,
        intermediate_size=self.hidden_dim,
        num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim,
        global_head_dim=self.global_head_dim,
        hidden_activation=self.hidden_activation,
        max_position_embeddings=self.max_position_embeddings,
        rms_norm_eps=self.rms_norm_eps,
        pad_token_id=self.pad_token_id,
        eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
        else self.eos_token_id,
        bos_token_id=self.bos_token_id,
        tie_word_embeddings=self.tie_word_embeddings,
        rope_parameters=rope,
        attention_bias=False,
        sliding_window=self.sliding_window,
        layer_types=list(self.layer_types),
        final_logit_softcapping=self.final_logit_softcap,
        vocab_size_per_layer_input=self.ple_vocab_size,
        hidden_size_per_layer_input=self.ple_dim,
        attention_k_eq_v=self.attention_k_eq_v,
        num_kv_shared_layers=self.num_kv_shared_layers,
        enable_moe_block=self.enable_moe,
        use_double_wide_mlp=self.use_double_wide_mlp,
        num_experts=self.num_experts or None,
        top_k_experts=self.top_k_experts or None,
        moe_intermediate_size=self.moe_hidden_dim or None,
    )
    if self.num_global_kv_heads is not None:
      out["num_global_key_value_heads"] = self.num_global_kv_heads
    if self.attn_logit_softcap is not None:
      out["attn_logit_softcapping"] = self.attn_logit_softcap
    out["use_bidirectional_attention"] = self.use_bidirectional_attention  # 12B default: "vision"
    return vision_lib.hf_config_out(self, families.text_config_out(self.hf_family, out))


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
  """The Gemma 4 assistant (HF `gemma4_assistant` / `gemma4_unified_assistant`, after
  `text.hf_family`): a small decoder whose layers own no K/V."""

  text: ModelConfig
  backbone_hidden_size: int
  use_ordered_embeddings: bool = False
  num_centroids: int = 2048
  centroid_intermediate_top_k: int = 32

  def __post_init__(self):
    t = self.text
    if t.num_kv_shared_layers != t.num_layers:
      object.__setattr__(self, "text", t.replace(num_kv_shared_layers=t.num_layers))
    t = self.text
    def need(cond, field, msg):
      if not cond:
        raise ConfigError(f"drafter config field '{field}': {msg}")
    need(t.ple_dim == 0, "text.ple_dim", "the assistant has no per-layer embeddings")
    need(not t.enable_moe, "text.enable_moe", "the assistant has no MoE block")
    need(not t.use_double_wide_mlp, "text.use_double_wide_mlp", "must be False for the assistant")
    need(self.backbone_hidden_size > 0, "backbone_hidden_size", "must be > 0")
    if self.use_ordered_embeddings:
      need(t.vocab_size % self.num_centroids == 0, "num_centroids",
           f"vocab_size={t.vocab_size} is not divisible by num_centroids={self.num_centroids}")
      need(0 < self.centroid_intermediate_top_k <= self.num_centroids,
           "centroid_intermediate_top_k", "must be in [1, num_centroids]")

  def replace(self, **kw) -> "DrafterConfig":
    return dataclasses.replace(self, **kw)

  def check_fits(self, base: ModelConfig) -> None:
    """Raises ConfigError unless this drafter can read `base`'s store-layer KV and embedding."""
    t = self.text
    if self.backbone_hidden_size != base.embed_dim:
      raise ConfigError(f"drafter backbone_hidden_size={self.backbone_hidden_size} != base hidden "
                        f"size {base.embed_dim}")
    if t.vocab_size != base.vocab_size:
      raise ConfigError(f"drafter vocab_size={t.vocab_size} != base vocab_size={base.vocab_size}")
    store = base.store_layers
    for lt in set(t.layer_types):
      if lt not in store:
        raise ConfigError(f"drafter layer type {lt!r} has no non-shared {lt!r} layer in the base")
    if t.head_dim != base.head_dim and SLIDING in t.layer_types:
      raise ConfigError(f"drafter head_dim={t.head_dim} != base sliding head_dim={base.head_dim}")
    if t.global_head_dim != base.global_head_dim and FULL in t.layer_types:
      raise ConfigError(f"drafter global_head_dim={t.global_head_dim} != base "
                        f"global_head_dim={base.global_head_dim}")
    if t.num_kv_heads != base.num_kv_heads and SLIDING in t.layer_types:
      raise ConfigError(f"drafter num_kv_heads={t.num_kv_heads} != base num_kv_heads="
                        f"{base.num_kv_heads}")
    if t.global_kv_heads != base.global_kv_heads and FULL in t.layer_types:
      raise ConfigError(f"drafter global kv heads={t.global_kv_heads} != base global kv heads="
                        f"{base.global_kv_heads}")

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **text_overrides) -> "DrafterConfig":
    hf = dict(hf)
    if hf.get("model_type") not in (None,) + families.ASSISTANT_TYPES:
      raise ConfigError(f"config model_type is {hf.get('model_type')!r}; expected one of "
                        f"{families.ASSISTANT_TYPES}")
    if "text_config" not in hf:
      raise ConfigError("assistant config has no 'text_config'")
    family = families.of_model_type(hf.get("model_type"))
    tc = dict(hf["text_config"])
    tc.setdefault("model_type", family.text_type)
    tc.setdefault("hidden_size_per_layer_input", 0)
    tc.setdefault("vocab_size_per_layer_input", 0)
    tc["use_bidirectional_attention"] = None  # the assistant's masks never read it
    if not tc.get("num_kv_shared_layers"):
      tc["num_kv_shared_layers"] = tc.get("num_hidden_layers", 4)
    text = ModelConfig.from_hf_config(tc, **text_overrides)
    return cls(
        text=text,
        backbone_hidden_size=hf.get("backbone_hidden_size", family.assistant_backbone),
        use_ordered_embeddings=bool(hf.get("use_ordered_embeddings", False)),
        num_centroids=hf.get("num_centroids", 2048),
        centroid_intermediate_top_k=hf.get("centroid_intermediate_top_k", 32),
    )

  def to_hf_config(self) -> dict[str, Any]:
    tc = self.text.to_hf_config()
    family = families.FAMILIES[self.text.hf_family]
    return dict(
        model_type=family.assistant_type,
        architectures=[family.assistant_lm],
        text_config=tc,
        backbone_hidden_size=self.backbone_hidden_size,
        use_ordered_embeddings=self.use_ordered_embeddings,
        num_centroids=self.num_centroids,
        centroid_intermediate_top_k=self.centroid_intermediate_top_k,
        tie_word_embeddings=True,
    )


# ---------------------------------------------------------------------- ml_collections boundary
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_DRAFTER_FIELDS = {f.name for f in dataclasses.fields(DrafterConfig)} - {"text"}


def _plain(d) -> dict:
  if hasattr(d, "to_dict"):
    d = d.to_dict()
  return dict(d)


def model_config_from_dict(d, where: str = "model") -> ModelConfig:
  """ModelConfig from a ConfigDict/dict whose keys are ModelConfig fields; errors name the key."""
  d = _plain(d)
  for k in d:
    if k not in _MODEL_FIELDS:
      raise ConfigError(f"unknown config key '{where}.{k}'{_closest(k, sorted(_MODEL_FIELDS))}")
  missing = [f.name for f in dataclasses.fields(ModelConfig)
             if f.default is dataclasses.MISSING and f.name not in d]
  if missing:
    raise ConfigError(f"config '{where}' is missing required keys {missing}")
  return ModelConfig(**d)


def drafter_config_from_dict(d, where: str = "drafter") -> DrafterConfig:
  d = _plain(d)
  if "text" not in d:
    raise ConfigError(f"config '{where}' is missing 'text'")
  for k in d:
    if k != "text" and k not in _DRAFTER_FIELDS:
      raise ConfigError(f"unknown config key '{where}.{k}'"
                        f"{_closest(k, sorted(_DRAFTER_FIELDS | {'text'}))}")
  text = model_config_from_dict(d.pop("text"), where=f"{where}.text")
  return DrafterConfig(text=text, **d)


def model_config_to_dict(cfg: ModelConfig) -> dict:
  out = dataclasses.asdict(cfg)
  out["layer_types"] = list(cfg.layer_types)
  if isinstance(cfg.eos_token_id, tuple):
    out["eos_token_id"] = list(cfg.eos_token_id)
  return out


def drafter_config_to_dict(cfg: DrafterConfig) -> dict:
  out = {k: getattr(cfg, k) for k in _DRAFTER_FIELDS}
  out["text"] = model_config_to_dict(cfg.text)
  return out


def layer_types_from_pattern(num_layers: int, period: int) -> tuple[str, ...]:
  """`period - 1` sliding layers then one global layer, repeated; the last layer is always global."""
  types = [SLIDING if (i + 1) % period else FULL for i in range(num_layers)]
  types[-1] = FULL
  return tuple(types)
