"""HF config dicts <-> the model's configs, and the Gemma 4 families as transformers names them.

transformers has two families of Gemma 4 models: `gemma4` (E2B, E4B, 26B-A4B, 31B:
`Gemma4ForCausalLM`, `Gemma4ForConditionalGeneration`, `Gemma4AssistantForCausalLM`) and
`gemma4_unified` (12B, transformers >= 5.10: the `Gemma4Unified*` classes). The unified text
decoder is the gemma4 one without per-layer embeddings and MoE (its config class removes those
fields), with its own class defaults, image masks and image front end. One `ModelConfig` and one
model serve both: `FAMILIES` holds each family's HF names and defaults, and the values of the
`ModelConfig.FAMILY_FIELDS` that make its computation differ (`Family.image_block_layers`, ...),
which every config built here or by a preset gets. Model code reads those fields, never a name.

Adding a family is one `Family` entry (or `register_family`) plus a preset. The family checks live
here too (`check_family`): a known `hf_family`, the values the family fixes (the 12B's: no PLE, no
MoE) and its computation fields; an export and `presets.model_configs` apply them.

  model_config_from_hf / _to_hf      HF text, multimodal (text_config + vision_config) configs
  drafter_config_from_hf / _to_hf    HF assistant configs (text_config inside)
  vision_config_from_hf / _to_hf     HF vision_config dicts of either image front end
  with_family_fields                 a stored config dict (pair.json, a fingerprint) written
                                     before a family field existed: its family's value
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import vision_config as vision_lib
from gemma_mtp_jax.model.common import FULL, SLIDING, ConfigError

ModelConfig, DrafterConfig = config_lib.ModelConfig, config_lib.DrafterConfig
_MODEL_DEFAULT = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


@dataclasses.dataclass(frozen=True)
class Family:
  """One transformers family: its HF names, its config classes' defaults, and the values of the
  ModelConfig fields its models compute with (`config_lib.FAMILY_FIELDS`)."""

  name: str  # ModelConfig.hf_family, and the model_type of its multimodal config
  text_type: str  # model_type of the text decoder's config
  assistant_type: str
  vision_type: str  # model_type of its `vision_config`
  causal_lm: str  # transformers class names
  conditional_generation: str
  assistant_lm: str
  text_config_class: str
  multimodal_config_class: str
  assistant_config_class: str
  vision_config_class: str
  assistant_backbone: int  # the assistant config class's default backbone_hidden_size
  # Text-config defaults that differ from gemma4's (the config class's own defaults).
  text_defaults: tuple[tuple[str, Any], ...] = ()
  # Text-config keys the family's config class does not have, with the value a reader assumes
  # (its model never reads them); an export leaves them out.
  removed: tuple[tuple[str, Any], ...] = ()
  # ModelConfig values every model of the family has (a config with others is refused), and why.
  fixed: tuple[tuple[str, Any], ...] = ()
  fixed_reason: str = ""
  # The multimodal config class's placeholder ids (a config.json written by transformers omits them).
  token_defaults: tuple[tuple[str, int], ...] = ()
  # The family fields of ModelConfig (defaults: gemma4's, the ModelConfig defaults).
  image_block_layers: tuple[str, ...] = _MODEL_DEFAULT["image_block_layers"]
  image_block_in_window: bool = _MODEL_DEFAULT["image_block_in_window"]
  vision_front_end: str = _MODEL_DEFAULT["vision_front_end"]

  @property
  def multimodal_type(self) -> str:
    return self.name

  def fields(self) -> dict[str, Any]:
    """The ModelConfig fields this family sets: `config_lib.FAMILY_FIELDS` -> value."""
    return {f: getattr(self, f) for f in config_lib.FAMILY_FIELDS}


GEMMA4 = "gemma4"
UNIFIED = "gemma4_unified"

_PLE_MOE = (("hidden_size_per_layer_input", 0), ("vocab_size_per_layer_input", 0),
            ("enable_moe_block", False), ("num_experts", None), ("top_k_experts", None),
            ("moe_intermediate_size", None))

FAMILIES: dict[str, Family] = {
    GEMMA4: Family(
        name=GEMMA4, text_type="gemma4_text", assistant_type="gemma4_assistant",
        vision_type="gemma4_vision", causal_lm="Gemma4ForCausalLM",
        conditional_generation="Gemma4ForConditionalGeneration",
        assistant_lm="Gemma4AssistantForCausalLM", text_config_class="Gemma4TextConfig",
        multimodal_config_class="Gemma4Config", assistant_config_class="Gemma4AssistantConfig",
        vision_config_class="Gemma4VisionConfig", assistant_backbone=1536),
    # transformers 5.23 configuration_gemma4_unified.py: window 1024, 262144 positions, image
    # tokens bidirectional ("vision"), no PLE or MoE fields (the released 12B config.json still
    # carries them, zeroed; they are ignored). `Gemma4UnifiedModel.forward` overlays each image's
    # block on full and sliding layers, past the window (`transformer.image_overlay`); its image
    # front end is an encoder-free patch embedder (`model.unified_vision`).
    UNIFIED: Family(
        name=UNIFIED, text_type="gemma4_unified_text", assistant_type="gemma4_unified_assistant",
        vision_type="gemma4_unified_vision", causal_lm="Gemma4UnifiedForCausalLM",
        conditional_generation="Gemma4UnifiedForConditionalGeneration",
        assistant_lm="Gemma4UnifiedAssistantForCausalLM",
        text_config_class="Gemma4UnifiedTextConfig",
        multimodal_config_class="Gemma4UnifiedConfig",
        assistant_config_class="Gemma4UnifiedAssistantConfig",
        vision_config_class="Gemma4UnifiedVisionConfig", assistant_backbone=3840,
        text_defaults=(("sliding_window", 1024), ("max_position_embeddings", 262_144),
                       ("use_bidirectional_attention", "vision")),
        removed=_PLE_MOE, fixed=(("ple_dim", 0), ("enable_moe", False)),
        fixed_reason="gemma4_unified models have no per-layer embeddings and no MoE block",
        token_defaults=(("image_token_id", 258_880), ("boi_token_id", 255_999),
                        ("eoi_token_id", 258_882), ("video_token_id", 258_884),
                        ("audio_token_id", 258_881)),
        image_block_layers=(SLIDING, FULL), image_block_in_window=False,
        vision_front_end="patch_embedder"),
}


def register_family(family: Family) -> Family:
  """Adds `family` to `FAMILIES` (what a new table entry does); its model types must be new and
  its field values valid."""
  taken = {t: f.name for f in FAMILIES.values() if f.name != family.name for t in _types(f)}
  clash = [t for t in _types(family) if t in taken]
  if clash:
    raise ConfigError(f"family {family.name!r}: model_type {clash[0]!r} is {taken[clash[0]]!r}'s")
  # The family fields on a throwaway config: the ModelConfig checks name a bad value.
  ModelConfig(vocab_size=1, embed_dim=1, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=4,
              hidden_dim=1, layer_types=(FULL,), **family.fields())
  FAMILIES[family.name] = family
  return family


def _types(f: Family) -> tuple[str, ...]:
  return (f.multimodal_type, f.text_type, f.assistant_type, f.vision_type)


def text_types() -> tuple[str, ...]:
  return tuple(f.text_type for f in FAMILIES.values())


def multimodal_types() -> tuple[str, ...]:
  return tuple(f.multimodal_type for f in FAMILIES.values())


def assistant_types() -> tuple[str, ...]:
  return tuple(f.assistant_type for f in FAMILIES.values())


def model_types() -> tuple[str, ...]:
  """Every model_type of a Gemma 4 model dir: multimodal, text and assistant configs."""
  return multimodal_types() + text_types() + assistant_types()


def of_model_type(model_type: str | None) -> Family | None:
  """The family a model_type (text, multimodal or assistant) belongs to; None: not Gemma 4.
  A config without a model_type is read as gemma4 (the project's own dicts)."""
  if model_type is None:
    return FAMILIES[GEMMA4]
  for f in FAMILIES.values():
    if model_type in (f.text_type, f.multimodal_type, f.assistant_type):
      return f
  return None


def family(name: str, where: str = "hf_family") -> Family:
  """The family named `name` (a ModelConfig.hf_family); ConfigError naming `where` otherwise."""
  if name not in FAMILIES:
    raise ConfigError(f"model config field '{where}': unknown family {name!r}; expected one of "
                      f"{sorted(FAMILIES)}")
  return FAMILIES[name]


def family_fields(name: str) -> dict[str, Any]:
  """The ModelConfig fields the family `name` sets (`config_lib.FAMILY_FIELDS` -> value)."""
  return family(name).fields()


def check_family(cfg: ModelConfig, where: str = "model") -> None:
  """Refuses a config its `hf_family` cannot describe: an unknown family, other values than the
  ones it fixes (the 12B's: no PLE, no MoE), or other family fields than its own (transformers'
  classes of that family would compute another model)."""
  fam = family(cfg.hf_family, f"{where}.hf_family")
  for k, v in fam.fixed:
    if getattr(cfg, k) != v:
      raise ConfigError(f"model config field '{where}.hf_family': {fam.fixed_reason} "
                        f"({k}={getattr(cfg, k)!r})")
  for k, v in fam.fields().items():
    if getattr(cfg, k) != v:
      raise ConfigError(f"model config field '{where}.{k}' is {getattr(cfg, k)!r}, but hf_family "
                        f"{fam.name!r} computes {v!r}: leave it to the family "
                        "(presets.text_fields(hf_family=...), hf_config.family_fields)")


def with_family_fields(d: Mapping[str, Any]) -> dict[str, Any]:
  """A ModelConfig dict with every family field it lacks set from its `hf_family` (gemma4 when
  absent): configs stored before a family field existed (pair.json, a run's fingerprint, a hand
  written dict) then compute what their family computes."""
  d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
  missing = [k for k in config_lib.FAMILY_FIELDS if k not in d]
  if missing:
    fields = family_fields(d.get("hf_family", GEMMA4))
    d.update({k: fields[k] for k in missing})
  return d


def drafter_with_family_fields(d: Mapping[str, Any]) -> dict[str, Any]:
  """`with_family_fields` for a DrafterConfig dict (its `text`)."""
  d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
  if isinstance(d.get("text"), Mapping) or hasattr(d.get("text"), "to_dict"):
    d["text"] = with_family_fields(d["text"])
  return d


# ---------------------------------------------------------------------- text configs
def split_text_config(hf: Mapping[str, Any]) -> tuple[dict[str, Any], Family | None, str | None]:
  """(text config dict, its family, its model_type) of an HF config dict.

  `hf` is a text config, or a multimodal / assistant config holding one as `text_config` (whose
  model_type defaults to the outer family's text type). The text dict comes back with the
  family's class defaults filled in and its removed keys set to what they stand for, so a reader
  can apply the gemma4 defaults to whatever is left. Family None: not a Gemma 4 model_type.
  """
  hf = dict(hf)
  model_type = hf.get("model_type")
  outer = of_model_type(model_type)
  if "text_config" in hf and outer is not None and model_type not in text_types():
    hf = dict(hf["text_config"] or {})
    model_type = hf.get("model_type", outer.text_type)
  fam = of_model_type(model_type)
  if fam is None or (model_type is not None and model_type != fam.text_type):
    return hf, None, model_type
  hf.update(dict(fam.removed))
  for k, v in fam.text_defaults:
    hf.setdefault(k, v)
  return hf, fam, model_type


def per_layer_geometry(hf: Mapping[str, Any], per_layer: Mapping[Any, Mapping[str, Any]],
                       layer_types: Sequence[str]) -> tuple[int, int | None]:
  """(global_head_dim, num_global_kv_heads) from transformers >= 5.23's `per_layer_config`.

  (The released configs, written by older versions, have `global_head_dim` and
  `num_global_key_value_heads` instead; 5.23 reads those into `per_layer_config` and saves that.)

  HF builds layer i from the top-level attributes updated by `per_layer_config[i]` (keys are layer
  indices, serialised as strings such as "05") and ignores the top-level `global_head_dim` and
  `num_global_key_value_heads` once it is present. ModelConfig holds one sliding and one global
  geometry, so a config that needs more is refused rather than misread.
  """
  head_dim, kv = hf.get("head_dim", 256), hf.get("num_key_value_heads", 4)
  full, explicit_kv = set(), False
  for key, over in per_layer.items():
    i = int(key)
    if not 0 <= i < len(layer_types):
      raise ConfigError(f"config 'per_layer_config' names layer {key!r} of {len(layer_types)}")
    geometry = (over.get("head_dim", head_dim), over.get("num_key_value_heads", kv))
    if layer_types[i] == FULL:
      full.add(geometry)
      explicit_kv |= "num_key_value_heads" in over
    elif geometry != (head_dim, kv):
      raise ConfigError(f"config 'per_layer_config' gives sliding layer {i} (head_dim, kv heads) = "
                        f"{geometry}; only global layers may differ from the top level")
  if len(full) > 1:
    raise ConfigError(f"config 'per_layer_config' gives global layers different geometries {full}")
  global_head_dim, global_kv = full.pop() if full else (head_dim, kv)
  if explicit_kv and global_kv != kv and not hf.get("attention_k_eq_v", False):
    raise ConfigError("config 'per_layer_config' gives global layers their own KV head count; "
                      "ModelConfig supports that only with attention_k_eq_v")
  return global_head_dim, global_kv if explicit_kv else None


def _or(hf: Mapping[str, Any], key: str, default):
  """hf[key], or `default` when it is absent or null."""
  v = hf.get(key, default)
  return default if v is None else v


def _text_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
  """ModelConfig's text fields from a (split) HF text config; HF's gemma4 defaults fill gaps."""
  n = hf.get("num_hidden_layers", 30)
  layer_types = list(hf.get("layer_types") or config_lib.layer_types_from_pattern(n, 6))
  if layer_types and layer_types[-1] != FULL:
    layer_types[-1] = FULL  # HF forces the last layer global
  rope = hf.get("rope_parameters") or {}
  rs, rf = rope.get(SLIDING, {}) or {}, rope.get(FULL, {}) or {}
  global_head_dim = hf.get("global_head_dim")
  num_global_kv = hf.get("num_global_key_value_heads")
  per_layer = hf.get("per_layer_config")
  if per_layer is not None:  # {} (global layers == sliding ones) too: global_head_dim = head_dim
    global_head_dim, num_global_kv = per_layer_geometry(hf, per_layer, layer_types)
  global_rope = rf.get("rope_type", "proportional")
  ple_dim = hf.get("hidden_size_per_layer_input", 256) or 0
  return dict(
      vocab_size=hf.get("vocab_size", 262_144), embed_dim=hf.get("hidden_size", 2304),
      num_layers=n, num_heads=hf.get("num_attention_heads", 8),
      num_kv_heads=hf.get("num_key_value_heads", 4), head_dim=hf.get("head_dim", 256),
      hidden_dim=hf.get("intermediate_size", 9216), layer_types=tuple(layer_types),
      global_head_dim=global_head_dim or 512, num_global_kv_heads=num_global_kv,
      sliding_window=hf.get("sliding_window", 512),
      rope_local_theta=float(rs.get("rope_theta", 10_000.0)),
      local_rope_type=rs.get("rope_type", "default"),
      local_partial_rotary_factor=float(rs.get("partial_rotary_factor", 1.0)),
      rope_global_theta=float(rf.get("rope_theta", 1_000_000.0)), global_rope_type=global_rope,
      global_partial_rotary_factor=float(rf.get(
          "partial_rotary_factor", 0.25 if global_rope == "proportional" else 1.0)),
      final_logit_softcap=hf.get("final_logit_softcapping"),
      attn_logit_softcap=hf.get("attn_logit_softcapping"),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6), ple_dim=ple_dim,
      ple_vocab_size=(hf.get("vocab_size_per_layer_input", 262_144) or 0) if ple_dim else 0,
      num_kv_shared_layers=hf.get("num_kv_shared_layers", 0) or 0,
      use_double_wide_mlp=bool(hf.get("use_double_wide_mlp", False)),
      attention_k_eq_v=bool(hf.get("attention_k_eq_v", False)),
      enable_moe=bool(hf.get("enable_moe_block", False)), num_experts=hf.get("num_experts") or 0,
      top_k_experts=hf.get("top_k_experts") or 0,
      moe_hidden_dim=hf.get("moe_intermediate_size") or 0,
      hidden_activation=hf.get("hidden_activation", "gelu_pytorch_tanh"),
      tie_word_embeddings=hf.get("tie_word_embeddings", True),
      max_position_embeddings=hf.get("max_position_embeddings", 131_072),
      pad_token_id=_or(hf, "pad_token_id", 0), bos_token_id=_or(hf, "bos_token_id", 2),
      eos_token_id=_or(hf, "eos_token_id", 1),
      use_bidirectional_attention=hf.get("use_bidirectional_attention"))


