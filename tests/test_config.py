"""Presets, the HF config mapping (`checkpoint.hf_config`), its family table and config validation.

The spec these tests pin down: every preset builds a valid (base, drafter) pair; the pair survives a
round trip through transformers' own config classes of its family (what convert/export writes and
reads); the presets hold the released models' numbers; a family is one table entry; stored configs
written before a family field existed still read as their family; and a bad config fails with a
message naming the field at fault.
"""

import ast
import dataclasses
import json
import os

import pytest
import transformers

from gemma_mtp_jax import hf_torch
from gemma_mtp_jax import presets
from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.checkpoint import layout
from gemma_mtp_jax.model import config as mc
from gemma_mtp_jax.model import transformer
from gemma_mtp_jax.model import vision_config
from gemma_mtp_jax.model.config import ConfigError, DrafterConfig, ModelConfig
from gemma_mtp_jax.training import config as train_config
from gemma_mtp_jax.training import run_dir
from tests import hf_helpers

PRESETS = ("tiny", "e2b", "e4b", "12b", "26b_a4b", "31b")
# Fields that are ours only (numerics/compilation); HF configs do not carry them.
_LOCAL_FIELDS = mc.NUMERICS_FIELDS  # not in an HF config


def _pair(name):
  return presets.model_configs(presets.load_config(name))


def _local(cfg: ModelConfig) -> dict:
  return {f: getattr(cfg, f) for f in _LOCAL_FIELDS}


def _diff(a, b) -> dict:
  """Field-by-field differences of two frozen configs, for readable assertion messages."""
  return {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
          if getattr(a, f.name) != getattr(b, f.name)}


# ---------------------------------------------------------------------- (a) presets build and fit
def test_valid_presets_lists_every_config_file():
  assert set(PRESETS) <= set(presets.valid_presets())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_a_fitting_pair(name):
  base, drafter = _pair(name)
  assert isinstance(base, ModelConfig) and isinstance(drafter, DrafterConfig)
  drafter.check_fits(base)
  assert drafter.text.num_kv_shared_layers == drafter.text.num_layers == 4
  assert drafter.text.layer_types == (mc.SLIDING, mc.SLIDING, mc.SLIDING, mc.FULL)
  assert drafter.backbone_hidden_size == base.embed_dim
  assert drafter.text.ple_dim == 0 and drafter.text.final_logit_softcap is None
  assert base.final_logit_softcap == 30.0 and base.layer_types[-1] == mc.FULL
  cfg = presets.load_config(name)
  assert set(cfg.train) >= {"num_draft_steps", "drafter_loss_weight", "seq_len", "batch_size",
                            "learning_rate", "warmup_steps", "num_steps", "freeze_base",
                            "share_embedding_with_base", "draft_query_position"}
  assert cfg.train.num_draft_steps == 4
  assert {base.hf_family, drafter.text.hf_family} == {"gemma4_unified" if name == "12b" else "gemma4"}
  # The seed recipe's lambda for pretrained pairs; the tiny pair trains from scratch (configs/tiny.py).
  assert cfg.train.drafter_loss_weight == (1.0 if name == "tiny" else 0.01)


def test_none_fields_stay_overridable():
  # ConfigDict cannot type a None; the presets write typed placeholders so CLI overrides work.
  cfg = presets.load_config("e4b")
  cfg.model.num_global_kv_heads = 2
  cfg.drafter.text.final_logit_softcap = 30.0
  cfg.hf_base = "somewhere/else"
  assert presets.model_configs(cfg)[0].num_global_kv_heads == 2


# ---------------------------------------------------------------------- load_config
def test_load_config_by_name_path_and_hub_spelling():
  by_name = presets.load_config("e4b")
  by_path = presets.load_config(str(presets.CONFIG_DIRS[0] / "e4b.py"))
  assert by_name.to_dict() == by_path.to_dict()
  assert presets.load_config("26B-A4B").name == "26b_a4b"


def test_load_config_passes_the_suffix_to_get_config(tmp_path):
  path = tmp_path / "mine.py"
  path.write_text(
      "from gemma_mtp_jax import presets\n"
      "def get_config(arg=None):\n"
      "  cfg = presets.load_config('tiny')\n"
      "  cfg.train.num_steps = int(arg) if arg else 1\n"
      "  return cfg\n")
  assert presets.load_config(f"{path}:7").train.num_steps == 7
  assert presets.load_config(str(path)).train.num_steps == 1


