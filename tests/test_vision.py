"""The Flax vision tower + embedder (`model.vision`) == HF's `Gemma4VisionModel` +
`Gemma4MultimodalEmbedder` on tiny random models and images of different aspect ratios; remat ==
no remat; configs and weights round-trip HF -> JAX -> HF bit for bit."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from gemma_mtp_jax import checkpoint
from gemma_mtp_jax import convert as cli
from gemma_mtp_jax.checkpoint import hf_base
from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import vision
from tests import hf_helpers
from tests import vision_helpers as vh

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
# (width, height): wide, tall and square, so the images resize to different grids with padding
# patches and different numbers of soft tokens (56, 56, 64 of the 70 slots).
SIZES = [(120, 40), (30, 90), (64, 64)]
ROWS = [[0, 1], [2]]  # row 0: wide + tall; row 1: square + an empty slot
NUM_SLOTS = 2


@pytest.fixture(scope="module")
def images():
  processed = vh.process_images(vh.random_images(SIZES))
  return processed, vh.image_slots(processed, ROWS, NUM_SLOTS)


def _convert(model):
  cfg = hf_config.model_config_from_hf(model.config.to_dict())
  state = hf_helpers.numpy_state(model)
  params, extra = hf_base.hf_to_params(cfg, lambda n: state[n], state.keys())
  assert extra == []
  return cfg, jax.tree.map(jnp.asarray, params["vision"]), state


def _hf_features(model, processed):
  with torch.no_grad():
    out = model.model.get_image_features(torch.tensor(processed["pixel_values"]),
                                         torch.tensor(processed["image_position_ids"]).long())
  return out.last_hidden_state.numpy(), [t.numpy() for t in out.pooler_output]


@pytest.mark.parametrize("over", [{}, dict(use_clipped_linears=True, standardize=True)],
                         ids=["plain", "clipped_standardized"])
def test_tower_equals_hf(images, over):
  processed, (pixels, positions) = images
  model = vh.hf_vlm(seed=1, **over)
  cfg, params, _ = _convert(model)
  assert cfg.vision == hf_config.vision_config_from_hf(vh.hf_vision_config(**over).to_dict())
  enc = vision.VisionEncoder(cfg.vision, cfg.embed_dim)
  soft, valid = enc.apply({"params": params}, pixels, positions)
  feats, valid_f = enc.apply({"params": params}, pixels, positions, method="features")
  soft, valid, feats = np.asarray(soft), np.asarray(valid), np.asarray(feats)
  assert soft.shape == (2, NUM_SLOTS, 70, 64) and feats.shape == (2, NUM_SLOTS, 70, 32)
  np.testing.assert_array_equal(valid, np.asarray(valid_f))

  ref_feats, ref_soft = _hf_features(model, processed)
  slots = [(0, 0), (0, 1), (1, 0)]
  # The valid slots are the image's soft tokens, in HF's order, and as many as the processor counted.
  assert [int(valid[b, j].sum()) for b, j in slots] == list(processed["num_soft_tokens"])
  assert sorted(set(processed["num_soft_tokens"])) == [56, 64]
  ours_feats = np.concatenate([feats[b, j][valid[b, j]] for b, j in slots])
  scale = np.abs(ref_feats).max()  # the pooler's sqrt(d) makes features O(10)
  assert np.abs(ours_feats - ref_feats).max() <= TOL * max(1.0, scale)
  for (b, j), ref in zip(slots, ref_soft):
    assert np.abs(soft[b, j][valid[b, j]] - ref).max() <= TOL
  # The empty slot: no valid token, zero soft tokens, nothing NaN anywhere.
  assert not valid[1, 1].any() and not soft[1, 1].any()
  assert np.isfinite(feats).all() and np.isfinite(soft).all()
  assert not soft[~valid].any()


def test_clipping_and_standardize_change_the_output(images):
  """The buffers are read: the same weights without clipping / standardisation give other tokens
  (so `test_tower_equals_hf[clipped_standardized]` checks them)."""
  _, (pixels, positions) = images
  cfg, params, _ = _convert(vh.hf_vlm(seed=1, use_clipped_linears=True, standardize=True))
  soft, valid = vision.VisionEncoder(cfg.vision, cfg.embed_dim).apply({"params": params}, pixels,
                                                                      positions)
  for off, names in ((dict(use_clipped_linears=False), vision.BUFFER_NAMES[:4]),
                     (dict(standardize=False), vision.BUFFER_NAMES[4:])):
    enc = vision.VisionEncoder(dataclasses.replace(cfg.vision, **off), cfg.embed_dim)
    other, _ = enc.apply({"params": _without(params, names)}, pixels, positions)
    assert np.abs(np.asarray(other) - np.asarray(soft))[np.asarray(valid)].max() > 1e-2, off


def _without(tree, names):
  return {k: _without(v, names) if isinstance(v, dict) else v for k, v in tree.items()
          if k not in names}


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_equals_no_remat_and_buffers_get_no_gradient(images, policy):
  _, (pixels, positions) = images
  cfg, params, _ = _convert(vh.hf_vlm(seed=2, use_clipped_linears=True, standardize=True))

  def loss(p, remat):
    enc = vision.VisionEncoder(cfg.vision, cfg.embed_dim, remat_policy=remat)
    soft, valid = enc.apply({"params": p}, pixels, positions)
    return jnp.sum(jnp.where(valid[..., None], soft, 0) ** 2)

  (l0, g0), (l1, g1) = (jax.value_and_grad(loss)(params, r) for r in ("none", policy))
  assert float(l0) == float(l1)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  flat = jax.tree_util.tree_leaves_with_path(g0)
  buffers = [g for path, g in flat if vision.is_buffer(path)]
  weights = [g for path, g in flat if not vision.is_buffer(path)]
  assert len(buffers) == 2 * 7 * 4 + 2  # 7 clipped linears a layer, 4 bounds each; std bias/scale
  assert all(not np.asarray(g).any() for g in buffers)
  assert all(np.asarray(g).any() for g in weights)


def test_param_tree_matches_init_and_hf_counts():
  """The converted tree has exactly the leaves (paths, shapes) `VisionEncoder.init` makes, and as
  many numbers as HF's tower + embedder (parameters and buffers)."""
  model = vh.hf_vlm(seed=0, use_clipped_linears=True, standardize=True)
  cfg, params, state = _convert(model)
  enc = vision.VisionEncoder(cfg.vision, cfg.embed_dim)
  boxed = enc.init(jax.random.PRNGKey(0), *vision.dummy_images(cfg.vision))["params"]
  # Every param carries logical axis names (one per dim) for the sharding rules.
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim
             for x in leaves)
  init = nn.unbox(boxed)
  shapes = lambda t: {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(t)}
  assert shapes(init) == shapes(params)
  hf_count = sum(v.size for k, v in state.items()
                 if k.startswith(("model.vision_tower.", "model.embed_vision.")))
  assert sum(x.size for x in jax.tree.leaves(params)) == hf_count


