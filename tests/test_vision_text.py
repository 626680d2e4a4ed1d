"""The text model with images equals HF's `Gemma4ForConditionalGeneration`: soft-token merge, pad
embedding and PLE at image positions, the bidirectional image mask on sliding layers, prefill +
decode with images, and plain / speculative decoding of image prompts against HF `generate`.

Until the Flax vision tower is in this branch, the image soft tokens come from HF's own
`get_image_features` and reach the JAX model through `image_soft`; `test_images_through_tower` is
the one check that needs `ModelConfig.vision` (it runs the same comparison through `images=`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemma_mtp_jax import hf_torch
from gemma_mtp_jax.checkpoint import hf_base as convert_base
from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.decoding import speculative as spec
from gemma_mtp_jax.model import attention
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import drafter
from gemma_mtp_jax.model import kv_cache
from gemma_mtp_jax.model import transformer
from tests import hf_helpers
from tests import vision_helpers

jax.config.update("jax_default_matmul_precision", "highest")

S, F = config_lib.SLIDING, config_lib.FULL
TOL = 1e-4
IMG, BOI, EOI = (vision_helpers.IMAGE_TOKEN_ID, vision_helpers.BOI_TOKEN_ID,
                 vision_helpers.EOI_TOKEN_ID)
PATCH_DIM = 3 * 2 * 2  # patch_size 2
MAX_PATCHES = 64  # 16 soft tokens per image at most (pooling kernel 2)


# ------------------------------------------------------------------------------ builders
def hf_vlm(bidirectional: bool, seed: int = 0):
  """A tiny random `Gemma4ForConditionalGeneration`: the e_style text model (sliding window 6) and
  a one-layer vision tower (patch 2, pooling kernel 2)."""
  return vision_helpers.hf_vlm(
      seed, text_over=dict(use_bidirectional_attention="vision" if bidirectional else None),
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
      num_key_value_heads=2, head_dim=16, patch_size=2, pooling_kernel_size=2,
      position_embedding_size=16)


def jax_base(hf):
  """(ModelConfig, params) of the HF model (text decoder and vision tower)."""
  cfg = hf_config.model_config_from_hf(hf.config.to_dict())
  params = convert_base.state_dict_to_params(cfg, hf_helpers.numpy_state(hf))
  return cfg, jax.tree.map(jnp.asarray, params)


def pixel_slots(rng, grids):
  """HF image-processor-style inputs: per image [MAX_PATCHES, PATCH_DIM] values and (x, y) patch
  positions (-1 on padding) of an h x w patch grid."""
  pv = np.zeros((len(grids), MAX_PATCHES, PATCH_DIM), np.float32)
  pos = np.full((len(grids), MAX_PATCHES, 2), -1, np.int64)
  for j, (h, w) in enumerate(grids):
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pos[j, :h * w] = np.stack([xs.ravel(), ys.ravel()], -1)
    pv[j, :h * w] = rng.uniform(0, 1, (h * w, PATCH_DIM))
  return pv, pos


def hf_soft(hf, pv, pos):
  """HF's projected soft tokens, one [n_j, D] array per image."""
  with torch.no_grad():
    feats = hf.model.get_image_features(torch.tensor(pv), torch.tensor(pos)).pooler_output
  return [f.numpy() for f in feats]


