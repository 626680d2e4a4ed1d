"""Presets, the HF config mapping and config validation.

The spec these tests pin down: every preset builds a valid (base, drafter) pair; the pair survives a
round trip through transformers' own config classes (what convert/export writes and reads); the presets
hold the released models' numbers; and a bad config fails with a message naming the field at fault.
"""

import dataclasses
import json

import pytest
import transformers

from gemma_mtp_jax.model import config as mc
from gemma_mtp_jax import presets
from gemma_mtp_jax.training import config as train_config
from gemma_mtp_jax.model.config import ConfigError, DrafterConfig, ModelConfig

PRESETS = ("tiny", "e2b", "e4b", "26b_a4b", "31b")
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
  if base.vision is None:
    hf = transformers.Gemma4TextConfig(**base.to_hf_config())
  else:  # a base with a vision tower is a Gemma4ForConditionalGeneration config
    hf = transformers.Gemma4Config(**base.to_hf_config())
    assert hf.vision_config.hidden_size == base.vision.hidden_size
  d = hf.to_dict()
  # transformers 5.23 writes global-layer overrides as `per_layer_config`, not global_head_dim.
  assert "per_layer_config" in d.get("text_config", d)
  back = ModelConfig.from_hf_config(d, **_local(base))
  assert back == base, _diff(base, back)

  # What a checkpoint directory holds: config.json written and read by transformers itself.
  hf.save_pretrained(tmp_path)
  reloaded = transformers.AutoConfig.from_pretrained(tmp_path)
  assert ModelConfig.from_hf_config(reloaded.to_dict(), **_local(base)) == base
  assert ModelConfig.from_hf_config(json.loads((tmp_path / "config.json").read_text()),
                                    **_local(base)) == base

  # The text config inside a multimodal one with no tower reads back as the text-only base.
  text_only = base.replace(vision=None, image_token_id=None, boi_token_id=None, eoi_token_id=None,
                           video_token_id=None, audio_token_id=None)
  nested = transformers.Gemma4Config(text_config=_text_hf(base)).to_dict()
  assert nested["model_type"] == "gemma4"
  assert ModelConfig.from_hf_config(nested, **_local(base)) == text_only


def _text_hf(base: ModelConfig) -> dict:
  """The HF text config dict of `base` (the `text_config` of a base with a vision tower)."""
  d = base.to_hf_config()
  return d["text_config"] if base.vision is not None else d


@pytest.mark.parametrize("name", PRESETS)
def test_drafter_round_trips_through_hf(name):
  base, drafter = _pair(name)
  kw = {k: v for k, v in drafter.to_hf_config().items() if k != "model_type"}
  hf = transformers.Gemma4AssistantConfig(**kw)
  # HF's own assistant checks (no PLE/MoE/double-wide, every layer KV-shared).
  hf.validate_architecture()
  d = hf.to_dict()
  assert d["model_type"] == "gemma4_assistant"
  back = DrafterConfig.from_hf_config(d, **_local(drafter.text))
  assert back == drafter, _diff(drafter.text, back.text)
  back.check_fits(base)


@pytest.mark.parametrize("name", PRESETS)
def test_store_layers_match_hf_kv_sharing(name):
  base, _ = _pair(name)
  modes = transformers.Gemma4TextConfig(**_text_hf(base)).kv_sharing_modes
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
  got = ModelConfig.from_hf_config(_E2B_TEXT_CONFIG, **_local(base))
  assert got == base, _diff(base, got)
  got_d = DrafterConfig.from_hf_config(_E2B_ASSISTANT_CONFIG, **_local(drafter.text))
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
  got = ModelConfig.from_hf_config(_26B_TEXT_CONFIG, **_local(base))
  assert got == base, _diff(base, got)
  with pytest.raises(ConfigError, match="use_bidirectional_attention"):
    ModelConfig.from_hf_config({**_26B_TEXT_CONFIG, "use_bidirectional_attention": "all"})


def test_per_layer_config_is_read_as_hf_reads_it():
  base, _ = _pair("26b_a4b")
  d = transformers.Gemma4TextConfig(**base.to_hf_config()).to_dict()
  # HF ignores the top-level global_head_dim once per_layer_config is present.
  assert ModelConfig.from_hf_config({**d, "global_head_dim": 128}, **_local(base)) == base
  sliding = {**d, "per_layer_config": {**d["per_layer_config"], "0": {"head_dim": 128}}}
  with pytest.raises(ConfigError, match="sliding layer 0"):
    ModelConfig.from_hf_config(sliding)
  mixed = {**d, "per_layer_config": {**d["per_layer_config"], "05": {"head_dim": 128}}}
  with pytest.raises(ConfigError, match="different geometries"):
    ModelConfig.from_hf_config(mixed)
  no_k_eq_v = {**d, "attention_k_eq_v": False}
  with pytest.raises(ConfigError, match="attention_k_eq_v"):
    ModelConfig.from_hf_config(no_k_eq_v)


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
    ModelConfig.from_hf_config(llama)
  with pytest.raises(ConfigError, match="'llama'"):
    DrafterConfig.from_hf_config(llama)
  with pytest.raises(ConfigError, match="'gemma3'"):
    ModelConfig.from_hf_config({"model_type": "gemma3", "text_config": {"hidden_size": 8}})


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
    "tiny": dict(embed_dim=64, hidden_dim=256, num_heads=2, num_kv_heads=1),
}
# Full-attention layer indices of the released layer_types lists.
_FULL_LAYERS = {"e2b": range(4, 35, 5), "e4b": range(5, 42, 6), "26b_a4b": range(5, 30, 6),
                "31b": range(5, 60, 6), "tiny": (2, 5)}


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