def test_load_config_errors_name_the_preset(tmp_path):
  with pytest.raises(ConfigError, match=r"unknown preset 'e5b'.*valid presets: .*e4b.*tiny"):
    presets.load_config("e5b")
  with pytest.raises(ConfigError, match="takes none"):
    presets.load_config("tiny:big")
  with pytest.raises(ConfigError, match="does not exist"):
    presets.load_config(str(tmp_path / "missing.py"))
  empty = tmp_path / "empty.py"
  empty.write_text("x = 1\n")
  with pytest.raises(ConfigError, match="no get_config"):
    presets.load_config(str(empty))


# ---------------------------------------------------------------------- (b) HF round trips
@pytest.mark.parametrize("name", PRESETS)
def test_base_round_trips_through_hf(name, tmp_path):
  base, _ = _pair(name)
  fam = hf_config.FAMILIES[base.hf_family]
  if base.vision is None:
    hf = getattr(transformers, fam.text_config_class)(**hf_config.model_config_to_hf(base))
  else:  # a base with a vision tower is a Gemma4ForConditionalGeneration config
    hf = getattr(transformers, fam.multimodal_config_class)(**hf_config.model_config_to_hf(base))
    assert hf.vision_config.hidden_size == base.vision.hidden_size
  d = hf.to_dict()
  # transformers 5.23 writes global-layer overrides as `per_layer_config`, not global_head_dim.
  assert "per_layer_config" in d.get("text_config", d)
  back = hf_config.model_config_from_hf(d, **_local(base))
  assert back == base, _diff(base, back)

  # What a checkpoint directory holds: config.json written and read by transformers itself.
  hf.save_pretrained(tmp_path)
  reloaded = transformers.AutoConfig.from_pretrained(tmp_path)
  assert hf_config.model_config_from_hf(reloaded.to_dict(), **_local(base)) == base
  assert hf_config.model_config_from_hf(json.loads((tmp_path / "config.json").read_text()),
                                    **_local(base)) == base

  # The text config inside a multimodal one with no tower reads back as the text-only base.
  text_only = base.replace(vision=None, image_token_id=None, boi_token_id=None, eoi_token_id=None,
                           video_token_id=None, audio_token_id=None)
  nested = getattr(transformers, fam.multimodal_config_class)(text_config=_text_hf(base)).to_dict()
  assert nested["model_type"] == fam.multimodal_type
  assert hf_config.model_config_from_hf(nested, **_local(base)) == text_only


def _text_hf(base: ModelConfig) -> dict:
  """The HF text config dict of `base` (the `text_config` of a base with a vision tower)."""
  d = hf_config.model_config_to_hf(base)
  return d["text_config"] if base.vision is not None else d


@pytest.mark.parametrize("name", PRESETS)
def test_drafter_round_trips_through_hf(name):
  base, drafter = _pair(name)
  fam = hf_config.FAMILIES[drafter.text.hf_family]
  kw = {k: v for k, v in hf_config.drafter_config_to_hf(drafter).items() if k != "model_type"}
  with hf_torch.hf_assistant_patch():  # 5.23's kv_sharing_modes refuses all-shared layers
    hf = getattr(transformers, fam.assistant_config_class)(**kw)
    # HF's own assistant checks (no PLE/MoE/double-wide, every layer KV-shared).
    hf.validate_architecture()
  d = hf.to_dict()
  assert d["model_type"] == fam.assistant_type
  back = hf_config.drafter_config_from_hf(d, **_local(drafter.text))
  assert back == drafter, _diff(drafter.text, back.text)
  back.check_fits(base)