def test_config_round_trips_through_hf():
  model = vh.hf_vlm(seed=0, use_clipped_linears=True, standardize=True)
  cfg = hf_config.model_config_from_hf(model.config.to_dict())
  assert (cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id) == (
      vh.IMAGE_TOKEN_ID, vh.BOI_TOKEN_ID, vh.EOI_TOKEN_ID)
  assert cfg.vision.use_clipped_linears and cfg.vision.standardize
  out = hf_config.model_config_to_hf(cfg)
  assert out["model_type"] == "gemma4" and out["vision_config"]["model_type"] == "gemma4_vision"
  hf = transformers.Gemma4Config(
      text_config=transformers.Gemma4TextConfig(**out.pop("text_config")),
      vision_config=transformers.Gemma4VisionConfig(**out.pop("vision_config")), **out)
  assert hf_config.model_config_from_hf(hf.to_dict()) == cfg
  # The preset / dumped-config form (plain dicts) comes back equal too.
  d = config_lib.model_config_to_dict(cfg)
  assert isinstance(d["vision"], dict)
  assert config_lib.model_config_from_dict(d) == cfg
  # A text-only config stays text-only, whatever token ids the top level carries.
  text = transformers.Gemma4Config(text_config=hf_helpers.hf_text_config("e_style")).to_dict()
  assert hf_config.model_config_from_hf(text).vision is None


