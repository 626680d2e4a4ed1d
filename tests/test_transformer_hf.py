"""The Flax base model equals HF transformers' Gemma 4 on the same random weights, for every variant
of both families (gemma4's `Gemma4ForCausalLM`, the 12B's `Gemma4UnifiedForCausalLM`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from gemma_mtp_jax import hf_torch
from gemma_mtp_jax import presets
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.model import drafter as drafter_lib
from gemma_mtp_jax.model import transformer
from gemma_mtp_jax.checkpoint import hf_base as convert_base
from gemma_mtp_jax.checkpoint import hf_names as names
from tests import hf_helpers

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4


def _setup(variant, seed=0):
  with hf_torch.hf_assistant_patch():  # store layers in bases without KV sharing too
    hf = hf_helpers.hf_causal_lm(variant, seed=seed)
  cfg = hf_config.model_config_from_hf(hf.config.to_dict())
  assert cfg.hf_family == hf_helpers.family_of(variant).name
  params = convert_base.state_dict_to_params(cfg, hf_helpers.numpy_state(hf))
  return hf, cfg, params


def _left_padded(rng, batch, length, vocab, pads):
  tokens = rng.integers(3, vocab, (batch, length))
  mask = np.ones((batch, length), np.int64)
  for b, p in enumerate(pads):
    tokens[b, :p] = 0
    mask[b, :p] = 0
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  return tokens, mask, positions


# The MoE variant runs both implementations: "routed" (the default from an HF config) and "dense".
CASES = [(v, None) for v in sorted(hf_helpers.VARIANTS) if v != "moe"] + [
    ("moe", "routed"), ("moe", "dense")]


@pytest.mark.parametrize("variant,moe_impl", CASES)
def test_logits_hidden_and_store_kv_equal_hf(variant, moe_impl):
  hf, cfg, params = _setup(variant)
  if moe_impl is not None:
    assert cfg.enable_moe and cfg.moe_impl == "routed"  # the default
    cfg = cfg.replace(moe_impl=moe_impl)
  rng = np.random.default_rng(1)
  # Longer than every variant's sliding window; batch 3 with left padding of different sizes.
  tokens, mask, positions = _left_padded(rng, 3, 17, cfg.vocab_size, pads=(0, 4, 9))
  assert tokens.shape[1] > 2 * cfg.sliding_window
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(positions), output_hidden_states=True,
             return_shared_kv_states=True)
  out = transformer.Transformer(cfg).apply(
      {"params": params}, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask > 0))
  valid = mask > 0
  logits = np.asarray(out.logits)
  assert np.abs(logits - ref.logits.numpy())[valid].max() <= TOL
  hidden = np.asarray(out.hidden)
  assert np.abs(hidden - ref.hidden_states[-1].numpy())[valid].max() <= TOL
  # Logits are not trivially equal: softcap at 30 and random weights spread them.
  assert logits[valid].std() > 0.5

  # Store-layer K/V equal HF's shared KV states (the layers the assistant reads; HF 5.23 marks
  # them only with KV sharing, `hf_torch.hf_assistant_patch` in every base).
  with hf_torch.hf_assistant_patch():
    modes = hf.config.kv_sharing_modes
  assert sorted(cfg.store_layers.values()) == [i for i, m in enumerate(modes) if m == "store"]
  assert set(ref.shared_kv_states) == set(out.store_kv) == set(cfg.layer_types)
  for lt, (k, v) in ref.shared_kv_states.items():
    ours = out.store_kv[lt]
    np.testing.assert_allclose(np.asarray(ours.k)[valid], k.numpy().transpose(0, 2, 1, 3)[valid],
                               atol=TOL)
    np.testing.assert_allclose(np.asarray(ours.v)[valid], v.numpy().transpose(0, 2, 1, 3)[valid],
                               atol=TOL)


def test_store_layers_match_hf_kv_sharing_modes():
  for variant in hf_helpers.VARIANTS:
    hf_cfg = hf_helpers.hf_text_config(variant)
    cfg = hf_config.model_config_from_hf(hf_cfg.to_dict())
    modes = hf_cfg.kv_sharing_modes
    if cfg.num_kv_shared_layers:
      assert sorted(cfg.store_layers.values()) == [i for i, m in enumerate(modes) if m == "store"]
    assert [cfg.is_kv_shared(i) for i in range(cfg.num_layers)] == [m == "reuse" for m in modes]


def test_conditional_generation_text_weights_load():
  """Gemma4ForConditionalGeneration keeps text weights under model.language_model.*."""
  text_cfg = hf_helpers.hf_text_config("e_style")
  mm_cfg = transformers.Gemma4Config(text_config=text_cfg.to_dict(), vision_config=None,
                                     audio_config=None)
  torch.manual_seed(0)
  mm = hf_helpers.randomize_(transformers.Gemma4ForConditionalGeneration(mm_cfg).eval(), seed=3)
  state = hf_helpers.numpy_state(mm)
  assert any(k.startswith("model.language_model.") for k in state)
  cfg = hf_config.model_config_from_hf(mm.config.to_dict())
  params, extra = convert_base.hf_to_params(cfg, lambda n: state[n], state.keys())
  tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 9))
  with torch.no_grad():
    ref = mm(input_ids=torch.tensor(tokens)).logits.numpy()
  pos = np.broadcast_to(np.arange(9), (2, 9))
  ours = transformer.Transformer(cfg).apply({"params": params}, jnp.asarray(tokens),
                                            jnp.asarray(pos)).logits
  assert np.abs(np.asarray(ours) - ref).max() <= TOL


def test_round_trip_names_are_bit_exact():
  for variant in hf_helpers.VARIANTS:
    hf, cfg, params = _setup(variant)
    state = hf_helpers.numpy_state(hf)
    back = convert_base.params_to_hf(cfg, params)
    expected = {k: v for k, v in state.items() if k != "lm_head.weight"}
    assert set(back) == set(expected)
    for k, v in expected.items():
      assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
      assert np.array_equal(back[k], v), k


def test_bad_checkpoints_name_the_tensor():
  hf, cfg, params = _setup("e_style")
  state = hf_helpers.numpy_state(hf)
  missing = dict(state)
  del missing["model.layers.1.self_attn.q_proj.weight"]
  with pytest.raises(names.ConversionError, match=r"layers\.1\.self_attn\.q_proj"):
    convert_base.state_dict_to_params(cfg, missing)
  extra = dict(state)
  extra["model.layers.0.self_attn.bogus.weight"] = np.zeros(3, np.float32)
  with pytest.raises(names.ConversionError, match="bogus"):
    convert_base.state_dict_to_params(cfg, extra)
  wrong = dict(state)
  wrong["model.layers.2.mlp.up_proj.weight"] = np.zeros((5, 5), np.float32)
  with pytest.raises(names.ConversionError, match=r"layers\.2\.mlp\.up_proj.*\(5, 5\)"):
    convert_base.state_dict_to_params(cfg, wrong)
  # A KV-shared layer has no k_proj: a checkpoint that has one does not fit this config.
  shared = cfg.num_layers - 1
  bad = dict(state)
  bad[f"model.layers.{shared}.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
  with pytest.raises(names.ConversionError, match=f"layers.{shared}.self_attn.k_proj"):
    convert_base.state_dict_to_params(cfg, bad)


def test_other_architecture_config_is_refused():
  with pytest.raises(config_lib.ConfigError, match="llama"):
    hf_config.model_config_from_hf({"model_type": "llama", "hidden_size": 8})


# Published text-only parameter counts (reference/gemma4-released-configs.md; the 12B's card:
# "11.95B" with its embedders), in billions.
PUBLISHED_B = {"e2b": 4.63, "e4b": 7.46, "12b": 11.91, "26b_a4b": 25.23, "31b": 30.70}


@pytest.mark.parametrize("preset", sorted(PUBLISHED_B))
def test_preset_param_count_equals_hf_meta_model(preset):
  cfg, _ = presets.model_configs(presets.load_config(preset))
  fam = hf_config.FAMILIES[cfg.hf_family]
  full = cfg
  cfg = cfg.replace(vision=None, image_token_id=None)  # the text model (what the table counts)
  ours = transformer.count_params(cfg)  # jax.eval_shape: nothing allocated
  hf_text = hf_config.model_config_to_hf(cfg)
  with torch.device("meta"):
    hf = getattr(transformers, fam.causal_lm)(getattr(transformers, fam.text_config_class)(**hf_text))
  assert ours == _hf_count(hf)
  assert abs(ours / 1e9 - PUBLISHED_B[preset]) < 0.01
  if full.vision is not None:  # the tower + projection too (HF without its audio tower)
    with torch.device("meta"):
      hf = getattr(transformers, fam.conditional_generation)(
          getattr(transformers, fam.multimodal_config_class)(**hf_config.model_config_to_hf(full)))
    assert transformer.count_params(full) == _hf_count(hf)


def test_12b_param_counts_equal_the_published_ones():
  """The 12B pair as released (HF meta builds of its config.json files): the text model
  (11,907,350,272 parameters), with its vision and audio embedders (the card's 11.95B) and the
  assistant (423M); the vision embedder is params here, the audio one is carried through."""
  base, dcfg = presets.model_configs(presets.load_config("12b"))
  shapes = jax.eval_shape(lambda r: drafter_lib.init_variables(dcfg, r), jax.random.PRNGKey(0))
  ours_d = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  with torch.device("meta"), hf_torch.hf_assistant_patch():
    full = transformers.Gemma4UnifiedForConditionalGeneration(
        transformers.Gemma4UnifiedConfig(**hf_helpers.RELEASED_12B_BASE))
    assistant = transformers.Gemma4UnifiedAssistantForCausalLM(
        transformers.Gemma4UnifiedAssistantConfig(**hf_config.drafter_config_to_hf(dcfg)))
  assert ours_d == _hf_count(assistant)
  # HF's parameters(), without the layer_scalar buffers (one per layer), as the card counts.
  params = lambda m: sum(p.numel() for p in m.parameters())
  assert transformer.count_params(base) - base.num_layers == 11_907_350_272
  assert params(full) == 11_959_730_176  # + the vision and audio embedders
  # The patch embedder as params (audio stays carried through: 3840 x 640 = 2,457,600).
  assert transformer.count_params(hf_helpers.with_12b_embedder(base)) == (
      params(full) - 2_457_600 + base.num_layers)
  assert params(assistant) == ours_d - dcfg.text.num_layers == 422_856_960


def _hf_count(model) -> int:
  """Parameters of an HF model as this package counts them: HF keeps `layer_scalar` and the
  vision tower's clip bounds as (saved) buffers; here they are params."""
  clip = ("layer_scalar", "input_min", "input_max", "output_min", "output_max")
  return sum(p.numel() for p in model.parameters()) + sum(
      b.numel() for n, b in model.named_buffers() if n.endswith(clip))