@pytest.mark.parametrize("name", PRESETS)
def test_store_layers_match_hf_kv_sharing(name):
  base, _ = _pair(name)
  fam = hf_config.FAMILIES[base.hf_family]
  modes = getattr(transformers, fam.text_config_class)(**_text_hf(base)).kv_sharing_modes
  if base.num_kv_shared_layers:
    assert {i for i, m in enumerate(modes) if m == "store"} == set(base.store_layers.values())
    assert [m == "reuse" for m in modes] == [base.is_kv_shared(i) for i in range(base.num_layers)]
  else:
    # HF 5.23 marks no store layers without KV sharing; ours still names the last of each type,
    # which is what the 26B-A4B / 31B assistants read.
    assert modes == [None] * base.num_layers
    last = {t: max(i for i, lt in enumerate(base.layer_types) if lt == t) for t in mc.LAYER_TYPES}
    assert base.store_layers == last


# Released config.json excerpts (text_config of google/gemma-4-E2B-it and the full
# google/gemma-4-E2B-it-assistant config.json), as found copied verbatim in public sources.
_E2B_TEXT_CONFIG = {
    "model_type": "gemma4_text", "hidden_size": 1536, "num_hidden_layers": 35,
    "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "global_head_dim": 512,
    "num_global_key_value_heads": None, "attention_k_eq_v": False, "sliding_window": 512,
    "vocab_size": 262144, "vocab_size_per_layer_input": 262144, "hidden_size_per_layer_input": 256,
    "num_kv_shared_layers": 20, "use_double_wide_mlp": True, "intermediate_size": 6144,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": 30.0, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
    "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 7,
    "rope_parameters": {
        "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0,
                           "rope_type": "proportional"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
}
_E2B_ASSISTANT_CONFIG = {
    "architectures": ["Gemma4AssistantForCausalLM"], "backbone_hidden_size": 1536,
    "centroid_intermediate_top_k": 32, "model_type": "gemma4_assistant", "num_centroids": 2048,
    "tie_word_embeddings": True, "use_ordered_embeddings": True,
    "text_config": {
        "attention_bias": False, "attention_k_eq_v": False, "bos_token_id": 2,
        "enable_moe_block": False, "eos_token_id": 1, "final_logit_softcapping": None,
        "global_head_dim": 512, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 256, "hidden_size_per_layer_input": 0, "intermediate_size": 2048,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
        "max_position_embeddings": 131072, "model_type": "gemma4_text", "moe_intermediate_size": None,
        "num_attention_heads": 4, "num_experts": None, "num_global_key_value_heads": None,
        "num_hidden_layers": 4, "num_key_value_heads": 1, "num_kv_shared_layers": 4,
        "pad_token_id": 0, "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0,
                               "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
        "sliding_window": 512, "tie_word_embeddings": True, "top_k_experts": None,
        "use_bidirectional_attention": None, "use_double_wide_mlp": False, "vocab_size": 262144,
        "vocab_size_per_layer_input": 0},
}


def test_e2b_preset_equals_released_config_json():
  base, drafter = _pair("e2b")
  got = hf_config.model_config_from_hf(_E2B_TEXT_CONFIG, **_local(base))
  assert got == base, _diff(base, got)
  got_d = hf_config.drafter_config_from_hf(_E2B_ASSISTANT_CONFIG, **_local(drafter.text))
  assert got_d == drafter, _diff(drafter.text, got_d.text)


# text_config of google/gemma-4-26B-A4B-it as pinned by public loaders (a checkpoint "contract" and a
# Rust parser's sample). Note use_bidirectional_attention "vision": only image tokens attend both ways.
_26B_TEXT_CONFIG = {
    "model_type": "gemma4_text", "vocab_size": 262144, "num_hidden_layers": 30, "hidden_size": 2816,
    "intermediate_size": 2112, "moe_intermediate_size": 704, "num_experts": 128, "top_k_experts": 8,
    "enable_moe_block": True, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
    "global_head_dim": 512, "num_global_key_value_heads": 2, "sliding_window": 1024,
    "hidden_activation": "gelu_pytorch_tanh", "attention_k_eq_v": True, "tie_word_embeddings": True,
    "use_bidirectional_attention": "vision", "final_logit_softcapping": 30.0,
    "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 262144,
    "num_kv_shared_layers": 0, "max_position_embeddings": 262144, "rms_norm_eps": 1e-06,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5,
    "rope_parameters": _E2B_TEXT_CONFIG["rope_parameters"],
}


def test_26b_a4b_preset_equals_released_text_config():
  base, _ = _pair("26b_a4b")
  got = hf_config.model_config_from_hf(_26B_TEXT_CONFIG, **_local(base))
  assert got == base, _diff(base, got)
  with pytest.raises(ConfigError, match="use_bidirectional_attention"):
    hf_config.model_config_from_hf({**_26B_TEXT_CONFIG, "use_bidirectional_attention": "all"})


def test_per_layer_config_is_read_as_hf_reads_it():
  base, _ = _pair("26b_a4b")
  d = transformers.Gemma4TextConfig(**hf_config.model_config_to_hf(base)).to_dict()
  # HF ignores the top-level global_head_dim once per_layer_config is present.
  assert hf_config.model_config_from_hf({**d, "global_head_dim": 128}, **_local(base)) == base
  sliding = {**d, "per_layer_config": {**d["per_layer_config"], "0": {"head_dim": 128}}}
  with pytest.raises(ConfigError, match="sliding layer 0"):
    hf_config.model_config_from_hf(sliding)
  mixed = {**d, "per_layer_config": {**d["per_layer_config"], "05": {"head_dim": 128}}}
  with pytest.raises(ConfigError, match="different geometries"):
    hf_config.model_config_from_hf(mixed)
  no_k_eq_v = {**d, "attention_k_eq_v": False}
  with pytest.raises(ConfigError, match="attention_k_eq_v"):
    hf_config.model_config_from_hf(no_k_eq_v)


# ---------------------------------------------------------------------- (c) validation messages
def _tiny_fields(**kw) -> dict:
  d = presets.load_config("tiny").model.to_dict()
  d.update(kw)
  return d


def test_heads_not_divisible_by_kv_heads_names_num_heads():
  with pytest.raises(ConfigError, match=r"'num_heads'.*not divisible by num_kv_heads=3"):
    mc.model_config_from_dict(_tiny_fields(num_kv_heads=3))


def test_layer_types_length_mismatch_names_layer_types():
  with pytest.raises(ConfigError, match=r"'layer_types'.*5 entries but num_layers is 6"):
    mc.model_config_from_dict(_tiny_fields(layer_types=(mc.SLIDING,) * 4 + (mc.FULL,)))


def test_unknown_layer_type_names_layer_types():
  types = list(_tiny_fields()["layer_types"])
  types[1] = "local_attention"
  with pytest.raises(ConfigError, match=r"'layer_types'.*entry 1 is 'local_attention'"):
    mc.model_config_from_dict(_tiny_fields(layer_types=tuple(types)))


def test_unknown_key_is_named_with_a_suggestion():
  d = _tiny_fields()
  d["num_head"] = d.pop("num_heads")
  with pytest.raises(ConfigError, match=r"unknown config key 'model\.num_head'.*'num_heads'"):
    mc.model_config_from_dict(d)
  drafter = presets.load_config("tiny").drafter.to_dict()
  drafter["num_centroid"] = drafter.pop("num_centroids")
  with pytest.raises(ConfigError, match=r"'drafter\.num_centroid'.*'num_centroids'"):
    mc.drafter_config_from_dict(drafter)
  with pytest.raises(ConfigError, match=r"'slidng_window'.*'sliding_window'"):
    presets.text_fields(slidng_window=16)
  with pytest.raises(ConfigError, match=r"'train\.lr'"):
    train_config.train_fields(lr=1e-3)


def test_other_architecture_config_json_is_refused():
  llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}
  with pytest.raises(ConfigError, match="'llama'"):
    hf_config.model_config_from_hf(llama)
  with pytest.raises(ConfigError, match="'llama'"):
    hf_config.drafter_config_from_hf(llama)
  with pytest.raises(ConfigError, match="'gemma3'"):
    hf_config.model_config_from_hf({"model_type": "gemma3", "text_config": {"hidden_size": 8}})