def model_config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """A ModelConfig from an HF text config dict (gemma4_text, gemma4_unified_text) or a multimodal
  / assistant one holding it as `text_config` (gemma4, gemma4_unified, their assistants); the
  family fields are its family's. `overrides`: ModelConfig fields to set (numerics, ...)."""
  text, fam, model_type = split_text_config(hf)
  if fam is None:
    raise ConfigError(f"config model_type is {model_type!r}; expected a Gemma 4 model "
                      f"({', '.join(text_types() + multimodal_types())})")
  # "vision": image tokens attend each other both ways (text stays causal); "all": an encoder.
  if text.get("use_bidirectional_attention") == "all":
    raise ConfigError("config 'use_bidirectional_attention' = 'all' is not supported "
                      "(causal text decoders only)")
  kw = dict(_text_fields(text), hf_family=fam.name, **fam.fields(), **_vision_fields(hf, fam))
  kw.update(overrides)
  return ModelConfig(**kw)


def _text_config_out(cfg: ModelConfig, fam: Family) -> dict[str, Any]:
  """The keyword dict of the family's text config class (`Gemma4TextConfig`, ...)."""
  rope = {
      SLIDING: {"rope_type": cfg.local_rope_type, "rope_theta": cfg.rope_local_theta},
      FULL: {"rope_type": cfg.global_rope_type, "rope_theta": cfg.rope_global_theta},
  }
  if cfg.global_rope_type == "proportional" or cfg.global_partial_rotary_factor != 1.0:
    rope[FULL]["partial_rotary_factor"] = cfg.global_partial_rotary_factor
  if cfg.local_partial_rotary_factor != 1.0:
    rope[SLIDING]["partial_rotary_factor"] = cfg.local_partial_rotary_factor
  eos = cfg.eos_token_id
  out = dict(
      model_type=fam.text_type, vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
      intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, global_head_dim=cfg.global_head_dim,
      hidden_activation=cfg.hidden_activation, max_position_embeddings=cfg.max_position_embeddings,
      rms_norm_eps=cfg.rms_norm_eps, pad_token_id=cfg.pad_token_id,
      eos_token_id=list(eos) if isinstance(eos, tuple) else eos, bos_token_id=cfg.bos_token_id,
      tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=rope, attention_bias=False,
      sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types),
      final_logit_softcapping=cfg.final_logit_softcap,
      vocab_size_per_layer_input=cfg.ple_vocab_size, hidden_size_per_layer_input=cfg.ple_dim,
      attention_k_eq_v=cfg.attention_k_eq_v, num_kv_shared_layers=cfg.num_kv_shared_layers,
      enable_moe_block=cfg.enable_moe, use_double_wide_mlp=cfg.use_double_wide_mlp,
      num_experts=cfg.num_experts or None, top_k_experts=cfg.top_k_experts or None,
      moe_intermediate_size=cfg.moe_hidden_dim or None,
  )
  if cfg.num_global_kv_heads is not None:
    out["num_global_key_value_heads"] = cfg.num_global_kv_heads
  if cfg.attn_logit_softcap is not None:
    out["attn_logit_softcapping"] = cfg.attn_logit_softcap
  out["use_bidirectional_attention"] = cfg.use_bidirectional_attention  # 12B default: "vision"
  removed = dict(fam.removed)
  return {k: v for k, v in out.items() if k not in removed}


