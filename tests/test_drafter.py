"""The Flax drafter equals HF's Gemma 4 assistant as HF's candidate generator drives it.

Acceptance: tiny random HF target + assistant, HF assisted generation; the candidate ids and assistant
logits of HF's first drafting round equal our `drafter.draft` on the converted weights (ids exactly,
logits <= 1e-4), with and without ordered (centroid) embeddings.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemma_mtp_jax import hf_torch
from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import drafter
from gemma_mtp_jax.training import step as step_lib
from gemma_mtp_jax.model import kv_cache
from gemma_mtp_jax.model import transformer
from gemma_mtp_jax.checkpoint import hf_base as convert_base
from gemma_mtp_jax.checkpoint import hf_assistant as convert_drafter
from gemma_mtp_jax.checkpoint import hf_names as names
from tests import hf_helpers

jax.config.update("jax_default_matmul_precision", "highest")

S, F = config_lib.SLIDING, config_lib.FULL
TOL_HF = 1e-4


# ------------------------------------------------------------------------------ shared helpers
def tiny_configs(ordered: bool = True, window: int = 3, small: bool = False, **base_over):
  """A small E2B-style pair: base with PLE, KV sharing, double-wide MLP, sliding/global mix; the
  drafter [s, s, s, f] reading the base's store layers (0 and 1: layers 3, 4 are KV-shared).
  `small`: 3 base layers (the last KV-shared) and a 2-layer [s, f] drafter, for gradient tests whose
  compile time grows with depth."""
  base_types = (S, F, S) if small else (S, F, S, S, F)
  base = config_lib.ModelConfig(
      vocab_size=64, embed_dim=32, num_layers=len(base_types), num_heads=2, num_kv_heads=1,
      head_dim=8, global_head_dim=16, hidden_dim=48, layer_types=base_types, sliding_window=window,
      ple_dim=4, ple_vocab_size=64, num_kv_shared_layers=1 if small else 2,
      use_double_wide_mlp=True)
  base = base.replace(**base_over)
  draft_types = (S, F) if small else (S, S, S, F)
  text = config_lib.ModelConfig(
      vocab_size=64, embed_dim=16, num_layers=len(draft_types), num_heads=2, num_kv_heads=1,
      head_dim=8, global_head_dim=16, hidden_dim=32, layer_types=draft_types, sliding_window=window,
      final_logit_softcap=None)
  dcfg = config_lib.DrafterConfig(text=text, backbone_hidden_size=32, use_ordered_embeddings=ordered,
                                  num_centroids=8, centroid_intermediate_top_k=2)
  dcfg.check_fits(base)
  return base, dcfg


def tiny_unified_configs(ordered: bool = True, window: int = 3):
  """A small 12B-style ("gemma4_unified") pair: a base without PLE, MoE or KV sharing, its global
  layers k_eq_v with one KV head; the drafter [s, s, s, f] reads its last sliding (3) and last
  full (4) layer."""
  family = dict(hf_family=hf_config.UNIFIED, **hf_config.family_fields(hf_config.UNIFIED))
  base = config_lib.ModelConfig(
      vocab_size=64, embed_dim=32, num_layers=5, num_heads=2, num_kv_heads=2, num_global_kv_heads=1,
      attention_k_eq_v=True, head_dim=8, global_head_dim=16, hidden_dim=48,
      layer_types=(S, F, S, S, F), sliding_window=window, **family)
  text = config_lib.ModelConfig(
      vocab_size=64, embed_dim=16, num_layers=4, num_heads=2, num_kv_heads=2, num_global_kv_heads=1,
      attention_k_eq_v=True, head_dim=8, global_head_dim=16, hidden_dim=32,
      layer_types=(S, S, S, F), sliding_window=window, final_logit_softcap=None, **family)
  dcfg = config_lib.DrafterConfig(text=text, backbone_hidden_size=32, use_ordered_embeddings=ordered,
                                  num_centroids=8, centroid_intermediate_top_k=2)
  dcfg.check_fits(base)
  assert base.store_layers == {S: 3, F: 4}
  return base, dcfg


# The families the joint-training tests run over: E2B-style (PLE, KV sharing) and 12B-style.
FAMILY_CONFIGS = {"gemma4": tiny_configs, "gemma4_unified": tiny_unified_configs}


def random_params(base, dcfg, seed: int = 0, amp: float = 1.2):
  """Joint params with non-trivial values everywhere (norm scales 1 +- 0.2, fan-in scaled matrices)
  and a random token ordering, so a wrong layout, scale or mask shows in the outputs."""
  # Shapes only (compiling the random initialisers costs more than the tests), filled by numpy.
  params, _ = jax.eval_shape(lambda r: step_lib.init_params(base, dcfg, r), jax.random.PRNGKey(seed))
  flat, tree = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)

  def rand(path, x):
    if x.ndim == 1:
      return 1.0 + 0.2 * rng.standard_normal(x.shape, np.float32)
    fan = x.shape[-1] if "embedding" in jax.tree_util.keystr(path) else int(np.prod(x.shape[:-1]))
    return amp * rng.standard_normal(x.shape, np.float32) / np.float32(np.sqrt(fan))

  params = jax.tree.unflatten(tree, [jnp.asarray(rand(p, x)) for p, x in flat])
  buffers = None
  if dcfg.use_ordered_embeddings:
    buffers = {"token_ordering": jnp.asarray(rng.permutation(dcfg.text.vocab_size), jnp.int32)}
  return params, buffers


@functools.lru_cache(maxsize=None)
def jit_base(cfg):
  """The base forward, jitted once per config (tests share the compile)."""
  return jax.jit(lambda p, tok, pos, valid=None: transformer.Transformer(cfg).apply(
      {"params": p}, tok, pos, valid))


jit_draft = jax.jit(drafter.draft, static_argnames=(
    "cfg", "num_draft_steps", "sample_fn", "query_position", "dense_head", "logit_softcap"))


# ------------------------------------------------------------------------------ HF parity
def _hf_pair(ordered: bool, k: int, family: str = hf_config.GEMMA4):
  """A random HF base + assistant of `family`: gemma4's E2B-style base (KV sharing: HF returns
  shared KV states) or the 12B-style one (no KV sharing: built with the store layers of
  `hf_torch.hf_assistant_patch`); the assistant drafts `k` tokens per round."""
  if family == hf_config.UNIFIED:
    with hf_torch.hf_assistant_patch():
      target = hf_helpers.hf_causal_lm("unified", seed=0)
    assistant = hf_helpers.hf_unified_assistant(ordered=ordered)
  else:
    target, assistant = _hf_e_style_pair(ordered)
  target.generation_config.eos_token_id = None  # draft even if the base emits <eos>
  assistant.generation_config.num_assistant_tokens = k
  return target, assistant


def _hf_e_style_pair(ordered: bool):
  target = hf_helpers.hf_causal_lm("e_style", seed=0)
  text = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=32,
              layer_types=[S, S, S, F], sliding_window=4, hidden_size_per_layer_input=0,
              vocab_size_per_layer_input=0, num_kv_shared_layers=4)
  assistant = hf_torch.hf_assistant(dict(
      text_config=text, backbone_hidden_size=64, use_ordered_embeddings=ordered, num_centroids=16,
      centroid_intermediate_top_k=4), seed=1)
  hf_helpers.randomize_(assistant, seed=5)
  if ordered:
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    assistant.masked_embedding.token_ordering.copy_(perm)
  return target, assistant


def _first_round(target, assistant, prompt, monkeypatch):
  """HF assisted generation; returns (candidate ids, candidate logits) of the first drafting round."""
  from transformers.generation import candidate_generator as cg
  rec = {}
  original = cg.SinglePositionMultiTokenCandidateGenerator.get_candidates

  def recording(self, *args, **kwargs):
    ids, logits = original(self, *args, **kwargs)
    if logits is not None and "ids" not in rec:
      rec["ids"], rec["logits"] = ids.clone(), logits.clone()
    return ids, logits

  monkeypatch.setattr(cg.SinglePositionMultiTokenCandidateGenerator, "get_candidates", recording)
  with torch.no_grad():
    target.generate(prompt, assistant_model=assistant, max_new_tokens=8, do_sample=False)
  return rec["ids"].numpy(), rec["logits"].numpy()


@pytest.mark.parametrize("family", [hf_config.GEMMA4, hf_config.UNIFIED])
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "plain"])
def test_first_round_drafts_equal_hf(ordered, family, monkeypatch):
  k, p = 4, 12  # prompt longer than the drafter window + 1, so the sliding bound matters
  target, assistant = _hf_pair(ordered, k, family)
  prompt = torch.tensor(np.random.default_rng(0).integers(3, 256, (1, p)))
  hf_ids, hf_logits = _first_round(target, assistant, prompt, monkeypatch)
  assert hf_ids.shape == (1, p + 1 + k) and hf_logits.shape == (1, k, 256)

  base = hf_config.model_config_from_hf(target.config.to_dict())
  base_params = convert_base.state_dict_to_params(base, hf_helpers.numpy_state(target))
  with hf_torch.hf_assistant_patch():
    dcfg = hf_config.drafter_config_from_hf(assistant.config.to_dict())
  dcfg.check_fits(base)
  assert base.hf_family == dcfg.text.hf_family == family
  assert dcfg.use_ordered_embeddings == ordered and dcfg.text.final_logit_softcap is None
  variables = convert_drafter.state_dict_to_variables(dcfg, hf_helpers.numpy_state(assistant))
  variables = jax.tree.map(jnp.asarray, variables)

  tokens = jnp.asarray(prompt.numpy())
  out = jit_base(base)(base_params, tokens, jnp.arange(p)[None])
  x_p = jnp.argmax(out.logits[:, -1], axis=-1)
  assert int(x_p[0]) == hf_ids[0, p]  # the base's own token, which the first draft step consumes
  d = jit_draft(variables, dcfg, base_params["embedding"], out.store_kv, out.hidden[:, -1], x_p,
                jnp.array([p - 1]), num_draft_steps=k)
  np.testing.assert_array_equal(np.asarray(d.tokens), hf_ids[:, p + 1:])
  err = np.abs(np.asarray(d.logits) - hf_logits).max()
  print(f"max |logit error| vs HF ({'ordered' if ordered else 'plain'}): {err:.2e}")
  assert err <= TOL_HF
  assert hf_logits.std() > 0.5  # not trivially equal

  # The query position is load-bearing (the window bound is pinned by the mask test below).
  if not ordered or family != hf_config.GEMMA4:
    return
  anchor = jit_draft(variables, dcfg, base_params["embedding"], out.store_kv, out.hidden[:, -1], x_p,
                     jnp.array([p - 1]), num_draft_steps=k, query_position="anchor")
  assert np.abs(np.asarray(anchor.logits) - hf_logits).max() > 1e-2


@pytest.mark.parametrize("pad", [0, 3])
def test_sliding_window_bound_matches_hf_mask(pad):
  """HF's flipped bidirectional sliding mask keeps slots S-1-W .. S-1 (W + 1 positions); ours,
  computed from slot positions, keeps the same slots (with left padding too)."""
  import transformers
  s, w = 11, 4
  with hf_torch.hf_assistant_patch():
    hf_cfg = transformers.Gemma4AssistantConfig(
        text_config=dict(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                         layer_types=[S, F], sliding_window=w, hidden_size_per_layer_input=0,
                         vocab_size_per_layer_input=0, num_kv_shared_layers=2),
        backbone_hidden_size=32)
    hf_cfg._attn_implementation = "eager"
    hf_cfg.text_config._attn_implementation = "eager"
    model = transformers.Gemma4AssistantForCausalLM(hf_cfg)
  attn = torch.ones(1, s + 1, dtype=torch.long)  # generate's mask includes the new token
  attn[:, :pad] = 0
  kv = torch.zeros(1, 1, s, 8)
  masks = model.create_attention_masks(torch.zeros(1, 1, 16), attn, {S: (kv, kv), F: (kv, kv)})
  hf_sliding = masks[S][0, 0, 0].numpy() == 0  # additive float mask: 0 = attend

  base_pos = np.clip(np.arange(s) - pad, 0, None)
  store = {lt: transformer.StoreKV(None, None, jnp.asarray(base_pos)[None],
                                   jnp.asarray(np.arange(s) >= pad)[None]) for lt in (S, F)}
  dcfg = config_lib.DrafterConfig(
      text=config_lib.ModelConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=1,
                                  num_kv_heads=1, head_dim=8, hidden_dim=8, layer_types=(S, F),
                                  sliding_window=w), backbone_hidden_size=32)
  ours = drafter.kv_masks(dcfg, store, jnp.asarray([[s - 1 - pad]]))
  np.testing.assert_array_equal(np.asarray(ours[S][0, 0]), hf_sliding)
  assert hf_sliding.sum() == min(w + 1, s - pad)
  if masks[F] is not None:
    np.testing.assert_array_equal(np.asarray(ours[F][0, 0]), masks[F][0, 0, 0].numpy() == 0)


# ------------------------------------------------------------------------------ conversion
def test_convert_round_trip_is_bit_exact():
  _, assistant = _hf_pair(True, 2)
  state = hf_helpers.numpy_state(assistant)
  assert state[convert_drafter.TOKEN_ORDERING].dtype == np.int64
  with hf_torch.hf_assistant_patch():
    dcfg = hf_config.drafter_config_from_hf(assistant.config.to_dict())
  variables = convert_drafter.state_dict_to_variables(dcfg, state)
  assert variables["buffers"]["token_ordering"].dtype == np.int32
  back = convert_drafter.variables_to_hf(dcfg, variables)
  expected = {k: v for k, v in state.items() if k != convert_drafter.LM_HEAD}
  assert set(back) == set(expected)
  for k, v in expected.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    assert np.array_equal(back[k], v), k
  # The Flax tree has exactly the leaves the module declares.
  shapes = jax.eval_shape(lambda r: nn.unbox(drafter.init_variables(dcfg, r)), jax.random.PRNGKey(0))
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, variables)


def test_bad_assistant_checkpoints_name_the_tensor():
  _, assistant = _hf_pair(True, 2)
  state = hf_helpers.numpy_state(assistant)
  with hf_torch.hf_assistant_patch():
    dcfg = hf_config.drafter_config_from_hf(assistant.config.to_dict())
  bad = dict(state)
  del bad[convert_drafter.TOKEN_ORDERING]
  with pytest.raises(names.ConversionError, match="token_ordering"):
    convert_drafter.state_dict_to_variables(dcfg, bad)
  bad = dict(state)
  bad["lm_head.weight"] = bad["lm_head.weight"] + 1
  with pytest.raises(names.ConversionError, match="lm_head"):
    convert_drafter.state_dict_to_variables(dcfg, bad)
  bad = dict(state)
  bad["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 32), np.float32)
  with pytest.raises(names.ConversionError, match="k_proj"):
    convert_drafter.state_dict_to_variables(dcfg, bad)
  bad = dict(state)
  bad[convert_drafter.TOKEN_ORDERING] = np.full(256, 300, np.int64)
  with pytest.raises(names.ConversionError, match="outside"):
    convert_drafter.state_dict_to_variables(dcfg, bad)


# ------------------------------------------------------------------------------ draft API
def test_draft_from_cache_with_stale_slots_equals_no_cache():
  """Rows at different lengths, a cache holding rejected draft K/V past each row's length: the
  drafts equal those from a no-cache forward over exactly each row's verified prefix."""
  base, dcfg = tiny_configs(ordered=True)
  params, buffers = random_params(base, dcfg, seed=3)
  variables = {"params": params["drafter"], "buffers": buffers}
  model = transformer.Transformer(base)
  rng = np.random.default_rng(0)
  b, chunk, slots, k = 2, 4, 12, 3
  tokens = rng.integers(3, base.vocab_size, (b, slots))
  pos = jnp.broadcast_to(jnp.arange(slots), (b, slots))
  verify = jax.jit(lambda c, tok, p: model.apply({"params": params["base"]}, tok, p, cache=c))
  cache = kv_cache.init_cache(base, b, max_length=slots)
  cache = verify(cache, jnp.asarray(tokens[:, :chunk]), pos[:, :chunk]).cache
  # Verify 4 candidates; row 0 accepts 1 (its later slots then hold rejected K/V), row 1 all 4.
  out = verify(cache, jnp.asarray(tokens[:, chunk:2 * chunk]), pos[:, chunk:2 * chunk])
  accepted = np.array([1, 4])
  last = jnp.asarray(chunk - 1 + accepted)
  rows = jnp.arange(b)
  h = out.hidden[rows, jnp.asarray(accepted - 1)]
  nxt = jnp.argmax(out.logits[rows, jnp.asarray(accepted - 1)], axis=-1)
  got = jit_draft(variables, dcfg, params["base"]["embedding"], out.store_kv, h, nxt, last,
                  num_draft_steps=k)

  # Reference: no cache, each row's verified prefix only (later slots are padding, never attended;
  # the same slot count keeps one compile of the draft).
  valid = jnp.arange(slots)[None, :] <= last[:, None]
  ref = jit_base(base)(params["base"], jnp.asarray(tokens), pos, valid)
  want = jit_draft(variables, dcfg, params["base"]["embedding"], ref.store_kv, ref.hidden[rows, last],
                   nxt, last, num_draft_steps=k)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  # Cache and no-cache base K/V differ by float32 rounding (~1e-6), which the drafter amplifies.
  np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=1e-4)
  assert np.asarray(got.logits).std() > 0.5