def test_drafter_that_cannot_read_the_base_kv_is_refused():
  cfg = presets.load_config("e4b")
  cfg.drafter.text.num_kv_heads = 1
  with pytest.raises(ConfigError, match="num_kv_heads"):
    presets.model_configs(cfg)
  cfg = presets.load_config("e4b")
  cfg.drafter.backbone_hidden_size = 1536
  with pytest.raises(ConfigError, match="backbone_hidden_size"):
    presets.model_configs(cfg)


# ---------------------------------------------------------------------- (d) the released numbers
_EXPECTED = {
    "e2b": dict(embed_dim=1536, num_layers=35, num_heads=8, num_kv_heads=1, hidden_dim=6144,
                use_double_wide_mlp=True, sliding_window=512, ple_dim=256, ple_vocab_size=262_144,
                num_kv_shared_layers=20, vocab_size=262_144, global_kv_heads=1),
    "e4b": dict(embed_dim=2560, num_layers=42, num_heads=8, num_kv_heads=2, hidden_dim=10_240,
                use_double_wide_mlp=False, sliding_window=512, ple_dim=256,
                num_kv_shared_layers=18, vocab_size=262_144, global_kv_heads=2),
    "26b_a4b": dict(embed_dim=2816, num_layers=30, num_heads=16, num_kv_heads=8, hidden_dim=2112,
                    enable_moe=True, num_experts=128, top_k_experts=8, moe_hidden_dim=704,
                    attention_k_eq_v=True, global_kv_heads=2, sliding_window=1024, ple_dim=0,
                    num_kv_shared_layers=0, vocab_size=262_144),
    "31b": dict(embed_dim=5376, num_layers=60, num_heads=32, num_kv_heads=16, hidden_dim=21_504,
                attention_k_eq_v=True, global_kv_heads=4, sliding_window=1024, ple_dim=0,
                num_kv_shared_layers=0, enable_moe=False, vocab_size=262_144),
    "12b": dict(embed_dim=3840, num_layers=48, num_heads=16, num_kv_heads=8, hidden_dim=15_360,
                attention_k_eq_v=True, global_kv_heads=1, sliding_window=1024, ple_dim=0,
                num_kv_shared_layers=0, enable_moe=False, vocab_size=262_144,
                max_position_embeddings=262_144, use_bidirectional_attention="vision"),
    "tiny": dict(vocab_size=1024, embed_dim=128, num_layers=6, num_heads=4, num_kv_heads=1,
                 head_dim=32, global_head_dim=64, hidden_dim=512, ple_dim=16,
                 num_kv_shared_layers=2, use_double_wide_mlp=True, sliding_window=16),
}
_EXPECTED_DRAFTER = {
    "e2b": dict(embed_dim=256, hidden_dim=2048, num_heads=4, num_kv_heads=1, global_kv_heads=1),
    "e4b": dict(embed_dim=256, hidden_dim=2048, num_heads=4, num_kv_heads=2, global_kv_heads=2),
    "26b_a4b": dict(embed_dim=1024, hidden_dim=8192, num_heads=16, num_kv_heads=8,
                    global_kv_heads=2, attention_k_eq_v=True),
    "31b": dict(embed_dim=1024, hidden_dim=8192, num_heads=32, num_kv_heads=16, global_kv_heads=4,
                attention_k_eq_v=True),
    "12b": dict(embed_dim=1024, hidden_dim=8192, num_heads=16, num_kv_heads=8, global_kv_heads=1,
                attention_k_eq_v=True),
    "tiny": dict(embed_dim=64, hidden_dim=256, num_heads=2, num_kv_heads=1),
}
# Full-attention layer indices of the released layer_types lists.
_FULL_LAYERS = {"e2b": range(4, 35, 5), "e4b": range(5, 42, 6), "26b_a4b": range(5, 30, 6),
                "31b": range(5, 60, 6), "12b": range(5, 48, 6), "tiny": (2, 5)}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_holds_released_numbers(name):
  base, drafter = _pair(name)
  for field, want in _EXPECTED[name].items():
    assert getattr(base, field) == want, (name, field)
  for field, want in _EXPECTED_DRAFTER[name].items():
    assert getattr(drafter.text, field) == want, (name, "drafter", field)
  assert [i for i, t in enumerate(base.layer_types) if t == mc.FULL] == list(_FULL_LAYERS[name])
  if name != "tiny":
    assert (base.head_dim, base.global_head_dim) == (256, 512)
    assert (drafter.text.head_dim, drafter.text.global_head_dim) == (256, 512)
    assert (base.rope_local_theta, base.rope_global_theta) == (10_000.0, 1_000_000.0)
    assert base.global_rope_type == "proportional" and base.global_partial_rotary_factor == 0.25
    assert drafter.use_ordered_embeddings == (name in ("e2b", "e4b"))
    assert (drafter.num_centroids, drafter.centroid_intermediate_top_k) == (2048, 32)
    assert drafter.text.sliding_window == base.sliding_window
    cfg = presets.load_config(name)
    assert cfg.hf_drafter == cfg.hf_base + "-assistant"
  else:
    assert drafter.use_ordered_embeddings and drafter.num_centroids == 64
    assert presets.load_config(name).hf_base is None