def model_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The keyword dict of the family's HF text config class (`Gemma4TextConfig`, model_type
  gemma4_text; `Gemma4UnifiedTextConfig` without the PLE/MoE keys); with an image front end, that
  of its multimodal config class (`Gemma4Config`, ...: text_config, vision_config, the image
  token ids; no audio tower). Refuses a config its family cannot describe (`check_family`)."""
  check_family(cfg)
  fam = FAMILIES[cfg.hf_family]
  text = _text_config_out(cfg, fam)
  if cfg.vision is None:
    return text
  out = dict(model_type=fam.multimodal_type, text_config=text,
             vision_config=vision_config_to_hf(cfg.vision, fam.name), audio_config=None,
             tie_word_embeddings=cfg.tie_word_embeddings)
  out.update({k: getattr(cfg, k) for k in vision_lib.MULTIMODAL_TOKEN_FIELDS})
  return out


# ---------------------------------------------------------------------- assistants
def drafter_config_from_hf(hf: Mapping[str, Any], **text_overrides) -> DrafterConfig:
  """A DrafterConfig from an HF assistant config dict (gemma4_assistant, ...); `text_overrides`:
  ModelConfig fields of its text decoder to set."""
  hf = dict(hf)
  if hf.get("model_type") not in (None,) + assistant_types():
    raise ConfigError(f"config model_type is {hf.get('model_type')!r}; expected one of "
                      f"{assistant_types()}")
  if "text_config" not in hf:
    raise ConfigError("assistant config has no 'text_config'")
  fam = of_model_type(hf.get("model_type"))
  tc = dict(hf["text_config"])
  tc.setdefault("model_type", fam.text_type)
  tc.setdefault("hidden_size_per_layer_input", 0)
  tc.setdefault("vocab_size_per_layer_input", 0)
  tc["use_bidirectional_attention"] = None  # the assistant's masks never read it
  if not tc.get("num_kv_shared_layers"):
    tc["num_kv_shared_layers"] = tc.get("num_hidden_layers", 4)
  return DrafterConfig(
      text=model_config_from_hf(tc, **text_overrides),
      backbone_hidden_size=hf.get("backbone_hidden_size", fam.assistant_backbone),
      use_ordered_embeddings=bool(hf.get("use_ordered_embeddings", False)),
      num_centroids=hf.get("num_centroids", 2048),
      centroid_intermediate_top_k=hf.get("centroid_intermediate_top_k", 32),
  )


def drafter_config_to_hf(dcfg: DrafterConfig) -> dict[str, Any]:
  """The keyword dict of the family's assistant config class (`Gemma4AssistantConfig`, ...)."""
  fam = family(dcfg.text.hf_family, "drafter.text.hf_family")
  return dict(
      model_type=fam.assistant_type, architectures=[fam.assistant_lm],
      text_config=model_config_to_hf(dcfg.text), backbone_hidden_size=dcfg.backbone_hidden_size,
      use_ordered_embeddings=dcfg.use_ordered_embeddings, num_centroids=dcfg.num_centroids,
      centroid_intermediate_top_k=dcfg.centroid_intermediate_top_k, tie_word_embeddings=True,
  )


