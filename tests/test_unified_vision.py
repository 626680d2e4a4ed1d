"""The 12B's image front end (`model.unified_vision`, HF `Gemma4UnifiedVisionEmbedder`) and its
masks against transformers 5.23's `Gemma4UnifiedForConditionalGeneration` on tiny random models.

transformers' `Gemma4UnifiedImageProcessor` has only a torchvision backend (torchvision is not
installed here), so the pixel inputs are built by hand in the layout the HF model takes: per image
[max_soft_tokens, 3 * (patch_size * pooling_kernel_size)**2] values of its merged "model patches"
and their (x, y) positions on the merged grid, row-major as the processor orders them, padded with
zeros / (-1, -1).
"""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from gemma_mtp_jax import checkpoint
from gemma_mtp_jax import presets
from gemma_mtp_jax.checkpoint import hf_base
from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.model import attention
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import kv_cache
from gemma_mtp_jax.model import transformer
from gemma_mtp_jax.model import unified_vision
from gemma_mtp_jax.model import vision_config as vc
from tests import hf_helpers
from tests.test_convert import _assert_same_files, _cli, _load_clean

jax.config.update("jax_default_matmul_precision", "highest")

S, F = config_lib.SLIDING, config_lib.FULL
TOL = 1e-4
IMG, BOI, EOI = 250, 251, 252
SLOTS = 12  # the processor's max_soft_tokens here: patch slots = soft-token slots per image
VISION = dict(patch_size=4, pooling_kernel_size=2, mm_embed_dim=16, mm_posemb_size=32,
              output_proj_dims=16)
CHANNELS = 3 * 8 ** 2
# (rows, cols) of merged patches: wide, tall, square; each longer than the text window (4).
GRIDS = [(2, 5), (4, 2), (3, 3)]
ROWS = [[0, 1], [2]]  # row 0: wide + tall; row 1: square + an empty slot


# ------------------------------------------------------------------------------ builders
def hf_unified_vlm(seed: int = 0, bidirectional: bool = True):
  """A tiny random `Gemma4UnifiedForConditionalGeneration` (the "unified" text model, window 4; a
  patch embedder of 8 x 8 model patches; an audio embedder), eager attention."""
  text = hf_helpers.hf_text_config(
      "unified", use_bidirectional_attention="vision" if bidirectional else None)
  cfg = transformers.Gemma4UnifiedConfig(
      text_config=text.to_dict(), vision_config=VISION, audio_config=dict(audio_embed_dim=8),
      image_token_id=IMG, boi_token_id=BOI, eoi_token_id=EOI, video_token_id=253,
      audio_token_id=254, boa_token_id=255, eoa_token_index=249)
  for c in (cfg, cfg.text_config):
    c._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.Gemma4UnifiedForConditionalGeneration(cfg).eval().float()
  return hf_helpers.randomize_(model, seed)


def disk_state(model) -> dict[str, np.ndarray]:
  """The model's tensors under the names `save_pretrained` writes (transformers renames the
  embedder on save: embed_vision.* -> vision_embedder.*, multimodal_embedder.embedding_projection
  -> embed_vision.embedding_projection)."""
  out = {}
  for k, v in hf_helpers.numpy_state(model).items():
    k = k.replace("embed_vision.multimodal_embedder.", "embed_vision.")
    if k.startswith("model.embed_vision.") and "embedding_projection" not in k:
      k = "model.vision_embedder." + k[len("model.embed_vision."):]
    out[k] = v
  return out


def jax_base(hf):
  cfg = hf_config.model_config_from_hf(hf.config.to_dict())
  state = disk_state(hf)
  params, extra = hf_base.hf_to_params(cfg, lambda n: state[n], state.keys())
  assert extra == ["model.embed_audio.embedding_projection.weight"]
  return cfg, jax.tree.map(jnp.asarray, params)


def pixel_slots(rng, grids):
  """Per image: [SLOTS, CHANNELS] values in [0, 1] and (x, y) merged-patch positions."""
  pv = np.zeros((len(grids), SLOTS, CHANNELS), np.float32)
  pos = np.full((len(grids), SLOTS, 2), -1, np.int64)
  for j, (h, w) in enumerate(grids):
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pos[j, :h * w] = np.stack([xs.ravel(), ys.ravel()], -1)
    pv[j, :h * w] = rng.uniform(0, 1, (h * w, CHANNELS))
  return pv, pos