# ---------------------------------------------------------------------- (e) families
def test_released_12b_config_forms_map_to_the_preset():
  base, dcfg = _pair("12b")
  assert base.hf_family == dcfg.text.hf_family == hf_config.UNIFIED
  # 5.23 saves per_layer_config instead of global_head_dim / num_global_key_value_heads.
  saved = transformers.Gemma4UnifiedConfig(**hf_helpers.RELEASED_12B_BASE).to_dict()
  assert "global_head_dim" not in saved["text_config"] and saved["text_config"]["per_layer_config"]
  for form in (hf_helpers.RELEASED_12B_TEXT, saved["text_config"]):
    assert hf_config.model_config_from_hf(form) == base.architecture()
  # The multimodal forms add the patch embedder and Gemma4UnifiedConfig's token ids (the preset
  # is text-only).
  for form in (hf_helpers.RELEASED_12B_BASE, saved):
    got = hf_config.model_config_from_hf(form)
    assert got == hf_helpers.with_12b_embedder(base.architecture())
  cfg_out = hf_config.model_config_to_hf(base)
  assert cfg_out["model_type"] == "gemma4_unified_text" and "enable_moe_block" not in cfg_out
  hf = transformers.Gemma4UnifiedTextConfig(**cfg_out).to_dict()
  assert hf_config.model_config_from_hf(hf) == base.architecture()

  saved = transformers.Gemma4UnifiedAssistantConfig(**hf_helpers.RELEASED_12B_ASSISTANT).to_dict()
  for form in (hf_helpers.RELEASED_12B_ASSISTANT, saved):
    d = hf_config.drafter_config_from_hf(form)
    assert d == dcfg.replace(text=dcfg.text.architecture())
  out = hf_config.drafter_config_to_hf(dcfg)
  assert (out["model_type"], out["architectures"]) == ("gemma4_unified_assistant",
                                                       ["Gemma4UnifiedAssistantForCausalLM"])
  assert out["text_config"]["model_type"] == "gemma4_unified_text"
  dcfg.check_fits(base)
  assert base.store_layers == {mc.SLIDING: 46, mc.FULL: 47}  # what the assistant reads