# ---------------------------------------------------------------------- image front ends
def _tower_from_hf(hf: dict[str, Any]) -> vision_lib.VisionConfig:
  rope = dict(hf.get("rope_parameters") or {})
  if rope.get("rope_type", "axial") != "axial":
    raise ConfigError(f"vision_config 'rope_parameters.rope_type' is {rope['rope_type']!r}; the "
                      "Gemma 4 tower supports only 'axial'")
  if hf.get("attention_bias"):
    raise ConfigError("vision_config 'attention_bias' = true is not supported (Gemma 4 has none)")
  kw = {f.name: hf[f.name] for f in dataclasses.fields(vision_lib.VisionConfig) if f.name in hf}
  kw.pop("rope_theta", None)
  if "rope_theta" in rope:
    kw["rope_theta"] = float(rope["rope_theta"])
  return vision_lib.VisionConfig(**kw)


def _embedder_from_hf(hf: dict[str, Any]) -> vision_lib.UnifiedVisionConfig:
  """`model_patch_size` (written by some releases) must agree; `num_soft_tokens` and
  `initializer_range` do not shape the model and are ignored."""
  cls = vision_lib.UnifiedVisionConfig
  out = cls(**{f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf})
  if hf.get("model_patch_size", out.model_patch_size) != out.model_patch_size:
    raise ConfigError(f"vision_config 'model_patch_size' is {hf['model_patch_size']}; patch_size "
                      f"* pooling_kernel_size = {out.model_patch_size}")
  return out