def test_draft_compiles_once_and_samples_through_sample_fn():
  base, dcfg = tiny_configs(ordered=False, small=True)
  params, _ = random_params(base, dcfg, seed=4)
  variables = {"params": params["drafter"]}
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, base.vocab_size, (1, 12)))
  out = jit_base(base)(params["base"], tokens, jnp.arange(12)[None])
  traces = []

  def counted(v, store, h, tok, last):
    traces.append(1)
    return drafter.draft(v, dcfg, params["base"]["embedding"], store, h, tok, last, 3)

  f = jax.jit(counted)
  for p in (3, 7, 10, 5):
    greedy = f(variables, out.store_kv, out.hidden[:, p], tokens[:, p + 1], jnp.asarray([p]))
    assert greedy.tokens.shape == (1, 3) and greedy.logits.shape == (1, 3, base.vocab_size)
  assert len(traces) == 1
  # A sampler gets each step's logits and a fresh key; its tokens are what the next step consumes
  # (near-zero temperature: the greedy drafts again).
  sampled = jit_draft(variables, dcfg, params["base"]["embedding"], out.store_kv,
                      out.hidden[:, 5], tokens[:, 6], jnp.asarray([5]), num_draft_steps=3,
                      sample_fn=lambda l, key: jax.random.categorical(key, l / 1e-4),
                      rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(sampled.tokens), np.asarray(greedy.tokens))