def test_family_checks_sit_at_the_hf_boundary():
  """A ModelConfig knows no family; what one implies is checked where configs meet HF names
  (`hf_config.check_family`: an export, `presets.model_configs`)."""
  base, _ = _pair("12b")
  with pytest.raises(ConfigError, match="hf_family.*no per-layer embeddings and no MoE"):
    hf_config.model_config_to_hf(base.replace(ple_dim=8, ple_vocab_size=16))
  with pytest.raises(ConfigError, match="unknown family 'gemma5'"):
    hf_config.model_config_to_hf(base.replace(hf_family="gemma5"))
  with pytest.raises(ConfigError, match="'model.image_block_in_window' is True.*gemma4_unified"):
    hf_config.model_config_to_hf(base.replace(image_block_in_window=True))
  cfg = presets.load_config("12b")
  cfg.model.update(dict(ple_dim=8, ple_vocab_size=16))
  with pytest.raises(ConfigError, match="'model.hf_family'"):
    presets.model_configs(cfg)
  # Naming another family without its fields is refused, not silently half applied.
  cfg = presets.load_config("31b")
  cfg.model.hf_family = hf_config.UNIFIED
  with pytest.raises(ConfigError, match="'model.image_block_layers'.*text_fields"):
    presets.model_configs(cfg)
  with pytest.raises(ConfigError, match="unknown family 'gemma5'"):
    presets.text_fields(hf_family="gemma5")
  with pytest.raises(ConfigError, match="gemma4_unified_vision"):
    hf_config.model_config_from_hf({"model_type": "gemma4_unified_vision"})
  with pytest.raises(ConfigError, match="gemma4_unified_text"):
    hf_config.drafter_config_from_hf({"model_type": "gemma4_unified_text"})