@pytest.mark.parametrize("over, key", [
    (dict(head_dim=18), "head_dim"),
    (dict(num_key_value_heads=3), "num_attention_heads"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 100.0}), "rope_type"),
    (dict(hidden_activation="relu"), "hidden_activation"),
    (dict(patch_size=0), "patch_size"),
])
def test_bad_vision_configs_name_the_key(over, key):
  d = {**vh.VISION, **over}
  with pytest.raises(config_lib.ConfigError, match=key):
    hf_config.vision_config_from_hf(d)
  with pytest.raises(config_lib.ConfigError, match="vision.pooling_kernel"):
    config_lib.model_config_from_dict(dict(config_lib.model_config_to_dict(
        hf_config.model_config_from_hf(vh.hf_vlm_config().to_dict())),
        vision={"pooling_kernel": 2}))


def test_hf_round_trip_is_bit_exact_through_files(tmp_path):
  """HF dir -> JAX pair (the tower as params["vision"]) -> HF dir: the same files, byte for byte,
  and torch loads it with the same image features."""
  model = vh.hf_vlm(seed=4, use_clipped_linears=True, standardize=True)
  src, pair_dir, out = tmp_path / "src", tmp_path / "pair", tmp_path / "out"
  model.save_pretrained(src)
  assert cli.main(["hf-to-jax", "--base", str(src), "--out", str(pair_dir)]) == 0
  pair = checkpoint.load_pair(str(pair_dir))
  assert pair.base_cfg.vision.use_clipped_linears
  v = pair.params["base"]["vision"]
  assert float(v["layer_1"]["mlp"]["down"]["output_max"]) == float(
      model.model.vision_tower.encoder.layers[1].mlp.down_proj.output_max)
  assert cli.main(["jax-to-hf", "--checkpoint", str(pair_dir), "--out", str(out)]) == 0
  for name in ("model.safetensors", "config.json", "generation_config.json"):
    assert (src / name).read_bytes() == (out / "base" / name).read_bytes(), name
  # From scratch (no source config / layout kept): tensors still equal, config regenerated.
  pair.meta["pair"]["hf_extra"] = {}
  checkpoint.export_hf(pair, str(tmp_path / "fresh"))
  a = safetensors.numpy.load_file(str(src / "model.safetensors"))
  b = safetensors.numpy.load_file(str(tmp_path / "fresh" / "base" / "model.safetensors"))
  assert set(a) == set(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
  back = transformers.Gemma4ForConditionalGeneration.from_pretrained(
      tmp_path / "fresh" / "base", attn_implementation="eager").eval()
  assert hf_config.model_config_from_hf(back.config.to_dict()) == pair.base_cfg.architecture()
  processed = vh.process_images(vh.random_images(SIZES[:1]))
  for x, y in zip(_hf_features(model, processed)[1], _hf_features(back, processed)[1]):
    assert np.array_equal(x, y)


def test_text_only_checkpoint_refused_for_a_vision_config():
  cfg = hf_config.model_config_from_hf(vh.hf_vlm_config().to_dict())
  state = hf_helpers.numpy_state(hf_helpers.hf_causal_lm("e_style"))
  with pytest.raises(checkpoint.ConversionError, match="vision tower"):
    hf_base.hf_to_params(cfg, lambda n: state[n], state.keys())