_FRONT_ENDS_FROM_HF = {"tower": _tower_from_hf, "patch_embedder": _embedder_from_hf}


def vision_config_from_hf(hf: Mapping[str, Any], family_name: str = GEMMA4):
  """The image front end's config (its family's: a VisionConfig or an UnifiedVisionConfig) from an
  HF `vision_config` dict (model_type gemma4_vision / gemma4_unified_vision); HF's defaults fill
  gaps."""
  fam = family(family_name)
  hf = dict(hf)
  if hf.get("model_type") not in (None, fam.vision_type):
    raise ConfigError(f"vision_config model_type is {hf.get('model_type')!r}; expected "
                      f"{fam.vision_type!r}")
  return _FRONT_ENDS_FROM_HF[fam.vision_front_end](hf)


def vision_config_to_hf(v, family_name: str = GEMMA4) -> dict[str, Any]:
  """The keyword dict of the family's HF vision config class (`Gemma4VisionConfig`, ...)."""
  fam = family(family_name)
  out = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
  if isinstance(v, vision_lib.VisionConfig):
    out.pop("rope_theta")
    out.update(attention_bias=False, rope_parameters={"rope_type": "axial",
                                                      "rope_theta": v.rope_theta})
  out["model_type"] = fam.vision_type
  return out


def _vision_fields(outer: Mapping[str, Any], fam: Family) -> dict[str, Any]:
  """ModelConfig's vision fields from a top-level HF config: {} unless it is a multimodal config
  of its family with a `vision_config`; else the family's front end config and the placeholder
  token ids (the family's multimodal config class defaults fill gaps)."""
  if outer.get("model_type") != fam.multimodal_type or not outer.get("vision_config"):
    return {}
  out = {"vision": vision_config_from_hf(outer["vision_config"], fam.name)}
  defaults = dict(fam.token_defaults)
  for k in vision_lib.MULTIMODAL_TOKEN_FIELDS:
    out[k] = outer.get(k, defaults.get(k))
  if out["image_token_id"] is None:
    raise ConfigError("config has a 'vision_config' but no 'image_token_id'")
  return out