@pytest.fixture
def made_up_family(monkeypatch):
  """A new transformers family mapped to existing features (gemma4's vision tower, the 12B's image
  masks), added to the one table for this test only."""
  monkeypatch.setattr(hf_config, "FAMILIES", dict(hf_config.FAMILIES))
  return hf_config.register_family(hf_config.Family(
      name="gemma4_made_up", text_type="gemma4_made_up_text",
      assistant_type="gemma4_made_up_assistant", vision_type="gemma4_made_up_vision",
      causal_lm="Gemma4MadeUpForCausalLM", conditional_generation="Gemma4MadeUpForConditionalGeneration",
      assistant_lm="Gemma4MadeUpAssistantForCausalLM", text_config_class="Gemma4MadeUpTextConfig",
      multimodal_config_class="Gemma4MadeUpConfig",
      assistant_config_class="Gemma4MadeUpAssistantConfig",
      vision_config_class="Gemma4MadeUpVisionConfig", assistant_backbone=64,
      text_defaults=(("sliding_window", 5),), image_block_layers=(mc.SLIDING, mc.FULL),
      image_block_in_window=False))


def test_a_family_is_one_table_entry(made_up_family):
  """An HF config of the new model_type reads into a ModelConfig with the family's fields, writes
  back under its names, and its presets get them: nothing but the table entry was added."""
  fields = dict(image_block_layers=(mc.SLIDING, mc.FULL), image_block_in_window=False,
                vision_front_end="tower")
  text = {k: v for k, v in hf_helpers.VARIANTS["k_eq_v"].items() if k != "sliding_window"}
  text["model_type"] = "gemma4_made_up_text"
  cfg = hf_config.model_config_from_hf(text)
  assert cfg.hf_family == "gemma4_made_up" and cfg.sliding_window == 5  # the class default
  assert {f: getattr(cfg, f) for f in mc.FAMILY_FIELDS} == fields
  assert transformer.image_overlay(cfg) == ((mc.SLIDING, mc.FULL), False)
  out = hf_config.model_config_to_hf(cfg)
  assert out["model_type"] == "gemma4_made_up_text" and hf_config.model_config_from_hf(out) == cfg
  # Multimodal and assistant configs of the family, and the model dirs the converters accept.
  tower = dict(model_type="gemma4_made_up_vision", hidden_size=16, intermediate_size=32,
               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8)
  mm = hf_config.model_config_from_hf(dict(model_type="gemma4_made_up", text_config=text,
                                           vision_config=tower, image_token_id=250))
  assert isinstance(mm.vision, vision_config.VisionConfig) and mm.vision.hidden_size == 16
  mm_out = hf_config.model_config_to_hf(mm)
  assert (mm_out["model_type"], mm_out["vision_config"]["model_type"]) == (
      "gemma4_made_up", "gemma4_made_up_vision")
  assert hf_config.model_config_from_hf(mm_out) == mm
  drafter_text = dict(text, num_hidden_layers=2, layer_types=[mc.SLIDING, mc.FULL],
                      hidden_size=32, final_logit_softcapping=None)
  dcfg = hf_config.drafter_config_from_hf(dict(model_type="gemma4_made_up_assistant",
                                               text_config=drafter_text))
  assert dcfg.text.hf_family == "gemma4_made_up" and dcfg.backbone_hidden_size == 64
  dcfg.check_fits(cfg)
  d_out = hf_config.drafter_config_to_hf(dcfg)
  assert (d_out["model_type"], d_out["architectures"]) == (
      "gemma4_made_up_assistant", ["Gemma4MadeUpAssistantForCausalLM"])
  assert hf_config.drafter_config_from_hf(d_out) == dcfg
  assert {"gemma4_made_up", "gemma4_made_up_text", "gemma4_made_up_assistant"} <= set(
      hf_config.model_types())
  preset = presets.text_fields(hf_family="gemma4_made_up", vocab_size=256, embed_dim=64,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                               hidden_dim=64, layer_types=(mc.SLIDING, mc.FULL))
  assert {f: preset[f] for f in mc.FAMILY_FIELDS} == fields
  with pytest.raises(ConfigError, match="model_type 'gemma4_made_up_text' is 'gemma4_made_up'"):
    hf_config.register_family(dataclasses.replace(made_up_family, name="gemma4_other"))