def row_slots(pv, pos, rows, slots=2):
  """[B, i, p, c] / [B, i, p, 2] image slots of each row (empty slots: zeros, -1)."""
  b = len(rows)
  out_pv = np.zeros((b, slots) + pv.shape[1:], np.float32)
  out_pos = np.full((b, slots) + pos.shape[1:], -1, np.int32)
  for r, js in enumerate(rows):
    out_pv[r, :len(js)], out_pos[r, :len(js)] = pv[js], pos[js]
  return jnp.asarray(out_pv), jnp.asarray(out_pos)


def image_prompt(rng, counts, text=(3, 4, 2)):
  ids = [2] + rng.integers(3, 240, text[0]).tolist()
  for j, n in enumerate(counts):
    ids += [BOI] + [IMG] * n + [EOI] + rng.integers(3, 240, text[(j + 1) % len(text)]).tolist()
  return ids


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  pv, pos = pixel_slots(rng, GRIDS)
  counts = [h * w for h, w in GRIDS]
  prompts = [image_prompt(rng, [counts[0], counts[1]]), image_prompt(rng, [counts[2]], (2, 5))]
  width = max(map(len, prompts))
  ids = np.array([[0] * (width - len(p)) + p for p in prompts])
  mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  return dict(pv=pv, pos=pos, ids=ids, mask=mask, positions=positions,
              images=row_slots(pv, pos, ROWS))


# ------------------------------------------------------------------------------ the embedder
def test_embedder_equals_hf_get_image_features(batch):
  hf = hf_unified_vlm(seed=1)
  cfg, params = jax_base(hf)
  assert isinstance(cfg.vision, vc.UnifiedVisionConfig) and cfg.vision.channels == CHANNELS
  module = unified_vision.UnifiedVisionEmbedder(cfg.vision, cfg.embed_dim)
  soft, valid = module.apply({"params": params["vision"]}, *batch["images"])
  feats, _ = module.apply({"params": params["vision"]}, *batch["images"],
                          method=unified_vision.UnifiedVisionEmbedder.features)
  assert soft.shape == (2, 2, SLOTS, cfg.embed_dim)
  with torch.no_grad():
    out = hf.model.get_image_features(torch.tensor(batch["pv"]), torch.tensor(batch["pos"]))
  ref_soft = [t.numpy() for t in out.pooler_output]
  ref_feats = out.last_hidden_state.numpy()
  errs = []
  for r, js in enumerate(ROWS):
    for slot, j in enumerate(js):
      n = GRIDS[j][0] * GRIDS[j][1]
      assert np.asarray(valid[r, slot]).tolist() == [True] * n + [False] * (SLOTS - n)
      errs.append(np.abs(np.asarray(soft[r, slot, :n]) - ref_soft[j]).max())
      errs.append(np.abs(np.asarray(feats[r, slot, :n]) - ref_feats[j, :n]).max())
      assert not np.asarray(soft[r, slot, n:]).any()  # padding slots are zero
  print(f"max |soft token / feature error| vs HF: {max(errs):.2e}")
  assert max(errs) <= TOL and np.abs(ref_soft[0]).mean() > 0.1
  assert not np.asarray(valid[1, 1]).any() and not np.asarray(soft[1, 1]).any()  # empty slot
  # Positions matter: the same pixels at shifted positions give other tokens.
  shifted = (batch["images"][0], jnp.where(batch["images"][1] >= 0, batch["images"][1] + 1, -1))
  moved, _ = module.apply({"params": params["vision"]}, *shifted)
  assert np.abs(np.asarray(moved[0, 0, :10]) - ref_soft[0]).max() > 1e-2


def test_whole_model_builds_the_embedder_and_counts_hf_params():
  hf = hf_unified_vlm()
  cfg, params = jax_base(hf)
  init = jax.tree.map(lambda x: x.shape, jax.eval_shape(
      lambda r: transformer.init_params(cfg, r), jax.random.PRNGKey(0)))
  assert jax.tree.map(np.shape, params) == nn.unbox(init)
  hf_vision = sum(p.numel() for n, p in hf.named_parameters() if "embed_vision" in n)
  assert sum(x.size for x in jax.tree.leaves(params["vision"])) == hf_vision


