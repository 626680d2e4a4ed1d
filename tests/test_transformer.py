"""Equivalences of the base model: cache == no cache, scan == loop, remat == no remat, routed MoE ==
dense MoE (and decoding through the routed MoE)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mtp_jax.decoding import speculative
from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import drafter
from gemma_mtp_jax.model import kv_cache
from gemma_mtp_jax.model import moe
from gemma_mtp_jax.model import transformer
from tests import hf_helpers
from tests import test_drafter

jax.config.update("jax_default_matmul_precision", "highest")


def _cfg(variant="e_style", **over):
  cfg = hf_config.model_config_from_hf(hf_helpers.hf_text_config(variant).to_dict())
  return cfg.replace(**over)


def _params(cfg, seed=0):
  params = nn.unbox(transformer.init_params(cfg, jax.random.PRNGKey(seed)))
  # Non-unit norm scales so a skipped norm shows.
  return jax.tree.map(lambda x: x * (1.0 + 0.1 * jnp.cos(jnp.arange(x.size).reshape(x.shape)))
                      if x.ndim == 1 else x, params)


@pytest.mark.parametrize("variant", sorted(hf_helpers.VARIANTS))
def test_prefill_then_decode_equals_full_forward(variant):
  cfg = _cfg(variant)
  params = _params(cfg)
  model = transformer.Transformer(cfg)
  rng = np.random.default_rng(0)
  b, t, prompt = 2, 15, 5
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, t)))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  full = model.apply({"params": params}, tokens, pos)

  cache = kv_cache.init_cache(cfg, b, max_length=t + 3)
  step = jax.jit(lambda c, tok, p: model.apply({"params": params}, tok, p, cache=c))
  out = step(cache, tokens[:, :prompt], pos[:, :prompt])
  got = [out.logits]
  cache = out.cache
  # Decode one token at a time, then a 3-token chunk (what speculative verification does).
  for i in range(prompt, t - 3):
    out = step(cache, tokens[:, i:i + 1], pos[:, i:i + 1])
    got.append(out.logits)
    cache = out.cache
  out = step(cache, tokens[:, t - 3:], pos[:, t - 3:])
  got.append(out.logits)
  got = jnp.concatenate(got, axis=1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(full.logits), atol=2e-5)
  assert int(out.cache.length_B[0]) == t
  # Store-layer K/V read from the cache equal the no-cache ones on the filled slots.
  for lt, skv in out.store_kv.items():
    np.testing.assert_allclose(np.asarray(skv.k)[:, :t], np.asarray(full.store_kv[lt].k),
                               atol=2e-5)


def test_cache_rollback_forgets_rejected_tokens():
  cfg = _cfg()
  params = _params(cfg)
  model = transformer.Transformer(cfg)
  rng = np.random.default_rng(1)
  b, t = 2, 12
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, t)))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  apply = jax.jit(lambda c, tok, p: model.apply({"params": params}, tok, p, cache=c))
  cache = kv_cache.init_cache(cfg, b, t + 4)
  cache = apply(cache, tokens[:, :8], pos[:, :8]).cache
  # Write 4 garbage "draft" tokens, then roll row 0 back by 4 and row 1 by 2 slots.
  junk = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, 4)))
  cache = apply(cache, junk, pos[:, 8:12]).cache
  cache = cache.rollback(jnp.asarray([8, 10]))
  # Row 1 keeps 2 junk tokens at positions 8, 9: its next token sits at position 10.
  out0 = apply(cache, tokens[:, 8:9], jnp.asarray([[8], [10]]))
  ref0 = model.apply({"params": params}, tokens[:, :9], pos[:, :9]).logits[0, 8]
  np.testing.assert_allclose(np.asarray(out0.logits[0, 0]), np.asarray(ref0), atol=2e-5)
  seq1 = jnp.concatenate([tokens[1, :8], junk[1, :2], tokens[1, 8:9]])[None]
  ref1 = model.apply({"params": params}, seq1, jnp.arange(11)[None]).logits[0, 10]
  np.testing.assert_allclose(np.asarray(out0.logits[1, 0]), np.asarray(ref1), atol=2e-5)


def test_packed_segments_do_not_attend_across_documents():
  cfg = _cfg()
  params = _params(cfg)
  model = transformer.Transformer(cfg)
  rng = np.random.default_rng(2)
  a = rng.integers(3, cfg.vocab_size, 7)
  c = rng.integers(3, cfg.vocab_size, 6)
  packed = jnp.asarray(np.concatenate([a, c]))[None]
  seg = jnp.asarray([1] * 7 + [2] * 6)[None]
  pos = jnp.asarray(list(range(7)) + list(range(6)))[None]
  out = model.apply({"params": params}, packed, pos, segment_ids_BT=seg).logits
  ref_c = model.apply({"params": params}, jnp.asarray(c)[None], jnp.arange(6)[None]).logits
  np.testing.assert_allclose(np.asarray(out[0, 7:]), np.asarray(ref_c[0]), atol=2e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_equals_no_remat(policy):
  cfg = _cfg()
  params = _params(cfg)
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 10)))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))

  def loss(p, c):
    return jnp.mean(transformer.Transformer(c).apply({"params": p}, tokens, pos).logits ** 2)

  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  v0, g0 = grad_fn(params, cfg)
  v1, g1 = grad_fn(params, cfg.replace(remat_policy=policy))
  np.testing.assert_allclose(v0, v1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g0, g1)
  assert any(float(jnp.abs(g).max()) > 1e-3 for g in jax.tree.leaves(g0))
  # KV-shared layers still receive gradient through their store layer's K under remat.
  store = cfg.store_layers[config_lib.SLIDING]
  assert float(jnp.abs(g1[f"layer_{store}"]["attn"]["k"]).max()) > 0


@pytest.mark.parametrize("variant", ["e_style", "k_eq_v"])
def test_scan_layers_equals_loop(variant):
  cfg = _cfg(variant)
  scfg = cfg.replace(scan_layers=True)
  assert any(r > 1 for _, _, r in transformer.scan_plan(scfg))
  params = _params(cfg)
  stacked = transformer.stack_layer_params(cfg, params)
  # The scanned model's own init has exactly the stacked layout.
  init_shapes = jax.tree.map(lambda x: x.shape, nn.unbox(transformer.param_shapes(scfg)))
  assert jax.tree.map(lambda x: x.shape, stacked) == init_shapes
  jax.tree.map(np.testing.assert_array_equal,
               transformer.unstack_layer_params(cfg, stacked), params)
  rng = np.random.default_rng(4)
  b, t = 2, 11
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, t)))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  ref = transformer.Transformer(cfg).apply({"params": params}, tokens, pos)
  out = transformer.Transformer(scfg).apply({"params": stacked}, tokens, pos)
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=2e-5)
  # And with a KV cache (prefill + one decode step).
  cache = kv_cache.init_cache(scfg, b, t + 1)
  o1 = transformer.Transformer(scfg).apply({"params": stacked}, tokens[:, :-1], pos[:, :-1],
                                           cache=cache)
  o2 = transformer.Transformer(scfg).apply({"params": stacked}, tokens[:, -1:], pos[:, -1:],
                                           cache=o1.cache)
  np.testing.assert_allclose(np.asarray(o2.logits[:, 0]), np.asarray(ref.logits[:, -1]),
                             atol=2e-5)


def test_scan_plan_covers_released_patterns():
  e4b_like = config_lib.ModelConfig(
      vocab_size=8, embed_dim=8, num_layers=42, num_heads=2, num_kv_heads=1, head_dim=4,
      hidden_dim=8, layer_types=config_lib.layer_types_from_pattern(42, 6),
      num_kv_shared_layers=18)
  plan = transformer.scan_plan(e4b_like)
  assert sum(p * r for _, p, r in plan) == 42
  assert plan == ((0, 6, 4), (24, 6, 3))


def test_chunked_attention_equals_full_attention():
  """attention_chunk_size: query blocks (and window-sliced keys on sliding layers, T > C + W here)
  give the same logits and gradients as whole [T, S] attention, on packed rows with a padded tail,
  and in a cache prefill (S > T: blocks read every key). The 26B-style variant: k = v global
  layers with their own KV head count; KV-shared layers are covered by tests/test_joint.py's
  chunked test, whose base shares KV and whose drafter reads it."""
  cfg = _cfg("moe")
  params = _params(cfg)
  rng = np.random.default_rng(5)
  t = 29  # not a multiple of the chunk: the last block is padded
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, t)))
  seg = jnp.asarray([[1] * 17 + [2] * 9 + [0] * 3, [1] * t])
  pos = jnp.asarray([list(range(17)) + list(range(9)) + [0] * 3, list(range(t))])
  valid = seg > 0

  def loss(p, c):
    out = transformer.Transformer(c).apply({"params": p}, tokens, pos, valid, seg)
    return jnp.mean(jnp.where(valid[..., None], out.logits, 0.0) ** 2), out.logits

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (v0, l0), g0 = grad_fn(params, cfg)
  (v1, l1), g1 = grad_fn(params, cfg.replace(attention_chunk_size=4))
  assert cfg.sliding_window + 4 < t  # the key-slicing path is the one under test
  np.testing.assert_allclose(np.asarray(l1)[np.asarray(valid)], np.asarray(l0)[np.asarray(valid)],
                             atol=2e-5)
  np.testing.assert_allclose(v0, v1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g0, g1)
  assert any(float(jnp.abs(g).max()) > 1e-3 for g in jax.tree.leaves(g0))

  # Prefill into a longer cache: chunked rows, full keys.
  def prefill(c):
    cache = kv_cache.init_cache(c, 1, 40, jnp.float32)
    return transformer.Transformer(c).apply({"params": params}, tokens[1:], pos[1:],
                                            cache=cache).logits
  np.testing.assert_allclose(prefill(cfg.replace(attention_chunk_size=4)), prefill(cfg),
                             atol=2e-5)


# ---------------------------------------------------------------------------- MoE: routed == dense
def _moe_params(cfg, load):
  """The 26B-style tiny model's params; "skewed": every MoE router sends each token to expert 3
  and none to experts 5, 6, 7 (a large embedding component on dim 5 that those router columns
  weigh with +-10), so the routed path sees empty experts and one in every token's top-k."""
  params = _params(cfg)
  if load == "skewed":
    params["embedding"] = params["embedding"].at[:, 5].add(4.0)
    for i in range(cfg.num_layers):
      m = params[f"layer_{i}"]["moe"]
      m["router_proj"] = m["router_proj"].at[5, 3].add(10.0).at[5, 5:].add(-10.0)
  return params