def test_model_package_holds_no_hf_model_type():
  """`model/` computes; the HF names of every family (model types) live in `checkpoint.hf_config`.
  The one exception is ModelConfig's default `hf_family`, a family name."""
  types = {t for f in hf_config.FAMILIES.values()
           for t in (f.multimodal_type, f.text_type, f.assistant_type, f.vision_type)}
  root = os.path.dirname(transformer.__file__)
  found, imports = [], []
  for name in sorted(n for n in os.listdir(root) if n.endswith(".py")):
    with open(os.path.join(root, name), encoding="utf-8") as f:
      source = f.read()
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, ast.Constant) and node.value in types:
        found.append((name, node.value, source.splitlines()[node.lineno - 1].split(":")[0].strip()))
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        imports += [(name, m) for m in mods if m.startswith("gemma_mtp_jax.checkpoint")]
  assert found == [("config.py", ModelConfig.hf_family, "hf_family")]
  assert not imports


def _stored_before_family_fields(d: dict) -> dict:
  """A ModelConfig dict as pair.json / fingerprint.json held it before FAMILY_FIELDS existed."""
  return {k: v for k, v in d.items() if k not in mc.FAMILY_FIELDS}


def test_stored_12b_configs_without_the_family_fields_read_as_the_12b():
  base, dcfg = _pair("12b")
  base = hf_helpers.with_12b_embedder(base)  # its front end's class comes from the family too
  drafter = mc.drafter_config_to_dict(dcfg)
  pj = {"base": _stored_before_family_fields(mc.model_config_to_dict(base)),
        "drafter": dict(drafter, text=_stored_before_family_fields(drafter["text"]))}
  got_base, got_drafter = layout.pair_configs(json.loads(json.dumps(pj)))
  assert got_base == base and got_drafter == dcfg
  assert isinstance(got_base.vision, vision_config.UnifiedVisionConfig)
  assert transformer.image_overlay(got_base) == ((mc.SLIDING, mc.FULL), False)


def test_resume_accepts_a_workdir_recorded_before_the_family_fields(tmp_path):
  cfg = presets.load_config("12b")
  base, dcfg = presets.model_configs(cfg)
  current = run_dir.fingerprint(cfg, base, dcfg, train_config.TrainConfig.from_config(cfg.train))
  old = json.loads(json.dumps(current))
  old["model"] = _stored_before_family_fields(old["model"])
  old["drafter"]["text"] = _stored_before_family_fields(old["drafter"]["text"])
  with_fingerprint, pair_json_only = tmp_path / "fingerprint", tmp_path / "pair_json"
  with_fingerprint.mkdir()
  (with_fingerprint / run_dir.FINGERPRINT_JSON).write_text(json.dumps(old))
  pair_json_only.mkdir()  # a workdir written before fingerprints: pair.json's configs
  drafter = mc.drafter_config_to_dict(dcfg)
  (pair_json_only / layout.PAIR_JSON).write_text(json.dumps({
      "format": layout.PAIR_FORMAT,
      "base": _stored_before_family_fields(mc.model_config_to_dict(base)),
      "drafter": dict(drafter, text=_stored_before_family_fields(drafter["text"]))}, default=str))
  for workdir in (with_fingerprint, pair_json_only):
    assert run_dir.check_fingerprint(str(workdir), current, allow=False) == []
  # A family field that really differs from the recorded family's is still a refused change.
  other = dict(current, model=dict(current["model"], image_block_in_window=True))
  with pytest.raises(ConfigError, match=r"model\.image_block_in_window: false \(workdir\)"):
    run_dir.check_fingerprint(str(with_fingerprint), other, allow=False)