def test_masked_head_is_hf_centroid_head():
  """Selected tokens (top-k centroids' lists) get the dense tied-head logit, all others
  min(selected) - 1; the argmax is among the selected."""
  base, dcfg = tiny_configs(ordered=True)
  params, buffers = random_params(base, dcfg, seed=5)
  variables = {"params": params["drafter"], "buffers": buffers}
  hidden = jax.random.normal(jax.random.PRNGKey(0), (2, 3, dcfg.text.embed_dim))
  m = drafter.Drafter(dcfg)
  masked = np.asarray(m.apply(variables, hidden, method=drafter.Drafter.masked_logits))
  dense = np.asarray(m.apply(variables, hidden, method=drafter.Drafter.dense_logits))
  cent = np.asarray(m.apply(variables, hidden, method=drafter.Drafter.centroid_logits))
  per = dcfg.text.vocab_size // dcfg.num_centroids
  ordering = np.asarray(buffers["token_ordering"]).reshape(dcfg.num_centroids, per)
  for b in range(2):
    for t in range(3):
      top = np.argsort(-cent[b, t])[:dcfg.centroid_intermediate_top_k]
      sel = ordering[top].reshape(-1)
      np.testing.assert_allclose(masked[b, t, sel], dense[b, t, sel], atol=1e-5)
      rest = np.setdiff1d(np.arange(dcfg.text.vocab_size), sel)
      np.testing.assert_allclose(masked[b, t, rest], dense[b, t, sel].min() - 1.0, atol=1e-5)