def _router_loads(cfg, params, tokens, pos):
  """tokens_E of every MoE layer (router statistics sown by the blocks)."""
  _, state = transformer.Transformer(cfg).apply({"params": params}, tokens, pos,
                                                mutable=[moe.STATS_COLLECTION])
  inter = state[moe.STATS_COLLECTION]
  return [np.asarray(inter[f"layer_{i}"]["moe"]["router"][0]["tokens_E"])
          for i in range(cfg.num_layers)]


def _scaled_diff(a, b):
  """max |a - b| relative to the reference's own scale (max |b|, at least 1): float32 rounding of
  sums in a different order is ~1e-7 of the summands, so O(10) gradients differ by ~1e-6 raw."""
  return float(jnp.abs(a - b).max() / jnp.maximum(jnp.abs(b).max(), 1.0))


@pytest.mark.parametrize("load,scan,remat", [("random", False, "none"), ("skewed", False, "none"),
                                             ("skewed", True, "full")])
def test_routed_moe_equals_dense_moe(load, scan, remat):
  """The whole base with `moe_impl="routed"` (the default) == `"dense"`: logits and gradients of
  every parameter, float32, <= 1e-5 (of each array's scale), on packed rows with a padded tail;
  uneven expert loads; scan_layers with full remat (the 26B-A4B preset's setting)."""
  cfg = _cfg("moe", scan_layers=scan, remat_policy=remat)
  assert cfg.enable_moe and cfg.moe_impl == "routed"
  loop_cfg = cfg.replace(scan_layers=False, remat_policy="none")
  params = _moe_params(loop_cfg, load)  # loop layout; stacked below for scan_layers
  rng = np.random.default_rng(6)
  t = 13
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, t)))
  seg = jnp.asarray([[1] * 6 + [2] * 5 + [0] * 2, [1] * t])
  pos = jnp.asarray([list(range(6)) + list(range(5)) + [0] * 2, list(range(t))])
  valid = seg > 0
  loads = np.stack(_router_loads(loop_cfg, params, tokens, pos))
  if load == "skewed":  # every layer: experts 5-7 empty, expert 3 in every token's top-k
    assert (loads[:, 5:] == 0).all() and (loads[:, 3] == 2 * t).all(), loads
  c_BTV = jnp.asarray(rng.normal(size=(2, t, cfg.vocab_size)), jnp.float32)
  if scan:
    params = transformer.stack_layer_params(cfg, params)

  def loss(p, c):
    logits = transformer.Transformer(c).apply({"params": p}, tokens, pos, valid, seg).logits
    return jnp.sum(jnp.where(valid[..., None], logits * c_BTV, 0.0)) / jnp.sum(valid), logits

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (v0, l0), g0 = grad_fn(params, cfg.replace(moe_impl="dense"))
  (v1, l1), g1 = grad_fn(params, cfg)
  assert float(jnp.abs(l0).max()) > 1.0  # logits of O(1) and more: the tolerance means something
  assert _scaled_diff(l1, l0) <= 1e-5
  assert _scaled_diff(v1, v0) <= 1e-5
  last = f"layer_{cfg.num_layers - 1}"
  # The final RMSNorm is invariant to scaling its input, so the last layer's layer_scalar has an
  # exact gradient of 0 (up to eps): both values are rounding noise of O(100) summands.
  noise = [g1[last].pop("layer_scalar"), g0[last].pop("layer_scalar")]
  assert max(float(jnp.abs(g).max()) for g in noise) <= 1e-3, noise
  diffs = jax.tree.map(_scaled_diff, g1, g0)
  assert max(jax.tree.leaves(diffs)) <= 1e-5, diffs
  moe_g = g0[last]["moe"]  # the global layer: unscanned in both layouts
  assert all(float(jnp.abs(g).max()) > 1e-3 for g in jax.tree.leaves(moe_g))  # every MoE param