def soft_slots(feats, slots: int = 2):
  """One prompt's (soft_isD, valid_is): image j's soft tokens first in slot j, then padding."""
  d = feats[0].shape[-1]
  soft = np.zeros((slots, MAX_PATCHES // 4, d), np.float32)
  valid = np.zeros((slots, MAX_PATCHES // 4), bool)
  for j, f in enumerate(feats):
    soft[j, :len(f)], valid[j, :len(f)] = f, True
  return soft, valid


def image_prompt(rng, counts, text=(3, 4, 2)):
  """[bos, text, (boi, image tokens, eoi, text) per image]."""
  ids = [2] + rng.integers(3, 240, text[0]).tolist()
  for j, n in enumerate(counts):
    ids += [BOI] + [IMG] * n + [EOI] + rng.integers(3, 240, text[(j + 1) % len(text)]).tolist()
  return ids


def _left_pad(prompts):
  width = max(map(len, prompts))
  ids = np.array([[0] * (width - len(p)) + p for p in prompts])
  mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  return ids, mask, np.clip(np.cumsum(mask, 1) - 1, 0, None)


@pytest.fixture(scope="module")
def batch():
  """Two left-padded image prompts (16 + 6 soft tokens; 16 soft tokens) with their pixel slots,
  HF soft tokens per prompt, and HF's mm_token_type_ids."""
  rng = np.random.default_rng(0)
  pv, pos = pixel_slots(rng, [(8, 8), (4, 6), (8, 8)])
  prompts = [image_prompt(rng, [16, 6]), image_prompt(rng, [16], text=(2, 5))]
  ids, mask, positions = _left_pad(prompts)
  return dict(pv=pv, pos=pos, prompts=prompts, ids=ids, mask=mask, positions=positions,
              per_prompt=[[0, 1], [2]])


# ------------------------------------------------------------------------------ forward == HF
def _hf_logits(hf, b):
  with torch.no_grad():
    return hf(input_ids=torch.tensor(b["ids"]), attention_mask=torch.tensor(b["mask"]),
              position_ids=torch.tensor(b["positions"]), pixel_values=torch.tensor(b["pv"]),
              image_position_ids=torch.tensor(b["pos"]),
              mm_token_type_ids=torch.tensor((b["ids"] == IMG).astype(np.int64))).logits.numpy()


@functools.lru_cache(maxsize=None)
def jit_apply(cfg):
  """The base forward, jitted once per config."""
  return jax.jit(lambda p, tok, pos, valid, cache, soft: transformer.Transformer(cfg).apply(
      {"params": p}, tok, pos, valid, cache=cache, image_soft=soft))


def _jax_forward(cfg, params, b, image_soft, cache=None):
  return jit_apply(cfg)(params, jnp.asarray(b["ids"]), jnp.asarray(b["positions"]),
                        jnp.asarray(b["mask"] > 0), cache, image_soft)


def _batch_soft(hf, b):
  feats = hf_soft(hf, b["pv"], b["pos"])
  rows = [soft_slots([feats[j] for j in js]) for js in b["per_prompt"]]
  return tuple(jnp.asarray(np.stack(x)) for x in zip(*rows))


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_forward_with_images_equals_hf(batch, bidirectional):
  hf = hf_vlm(bidirectional)
  cfg, params = jax_base(hf)
  assert max(len(p) for p in batch["prompts"]) > 3 * cfg.sliding_window and cfg.sliding_window < 16
  ref = _hf_logits(hf, batch)
  soft = _batch_soft(hf, batch)
  out = _jax_forward(cfg, params, batch, soft)
  valid = batch["mask"] > 0
  err = np.abs(np.asarray(out.logits) - ref)[valid].max()
  print(f"max |logit error| vs HF ({'bidirectional' if bidirectional else 'causal'}): {err:.2e}")
  assert err <= TOL and ref[valid].std() > 0.5
  # The image mask is load-bearing: the other masking differs at image positions, and the soft
  # tokens are too (the pad embedding in their place is far off).
  flipped = _jax_forward(cfg.replace(use_bidirectional_attention=None if bidirectional
                                     else "vision"), params, batch, soft)
  assert np.abs(np.asarray(flipped.logits) - ref)[valid].max() > 1e-2
  no_images = _jax_forward(cfg, params, batch, None)
  assert np.abs(np.asarray(no_images.logits) - ref)[valid].max() > 1e-2
  if bidirectional:
    # Scanned layers and query-chunked attention (chunks of 8 > window 6: without the lookahead
    # the chunks would skip the later keys of an image block).
    scanned = cfg.replace(scan_layers=True, attention_chunk_size=8)
    out = _jax_forward(scanned, transformer.stack_layer_params(cfg, params), batch, soft)
    assert np.abs(np.asarray(out.logits) - ref)[valid].max() <= TOL


def test_image_blocks_and_mask_follow_hf():
  """Block ids are runs of image tokens (segments split them); a query of a block sees its later
  keys under the window's lower bound only, exactly HF's `create_masks_for_vision_model`."""
  tok = np.array([[5, IMG, IMG, IMG, IMG, IMG, IMG, IMG, 6, IMG, IMG, 7]])
  seg = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
  got = np.asarray(attention.image_blocks(jnp.asarray(tok == IMG), jnp.asarray(seg)))
  np.testing.assert_array_equal(got, [[-1, 1, 1, 1, 4, 4, 4, 4, -1, 9, 9, -1]])
  from transformers.models.gemma4 import modeling_gemma4 as m
  text = hf_helpers.hf_text_config("e_style", sliding_window=3,
                                   use_bidirectional_attention="vision")
  t = tok.shape[1]
  hf_ids = m.get_block_sequence_ids_for_mask(torch.tensor((tok == IMG).astype(np.int64)), "cpu")
  masks = m.create_masks_for_vision_model(text, torch.zeros(1, t, 8), None, None,
                                          torch.arange(t)[None], hf_ids)
  pos = jnp.arange(t)[None]
  blocks = attention.image_blocks(jnp.asarray(tok == IMG))
  ours = attention.causal_mask(pos, pos, jnp.ones((1, t), bool), 3, None, None, blocks, blocks)
  hf_sliding = masks[S][0, 0].numpy()
  hf_sliding = hf_sliding if hf_sliding.dtype == bool else hf_sliding == 0
  np.testing.assert_array_equal(np.asarray(ours[0]), hf_sliding)
  assert hf_sliding[1, 7] and not hf_sliding[5, 1]  # forward inside a block; window behind only
  hf_full = masks[F]
  if hf_full is not None:  # full layers stay causal
    hf_full = hf_full[0, 0].numpy()
    hf_full = hf_full if hf_full.dtype == bool else hf_full == 0
    np.testing.assert_array_equal(hf_full, np.tril(np.ones((t, t), bool)))


def test_prefill_with_images_then_decode_equals_full_forward(batch):
  hf = hf_vlm(True)
  cfg, params = jax_base(hf)
  soft = _batch_soft(hf, batch)
  rng = np.random.default_rng(5)
  b, q = batch["ids"].shape
  extra = rng.integers(3, 240, (b, 4))
  full = dict(batch, ids=np.concatenate([batch["ids"], extra], 1),
              mask=np.concatenate([batch["mask"], np.ones_like(extra)], 1))
  full["positions"] = np.clip(np.cumsum(full["mask"], 1) - 1, 0, None)
  want = np.asarray(_jax_forward(cfg, params, full, soft).logits)
  # Prefill in two calls (the second holds both images of row 0), then decode 1 + 3 tokens.
  cache = kv_cache.init_cache(cfg, b, q + 8)
  split = 3
  parts = [(slice(0, split), None), (slice(split, q), soft), (slice(q, q + 1), None),
           (slice(q + 1, q + 4), None)]
  got = []
  for cols, image_soft in parts:
    out = jit_apply(cfg)(params, jnp.asarray(full["ids"][:, cols]),
                         jnp.asarray(full["positions"][:, cols]),
                         jnp.asarray(full["mask"][:, cols] > 0), cache, image_soft)
    cache = out.cache
    got.append(np.asarray(out.logits))
  got = np.concatenate(got, 1)
  valid = full["mask"] > 0
  np.testing.assert_allclose(got[valid], want[valid], atol=TOL)
  assert np.asarray(cache.block_BS).max() >= split  # image blocks are keyed by cache slot


# ------------------------------------------------------------------------------ decoding == HF
def _hf_pair(k):
  with hf_torch.hf_assistant_patch():
    target = hf_vlm(True)
    text = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=32,
                layer_types=[S, S, S, F], sliding_window=4, hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=0, num_kv_shared_layers=4)
    assistant = hf_torch.hf_assistant(dict(
        text_config=text, backbone_hidden_size=64, use_ordered_embeddings=False), seed=1)
  hf_helpers.randomize_(assistant, seed=5)
  assistant.generation_config.num_assistant_tokens = k
  target.generation_config.eos_token_id = None
  return target, assistant


def _hf_generate(target, prompt, pv, pos, **kw):
  ids = torch.tensor([prompt])
  with torch.no_grad():
    return target.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.tensor(pv),
        image_position_ids=torch.tensor(pos),
        mm_token_type_ids=torch.tensor([[int(t == IMG) for t in prompt]]), do_sample=False,
        pad_token_id=0, **kw)[0, len(prompt):].tolist()


def test_first_round_drafts_on_image_prompt_equal_hf(batch, monkeypatch):
  from transformers.generation import candidate_generator as cg
  k = 3
  target, assistant = _hf_pair(k)
  prompt = batch["prompts"][0]
  pv, pos = batch["pv"][:2], batch["pos"][:2]
  rec = {}
  original = cg.SinglePositionMultiTokenCandidateGenerator.get_candidates

  def recording(self, *args, **kwargs):
    ids, logits = original(self, *args, **kwargs)
    if logits is not None and "ids" not in rec:
      rec["ids"], rec["logits"] = ids.numpy(), logits.numpy()
    return ids, logits

  monkeypatch.setattr(cg.SinglePositionMultiTokenCandidateGenerator, "get_candidates", recording)
  _hf_generate(target, prompt, pv, pos, assistant_model=assistant, max_new_tokens=6)
  p = len(prompt)
  assert rec["ids"].shape == (1, p + 1 + k)

  cfg, dcfg, params, variables = hf_helpers.jax_pair_from_hf(target, assistant)
  soft = tuple(jnp.asarray(x[None]) for x in soft_slots(hf_soft(target, pv, pos)))
  out = jit_apply(cfg)(params["base"], jnp.asarray([prompt]), jnp.arange(p)[None],
                       jnp.ones((1, p), bool), None, soft)
  x_p = jnp.argmax(out.logits[:, -1], axis=-1)
  assert int(x_p[0]) == rec["ids"][0, p]
  variables = jax.tree.map(jnp.asarray, variables)
  d = drafter.draft(variables, dcfg, params["base"]["embedding"], out.store_kv, out.hidden[:, -1],
                    x_p, jnp.array([p - 1]), num_draft_steps=k)
  np.testing.assert_array_equal(np.asarray(d.tokens), rec["ids"][:, p + 1:])
  err = np.abs(np.asarray(d.logits) - rec["logits"]).max()
  print(f"max |draft logit error| vs HF on an image prompt: {err:.2e}")
  assert err <= TOL and rec["logits"].std() > 0.5


def test_plain_and_speculative_greedy_with_images_equal_hf(batch):
  k, n = 3, 10
  target, assistant = _hf_pair(k)
  cfg, dcfg, params, variables = hf_helpers.jax_pair_from_hf(target, assistant)
  feats = hf_soft(target, batch["pv"], batch["pos"])
  prompts = batch["prompts"]
  per_prompt_soft = [soft_slots([feats[j] for j in js], slots=len(js))
                     for js in batch["per_prompt"]]
  refs = []
  for prompt, js in zip(prompts, batch["per_prompt"]):
    pv, pos = batch["pv"][js], batch["pos"][js]
    plain = _hf_generate(target, prompt, pv, pos, max_new_tokens=n)
    fast = _hf_generate(target, prompt, pv, pos, max_new_tokens=n, assistant_model=assistant)
    assert fast == plain
    refs.append(plain)
  # Row 1 emits the video placeholder (253): HF embeds it as the pad token, so must we.
  assert 253 in refs[1]
  ours = spec.decode_prompts(params["base"], cfg, prompts, max_new_tokens=n,
                             image_soft=per_prompt_soft)
  assert ours.tokens == refs
  ours = spec.decode_prompts(params["base"], cfg, prompts, max_new_tokens=n,
                             image_soft=per_prompt_soft, drafter_vars=variables, drafter_cfg=dcfg,
                             num_draft_tokens=k)
  assert ours.tokens == refs
  # Without the images the continuation differs (the test sees them).
  text_only = spec.decode_prompts(params["base"], cfg, prompts, max_new_tokens=n)
  assert text_only.tokens != refs


def test_image_requests_are_checked(batch):
  hf = hf_vlm(True)
  cfg, params = jax_base(hf)
  soft = soft_slots(hf_soft(hf, batch["pv"][:1], batch["pos"][:1]), slots=1)
  prompt = batch["prompts"][0]  # 22 image tokens; one 16-token image given
  with pytest.raises(spec.GenerateError, match="prompt 0 has 22 image tokens .* 16 soft tokens"):
    spec.decode_prompts(params, cfg, [prompt], max_new_tokens=2, image_soft=[soft])
  text_params = {k: v for k, v in params.items() if k != "vision"}
  with pytest.raises(spec.GenerateError, match="no vision tower"):
    spec.decode_prompts(text_params, cfg.replace(vision=None), [prompt], max_new_tokens=2,
                        images=[(batch["pv"][:2], batch["pos"][:2])])
  with pytest.raises(spec.GenerateError, match="takes no images"):
    spec.decode_prompts(text_params, cfg.replace(vision=None, image_token_id=None), [prompt],
                        max_new_tokens=2,
                        image_soft=[soft])


def test_forward_through_the_tower_equals_hf(batch):
  """The same HF comparison as `test_forward_with_images_equals_hf`, the images going through
  `images=` (pixel slots -> the Flax tower + embedder) instead of HF's soft tokens."""
  from gemma_mtp_jax.decoding import inputs
  hf = hf_vlm(True)
  cfg, params = jax_base(hf)
  assert cfg.vision is not None and "vision" in params
  rows = [(batch["pv"][js], batch["pos"][js]) for js in batch["per_prompt"]]
  images = tuple(jnp.asarray(x) for x in inputs.stack_slots(rows, (0.0, -1), "images"))
  out = transformer.Transformer(cfg).apply(
      {"params": params}, jnp.asarray(batch["ids"]), jnp.asarray(batch["positions"]),
      jnp.asarray(batch["mask"] > 0), images=images)
  valid = batch["mask"] > 0
  assert np.abs(np.asarray(out.logits) - _hf_logits(hf, batch))[valid].max() <= TOL
