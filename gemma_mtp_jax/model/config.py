"""Model configuration: one frozen dataclass for every Gemma 4 text variant and the assistant.

Built once at the boundary (from an ml_collections ConfigDict, a preset, or an HF `config.json`:
`checkpoint.hf_config`) and passed around read-only. Derived per-layer structure (sliding layers,
KV reuse, the "store" layers the drafter reads) lives here as small pure helpers, so model code
never recomputes it. Nothing here knows Hugging Face: what differs between the transformers
families is a field (`FAMILY_FIELDS`) that `checkpoint.hf_config`'s family table sets.
"""

from __future__ import annotations

import dataclasses
import functools

from gemma_mtp_jax.model import vision_config as vision_lib
from gemma_mtp_jax.model.common import (  # re-exported: config_lib.ConfigError, .SLIDING, ...
    ACTIVATIONS, FULL, LAYER_TYPES, REMAT_POLICIES, SLIDING, ConfigError, closest)

__all__ = ["ACTIVATIONS", "FULL", "LAYER_TYPES", "REMAT_POLICIES", "SLIDING", "ConfigError", "closest",
           "NUMERICS_FIELDS", "FAMILY_FIELDS", "ModelConfig", "DrafterConfig",
           "model_config_from_dict", "drafter_config_from_dict", "model_config_to_dict",
           "drafter_config_to_dict", "layer_types_from_pattern"]


# Fields that change how a model computes, not what it is (never part of an HF config).
NUMERICS_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_chunk_size", "moe_impl")
# Fields whose values a transformers family fixes (`checkpoint.hf_config.FAMILIES`; the defaults
# are gemma4's): set when a config is built from an HF config or a preset, read by the model code.
FAMILY_FIELDS = ("image_block_layers", "image_block_in_window", "vision_front_end")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a Gemma 4 text decoder (base model or the assistant's inner decoder).

  Field names follow the short MaxText/gm style; `checkpoint.hf_config` maps them to the HF
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
  # The transformers family (`checkpoint.hf_config.FAMILIES`; the 12B's is "gemma4_unified"): the
  # model_type and classes an export writes. Model code never reads it; what the family changes in
  # the computation is in the FAMILY_FIELDS below, which the family table sets.
  hf_family: str = "gemma4"
  # Images (`model.vision`; the 12B: `model.unified_vision`): None is text only; the top-level HF
  # config's placeholder ids (video/audio embed as pad, as in HF); `use_bidirectional_attention`.
  vision: vision_lib.VisionConfig | vision_lib.UnifiedVisionConfig | None = None
  # The image front end `vision` configures (`vision_config.FRONT_ENDS`): "tower" (gemma4's
  # encoder, `VisionConfig`) or "patch_embedder" (the 12B's, `UnifiedVisionConfig`).
  vision_front_end: str = "tower"
  # How image tokens attend each other (`transformer.image_overlay`, with
  # use_bidirectional_attention "vision"): the layer types whose mask gets the bidirectional
  # image-block overlay, and whether the sliding window bounds it there (gemma4: sliding layers,
  # inside the window; the 12B: both types, the whole image even past the window).
  image_block_layers: tuple[str, ...] = (SLIDING,)
  image_block_in_window: bool = True
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
    if isinstance(self.image_block_layers, list):
      object.__setattr__(self, "image_block_layers", tuple(self.image_block_layers))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    object.__setattr__(self, "vision",
                       vision_lib.as_vision_config(self.vision, self.vision_front_end))
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
    need(self.remat_policy in REMAT_POLICIES, "remat_policy",
         f"unknown remat policy {self.remat_policy!r}; expected one of {REMAT_POLICIES}")
    need(isinstance(self.attention_chunk_size, int) and self.attention_chunk_size >= 0,
         "attention_chunk_size", f"must be an integer >= 0, got {self.attention_chunk_size!r}")
    need(self.hidden_activation in ACTIVATIONS, "hidden_activation",
         f"unsupported activation {self.hidden_activation!r}; expected one of {ACTIVATIONS}")
    need(isinstance(self.hf_family, str) and self.hf_family, "hf_family",
         f"must be a family name (a string), got {self.hf_family!r}")
    blocks = self.image_block_layers
    need(isinstance(blocks, tuple) and set(blocks) <= set(LAYER_TYPES), "image_block_layers",
         f"must be a tuple of layer types {LAYER_TYPES}, got {blocks!r}")
    need(isinstance(self.image_block_in_window, bool), "image_block_in_window",
         f"must be True or False, got {self.image_block_in_window!r}")
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


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
  """The Gemma 4 assistant (HF `Gemma4AssistantForCausalLM` and its family's counterparts, after
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
      raise ConfigError(f"unknown config key '{where}.{k}'{closest(k, sorted(_MODEL_FIELDS))}")
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
                        f"{closest(k, sorted(_DRAFTER_FIELDS | {'text'}))}")
  text = model_config_from_dict(d.pop("text"), where=f"{where}.text")
  return DrafterConfig(text=text, **d)


def model_config_to_dict(cfg: ModelConfig) -> dict:
  out = dataclasses.asdict(cfg)
  out["layer_types"] = list(cfg.layer_types)
  out["image_block_layers"] = list(cfg.image_block_layers)
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