# ------------------------------------------------------------------------------ forward and masks
def _hf_logits(hf, b, **over):
  kw = dict(input_ids=torch.tensor(b["ids"]), attention_mask=torch.tensor(b["mask"]),
            position_ids=torch.tensor(b["positions"]), pixel_values=torch.tensor(b["pv"]),
            image_position_ids=torch.tensor(b["pos"]),
            mm_token_type_ids=torch.tensor((b["ids"] == IMG).astype(np.int64)))
  kw.update(over)
  with torch.no_grad():
    return hf(**kw).logits.numpy()


@functools.lru_cache(maxsize=None)
def _jit_apply(cfg):
  """The base forward, jitted once per config."""
  return jax.jit(lambda p, tok, pos, valid, cache, images: transformer.Transformer(cfg).apply(
      {"params": p}, tok, pos, valid, cache=cache, images=images))


def _forward(cfg, params, b, images, ids=None, positions=None, mask=None, cache=None):
  return _jit_apply(cfg)(
      params, jnp.asarray(b["ids"] if ids is None else ids),
      jnp.asarray(b["positions"] if positions is None else positions),
      jnp.asarray((b["mask"] if mask is None else mask) > 0), cache, images)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_forward_with_images_equals_hf(batch, bidirectional):
  hf = hf_unified_vlm(bidirectional=bidirectional)
  cfg, params = jax_base(hf)
  assert cfg.hf_family == hf_config.UNIFIED and cfg.image_token_id == IMG
  assert (cfg.image_block_layers, cfg.image_block_in_window) == ((S, F), False)
  ref = _hf_logits(hf, batch)
  valid = batch["mask"] > 0
  err = np.abs(np.asarray(_forward(cfg, params, batch, batch["images"]).logits) - ref)[valid].max()
  print(f"max |logit error| vs HF ({'bidirectional' if bidirectional else 'causal'}): {err:.2e}")
  assert err <= TOL and ref[valid].std() > 0.5
  if not bidirectional:
    return
  # The overlay is load-bearing on both layer types and past the window: gemma4's masks (sliding
  # only, window-bounded) and the causal ones both miss HF's.
  gemma4 = cfg.replace(image_block_layers=(S,), image_block_in_window=True)
  gemma4_masks = _forward(gemma4, params, batch, batch["images"]).logits
  assert np.abs(np.asarray(gemma4_masks) - ref)[valid].max() > 1e-2
  windowed = _forward(cfg.replace(image_block_in_window=True), params, batch, batch["images"]).logits
  assert np.abs(np.asarray(windowed) - ref)[valid].max() > 1e-2
  causal = _forward(cfg.replace(use_bidirectional_attention=None), params, batch, batch["images"])
  assert np.abs(np.asarray(causal.logits) - ref)[valid].max() > 1e-2
  # Scanned layers and query-chunked attention (chunks of 8 > window 4) give the same logits.
  scanned = cfg.replace(scan_layers=True, attention_chunk_size=8)
  out = _forward(scanned, transformer.stack_layer_params(cfg, params), batch, batch["images"])
  assert np.abs(np.asarray(out.logits) - ref)[valid].max() <= TOL


def test_masks_follow_hf_create_masks_for_generate():
  """Full and sliding masks with a block longer than the window: exactly what
  `Gemma4UnifiedModel.forward` builds (masking_utils' `create_masks_for_generate`)."""
  from transformers import masking_utils
  from transformers.models.gemma4_unified import modeling_gemma4_unified as mu
  tok = np.array([[5, IMG, IMG, IMG, IMG, IMG, IMG, IMG, 6, IMG, IMG, 7]])
  t = tok.shape[1]
  text = hf_helpers.hf_text_config("unified", sliding_window=3)
  hf_ids = mu.get_block_sequence_ids_for_mask(torch.tensor((tok == IMG).astype(np.int64)), "cpu")
  masks = masking_utils.create_masks_for_generate(text, torch.zeros(1, t, 8), None, None,
                                                  torch.arange(t)[None], block_sequence_ids=hf_ids)
  pos = jnp.arange(t)[None]
  blocks = attention.image_blocks(jnp.asarray(tok == IMG))
  for lt, window in ((S, 3), (F, None)):
    ours = attention.causal_mask(pos, pos, jnp.ones((1, t), bool), window, None, None, blocks,
                                 blocks, block_in_window=False)
    want = masks[lt][0, 0].numpy()
    want = want if want.dtype == bool else want == 0
    np.testing.assert_array_equal(np.asarray(ours[0]), want)
    assert want[1, 7] and want[7, 1]  # both ways inside the block, past the window
    assert want[8, 2] == (window is None)  # text after the block stays windowed
  assert transformer.image_overlay(hf_config.model_config_from_hf(text.to_dict())) == (
      (S, F), False)


