"""The Gemma 4 model families as transformers names them, in one table.

transformers has two families of Gemma 4 text decoders that compute the same thing: `gemma4`
(E2B, E4B, 26B-A4B, 31B: `Gemma4ForCausalLM`, `Gemma4ForConditionalGeneration`,
`Gemma4AssistantForCausalLM`) and `gemma4_unified` (12B, transformers >= 5.10:
`Gemma4UnifiedForCausalLM`, `Gemma4UnifiedForConditionalGeneration`,
`Gemma4UnifiedAssistantForCausalLM`). The unified text decoder is the gemma4 one without per-layer
embeddings and MoE (its config class removes those fields), with its own class defaults; one
`ModelConfig` (field `hf_family`) and one model serve both. This module holds the names, the
defaults and the reading of `per_layer_config`; `config` maps configs in and out with them, and
`checkpoint.hf_export` and `hf_torch` pick the transformers classes from here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Family:
  """The HF names of one family (model_type strings and transformers class names)."""

  name: str
  text_type: str  # model_type of the text decoder's config
  multimodal_type: str  # model_type of the ConditionalGeneration config (nested text_config)
  assistant_type: str
  causal_lm: str  # transformers class names
  conditional_generation: str
  assistant_lm: str
  text_config_class: str
  multimodal_config_class: str
  assistant_config_class: str
  assistant_backbone: int  # the assistant config class's default backbone_hidden_size
  vision_config_class: str = "Gemma4VisionConfig"  # of the image front end (`model.vision_config`)
  # Text-config defaults that differ from gemma4's (the config class's own defaults).
  text_defaults: tuple[tuple[str, Any], ...] = ()
  # Text-config fields the family's config class does not have (its model never reads them).
  removed: tuple[str, ...] = ()


GEMMA4 = "gemma4"
UNIFIED = "gemma4_unified"

_PLE_MOE = ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block",
            "num_experts", "top_k_experts", "moe_intermediate_size")

FAMILIES = {
    GEMMA4: Family(
        name=GEMMA4, text_type="gemma4_text", multimodal_type="gemma4",
        assistant_type="gemma4_assistant", causal_lm="Gemma4ForCausalLM",
        conditional_generation="Gemma4ForConditionalGeneration",
        assistant_lm="Gemma4AssistantForCausalLM", text_config_class="Gemma4TextConfig",
        multimodal_config_class="Gemma4Config", assistant_config_class="Gemma4AssistantConfig",
        assistant_backbone=1536),
    # transformers 5.23 configuration_gemma4_unified.py: window 1024, 262144 positions, image
    # tokens bidirectional ("vision"), no PLE or MoE fields (the released 12B config.json still
    # carries them, zeroed; they are ignored).
    UNIFIED: Family(
        name=UNIFIED, text_type="gemma4_unified_text", multimodal_type="gemma4_unified",
        assistant_type="gemma4_unified_assistant", causal_lm="Gemma4UnifiedForCausalLM",
        conditional_generation="Gemma4UnifiedForConditionalGeneration",
        assistant_lm="Gemma4UnifiedAssistantForCausalLM",
        text_config_class="Gemma4UnifiedTextConfig",
        multimodal_config_class="Gemma4UnifiedConfig",
        assistant_config_class="Gemma4UnifiedAssistantConfig", assistant_backbone=3840,
        vision_config_class="Gemma4UnifiedVisionConfig",
        text_defaults=(("sliding_window", 1024), ("max_position_embeddings", 262_144),
                       ("use_bidirectional_attention", "vision")),
        removed=_PLE_MOE),
}

TEXT_TYPES = tuple(f.text_type for f in FAMILIES.values())
MULTIMODAL_TYPES = tuple(f.multimodal_type for f in FAMILIES.values())
ASSISTANT_TYPES = tuple(f.assistant_type for f in FAMILIES.values())
MODEL_TYPES = MULTIMODAL_TYPES + TEXT_TYPES + ASSISTANT_TYPES


def of_model_type(model_type: str | None) -> Family | None:
  """The family a model_type (text, multimodal or assistant) belongs to; None: not Gemma 4.
  A config without a model_type is read as gemma4 (the project's own dicts)."""
  if model_type is None:
    return FAMILIES[GEMMA4]
  for f in FAMILIES.values():
    if model_type in (f.text_type, f.multimodal_type, f.assistant_type):
      return f
  return None


def split_text_config(hf: Mapping[str, Any]) -> tuple[dict[str, Any], Family | None, str | None]:
  """(text config dict, its family, its model_type) of an HF config dict.

  `hf` is a text config, or a multimodal / assistant config holding one as `text_config` (whose
  model_type defaults to the outer family's text type). The text dict comes back with the
  family's class defaults filled in and its removed fields dropped, so a reader can apply the
  gemma4 defaults to whatever is left. Family None: not a Gemma 4 model_type.
  """
  hf = dict(hf)
  model_type = hf.get("model_type")
  outer = of_model_type(model_type)
  if "text_config" in hf and outer is not None and model_type not in TEXT_TYPES:
    hf = dict(hf["text_config"] or {})
    model_type = hf.get("model_type", outer.text_type)
  family = of_model_type(model_type)
  if family is None or (model_type is not None and model_type != family.text_type):
    return hf, None, model_type
  for k in family.removed:
    hf.pop(k, None)
  for k, v in family.text_defaults:
    hf.setdefault(k, v)
  if family.removed:  # no per-layer embeddings, no MoE
    hf.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
  return hf, family, model_type


def text_config_out(family: str, out: dict[str, Any]) -> dict[str, Any]:
  """A gemma4_text keyword dict (`ModelConfig.to_hf_config`) rewritten for `family`."""
  f = FAMILIES[family]
  out = {k: v for k, v in out.items() if k not in f.removed}
  out["model_type"] = f.text_type
  return out


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
  from gemma_mtp_jax.model.config import FULL, ConfigError  # config imports this module

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