def test_moe_decode_runs_routed_and_matches_dense():
  """Plain and speculative decoding of a tiny MoE base go through the routed block (the default):
  greedy tokens equal the dense reference's, and speculative greedy equals plain greedy."""
  base, dcfg = test_drafter.tiny_configs(ordered=False, small=True, enable_moe=True, num_experts=8,
                                         top_k_experts=2, moe_hidden_dim=16)
  assert base.moe_impl == "routed"
  params = nn.unbox(transformer.init_params(base, jax.random.PRNGKey(0)))
  dvars = nn.unbox(drafter.init_variables(dcfg, jax.random.PRNGKey(1)))
  prompts = [[5, 9, 11, 3, 7], [4, 8, 15, 16, 23, 42 % base.vocab_size, 12]]
  plain = speculative.decode_prompts(params, base, prompts, max_new_tokens=6)
  dense = speculative.decode_prompts(params, base.replace(moe_impl="dense"), prompts,
                                     max_new_tokens=6)
  spec = speculative.decode_prompts(params, base, prompts, drafter_vars=dvars, drafter_cfg=dcfg,
                                    num_draft_tokens=2, max_new_tokens=6)
  assert all(len(t) == 6 for t in plain.tokens)
  assert plain.tokens == dense.tokens == spec.tokens