def test_prefill_with_images_then_decode_equals_full_forward(batch):
  hf = hf_unified_vlm()
  cfg, params = jax_base(hf)
  rng = np.random.default_rng(5)
  b, q = batch["ids"].shape
  extra = rng.integers(3, 240, (b, 3))
  ids = np.concatenate([batch["ids"], extra], 1)
  mask = np.concatenate([batch["mask"], np.ones_like(extra)], 1)
  positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  want = np.asarray(_forward(cfg, params, batch, batch["images"], ids, positions, mask).logits)
  cache = kv_cache.init_cache(cfg, b, q + 8)
  got = []
  for cols, images in ((slice(0, 3), None), (slice(3, q), batch["images"]),
                       (slice(q, q + 1), None), (slice(q + 1, q + 3), None)):
    out = _forward(cfg, params, batch, images, ids[:, cols], positions[:, cols], mask[:, cols],
                   cache)
    cache = out.cache
    got.append(np.asarray(out.logits))
  valid = mask > 0
  np.testing.assert_allclose(np.concatenate(got, 1)[valid], want[valid], atol=TOL)


# ------------------------------------------------------------------------------ configs, files
def test_config_round_trips_and_refusals():
  v = vc.UnifiedVisionConfig(**VISION)
  unified = hf_config.UNIFIED
  hf = transformers.Gemma4UnifiedVisionConfig(**hf_config.vision_config_to_hf(v, unified)).to_dict()
  assert hf_config.vision_config_from_hf(hf, unified) == v and v.model_patch_size == 8
  assert hf_config.vision_config_from_hf(
      dict(hf, model_patch_size=8, num_soft_tokens=280), unified) == v
  with pytest.raises(config_lib.ConfigError, match="model_patch_size"):
    hf_config.vision_config_from_hf(dict(hf, model_patch_size=16), unified)
  with pytest.raises(config_lib.ConfigError, match="output_proj_dims"):
    vc.UnifiedVisionConfig(mm_embed_dim=16, output_proj_dims=32)
  with pytest.raises(config_lib.ConfigError, match="gemma4_unified_vision"):
    hf_config.vision_config_from_hf({"model_type": "gemma4_vision"}, unified)
  cfg, _ = jax_base(hf_unified_vlm())
  # Dumped configs (dicts) come back as the front end's class; the other one's class is refused.
  assert cfg.vision_front_end == "patch_embedder" and cfg.replace(vision=dict(VISION)) == cfg
  with pytest.raises(config_lib.ConfigError, match="does not fit vision_front_end"):
    cfg.replace(vision=vc.VisionConfig())
  with pytest.raises(config_lib.ConfigError, match="vision.hidden_size"):
    cfg.replace(vision=dict(hidden_size=8))
  out = hf_config.model_config_to_hf(cfg)
  assert out["model_type"] == "gemma4_unified" and out["image_token_id"] == IMG
  assert hf_config.model_config_from_hf(
      transformers.Gemma4UnifiedConfig(**out).to_dict()) == cfg
  # A config.json without token ids takes Gemma4UnifiedConfig's defaults.
  bare = {k: v for k, v in out.items() if not k.endswith("_token_id")}
  assert hf_config.model_config_from_hf(bare).image_token_id == 258_880


def test_round_trip_is_bit_exact_and_fresh_export_loads(tmp_path, batch):
  src, pair_dir, out = tmp_path / "src", tmp_path / "pair", tmp_path / "hf"
  hf = hf_unified_vlm(seed=2)
  hf.save_pretrained(src)
  assistant = os.path.join(tmp_path, "drafter")
  from gemma_mtp_jax import hf_torch
  with hf_torch.hf_assistant_patch():
    hf_helpers.hf_unified_assistant(ordered=False).save_pretrained(assistant)
  _cli("hf-to-jax", "--base", src, "--drafter", assistant, "--out", pair_dir)
  pair = checkpoint.load_pair(str(pair_dir))
  assert isinstance(pair.base_cfg.vision, vc.UnifiedVisionConfig)
  assert sorted(pair.params["base"]["vision"]) == sorted(
      ["patch_ln1", "patch_dense", "patch_dense_bias", "patch_ln2", "pos_embedding", "pos_norm",
       "projection"])
  with safetensors.numpy.safe_open(str(pair_dir / "hf_extra" / "model.safetensors"), "np") as f:
    assert list(f.keys()) == ["model.embed_audio.embedding_projection.weight"]  # audio only
  _cli("jax-to-hf", "--checkpoint", pair_dir, "--out", out)
  _assert_same_files(src, out / "base")
  # A fresh config (no source config kept): the unified classes, no missing / unexpected keys,
  # the same image logits.
  pair.meta["pair"]["hf_extra"] = {}
  checkpoint.export_hf(pair, str(tmp_path / "fresh"))
  cj = json.loads((tmp_path / "fresh" / "base" / "config.json").read_text())
  assert (cj["model_type"], cj["architectures"], cj["vision_config"]["model_type"]) == (
      "gemma4_unified", ["Gemma4UnifiedForConditionalGeneration"], "gemma4_unified_vision")
  model = _load_clean(transformers.Gemma4UnifiedForConditionalGeneration, tmp_path / "fresh" / "base")
  valid = batch["mask"] > 0
  err = np.abs(_hf_logits(model, batch) - _hf_logits(hf, batch))[valid].max()
  assert err == 0.0


# ------------------------------------------------------------------------------ decoding == HF
def test_plain_and_speculative_greedy_with_images_equal_hf(batch):
  """HF `generate` (dynamic cache: the overlay on full and sliding layers at prefill) on each
  image prompt == our plain and speculative greedy decoding from the pixel slots."""
  from gemma_mtp_jax import hf_torch
  from gemma_mtp_jax.decoding import inputs
  from gemma_mtp_jax.decoding import speculative as spec
  k, n = 3, 8
  with hf_torch.hf_assistant_patch():
    target = hf_unified_vlm()
    assistant = hf_helpers.hf_unified_assistant(ordered=False)
  assistant.generation_config.num_assistant_tokens = k
  target.generation_config.eos_token_id = None
  from gemma_mtp_jax.checkpoint import hf_assistant as convert_drafter
  cfg, base_params = jax_base(target)
  with hf_torch.hf_assistant_patch():
    dcfg = hf_config.drafter_config_from_hf(assistant.config.to_dict())
  variables = convert_drafter.state_dict_to_variables(dcfg, hf_helpers.numpy_state(assistant))
  prompts = [[int(t) for t, m in zip(ids, mask) if m] for ids, mask in
             zip(batch["ids"], batch["mask"])]
  images = [(batch["pv"][js], batch["pos"][js]) for js in ROWS]
  refs = []
  for prompt, (pv, pos) in zip(prompts, images):
    ids = torch.tensor([prompt])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.tensor(pv),
              image_position_ids=torch.tensor(pos), do_sample=False, pad_token_id=0,
              mm_token_type_ids=torch.tensor([[int(t == IMG) for t in prompt]]),
              max_new_tokens=n)
    with torch.no_grad(), hf_torch.hf_assistant_patch():
      refs.append(target.generate(**kw)[0, len(prompt):].tolist())
  assert inputs.soft_token_count(cfg, images[0], pixels=True) == 10 + 8  # one per real patch
  ours = spec.decode_prompts(base_params, cfg, prompts, max_new_tokens=n, images=images)
  assert ours.tokens == refs
  ours = spec.decode_prompts(base_params, cfg, prompts, max_new_tokens=n, images=images,
                             drafter_vars=variables, drafter_cfg=dcfg, num_draft_tokens=k)
  assert ours.tokens == refs
  text_only = spec.decode_prompts(base_params, cfg, prompts, max_new_tokens=n)
  assert text_only.tokens != refs


def test_aot_slots_and_flops_count_one_patch_per_soft_token():
  """The AOT plan's image slots and the FLOP model see the 12B's layout: p = s model patches of
  3 * 48**2 values; the embedder's MACs are its dense layer and projection."""
  from gemma_mtp_jax import aot
  from gemma_mtp_jax.model import flops
  cfg = presets.model_configs(presets.load_config("12b"))[0]
  cfg = cfg.replace(vision=vc.UnifiedVisionConfig(), image_token_id=258_880)
  assert aot.image_slots(cfg, 1, 280) == (1, 280, 6912)
  assert flops.vision_flops_per_image(cfg, 280) == 2.0 * 280 * 3840 * (6912 + 3840)
