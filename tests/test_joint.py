"""The joint training forward trains exactly the task the draft API performs at inference.

Alignment proof: for random weights and a random sequence, the training forward's step-k logits at
anchor row t equal `drafter.draft` run from the prefix x_0..x_{t+1} (base K/V of x_0..x_t only, the
slots after t filled with garbage tokens) with teacher-forced tokens, for every t and k, under both
query-position conventions, for each model family (E2B-style and 12B-style pairs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.training import objective as joint
from gemma_mtp_jax.training import objectives
from gemma_mtp_jax.training.config import TrainConfig
from tests.test_drafter import FAMILY_CONFIGS, jit_base, jit_draft, random_params, tiny_configs

jax.config.update("jax_default_matmul_precision", "highest")

TOL_ALIGN = 1e-5


@pytest.fixture
def fast_compile():
  """XLA without most optimisations: gradient checks, not speed; compiles about 2x faster."""
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


def _forward(params, buffers, batch, base, dcfg, jcfg):
  return jax.jit(lambda p, b: joint.joint_forward(p, buffers, b, base, dcfg, jcfg))(params, batch)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("query_position", ["next", "anchor"])
def test_training_forward_equals_draft_api(query_position, family):
  base, dcfg = FAMILY_CONFIGS[family](ordered=True, window=3)
  params, buffers = random_params(base, dcfg, seed=0)
  b, t_len, k_steps = 2, 10, 3
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, base.vocab_size, (b, t_len))
  jcfg = TrainConfig(num_draft_steps=k_steps, draft_query_position=query_position)
  train_ABTV = np.asarray(_forward(params, buffers, {"tokens": jnp.asarray(tokens)}, base, dcfg,
                                   jcfg).steps)
  assert train_ABTV.shape == (k_steps, b, t_len, base.vocab_size)

  variables = {"params": params["drafter"], "buffers": buffers}
  pos = jnp.broadcast_to(jnp.arange(t_len), (b, t_len))
  padded = np.concatenate([tokens, np.zeros((b, k_steps + 2), tokens.dtype)], axis=1)
  err, leak = np.zeros(k_steps), np.inf
  for t in range(t_len - 1):
    # Inference at anchor t: the base has verified x_0..x_t; later slots hold garbage (a cache's
    # stale entries), which the drafter must never read.
    seen = np.concatenate([tokens[:, :t + 1], rng.integers(3, base.vocab_size, (b, t_len - t - 1))],
                          axis=1)
    out = jit_base(base)(params["base"], jnp.asarray(seen), pos)
    args = (variables, dcfg, params["base"]["embedding"], out.store_kv, out.hidden[:, t],
            jnp.asarray(tokens[:, t + 1]))
    kw = dict(num_draft_steps=k_steps, query_position=query_position, dense_head=True,
              teacher_tokens_BA=jnp.asarray(padded[:, t + 2:t + 2 + k_steps]))
    draft_BAV = np.asarray(jit_draft(*args, jnp.full((b,), t), **kw).logits)
    for k in range(k_steps):
      if t + k + 1 < t_len:  # step k+1 consumes x_{t+k+1}, which must exist
        err[k] = max(err[k], np.abs(draft_BAV[:, k] - train_ABTV[k, :, t]).max())
    if t < t_len - 2:  # reading one future slot (what a naive shift does) is far off
      leaked = np.asarray(jit_draft(*args, jnp.full((b,), t + 1), **kw).logits)
      leak = min(leak, np.abs(leaked[:, 0] - train_ABTV[0, :, t]).max())
  print(f"max |logit error| train vs draft ({query_position}) per step: {err}; "
        f"one leaked slot: {leak:.2f}")
  # Step 1 is one drafter pass; later steps carry the hidden, which amplifies the float32 rounding
  # of XLA's different kernels for a 1-query (draft) vs T-query (training) attention. Over 12 random
  # draws step 1 stayed <= 3e-5 and step 3 <= 7e-5; this draw (seed 0) is <= 1e-5 on x86 CPU.
  assert err[0] <= TOL_ALIGN
  assert err.max() <= 1e-4
  assert leak > 1e-2
  assert train_ABTV.std() > 0.5


def test_targets_mask_end_padding_documents_and_non_assistant_tokens():
  tokens = jnp.asarray([[10, 11, 12, 13, 14, 15, 16, 17]])
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0]])  # two documents, then padding
  lm = jnp.asarray([[0, 1, 1, 0, 1, 0, 1, 1]], bool)  # token 15 is not an assistant token
  targets = objectives.Targets.build(tokens, seg, seg != 0, lm, num_draft_steps=2)
  lab1, m1 = targets.at(1)
  np.testing.assert_array_equal(lab1[0], [11, 12, 13, 14, 15, 16, 17, 0])
  np.testing.assert_array_equal(m1[0], [1, 1, 0, 1, 0, 1, 0, 0])
  lab3, m3 = targets.at(3)  # the label of drafter step 2
  np.testing.assert_array_equal(lab3[0], [13, 14, 15, 16, 17, 0, 0, 0])
  np.testing.assert_array_equal(m3[0], [0, 0, 0, 1, 0, 0, 0, 0])


def test_packed_documents_are_independent():
  """A document packed after another gives the same drafter logits as the document alone."""
  base, dcfg = tiny_configs(ordered=False)
  params, buffers = random_params(base, dcfg, seed=1)
  rng = np.random.default_rng(1)
  a, c = rng.integers(3, base.vocab_size, 4), rng.integers(3, base.vocab_size, 6)
  jcfg = TrainConfig(num_draft_steps=2)
  packed = {"tokens": jnp.asarray(np.concatenate([a, c])[None]),
            "segment_ids": jnp.asarray([[1] * 4 + [2] * 6]),
            "positions": jnp.asarray(np.concatenate([np.arange(4), np.arange(6)])[None])}
  alone = {"tokens": jnp.asarray(np.concatenate([c, np.zeros(4, c.dtype)])[None]),
           "segment_ids": jnp.asarray([[1] * 6 + [0] * 4])}
  f = jax.jit(lambda p, bt: joint.joint_forward(p, buffers, bt, base, dcfg, jcfg))
  got, want = f(params, packed), f(params, alone)
  # Rows of document c whose step inputs stay inside c: step k at row t needs t + k < 6.
  for k in range(2):
    n = 6 - k - 1
    np.testing.assert_allclose(np.asarray(got.steps[k, 0, 4:4 + n]), np.asarray(want.steps[k, 0, :n]),
                               atol=2e-5)


def test_remat_equals_no_remat_with_kv_sharing(fast_compile):
  """Gradients with remat on base and drafter blocks equal those without; the base's store layers
  (read by its KV-shared layers and by every drafter layer) get their K/V gradient under remat (the
  upstream HF issue: KV sharing breaks with gradient checkpointing). Other policies are covered by
  the base's own remat test; the drafter reuses its Block."""
  base, dcfg = tiny_configs(ordered=True, small=True)
  params, buffers = random_params(base, dcfg, seed=2, amp=0.6)
  rng = np.random.default_rng(2)
  batch = {"tokens": jnp.asarray(rng.integers(3, base.vocab_size, (2, 8)))}
  jcfg = TrainConfig(num_draft_steps=2, drafter_loss_weight=0.5)

  def grads(b_cfg, d_cfg):
    fn = jax.jit(jax.grad(lambda p: joint.loss_fn(p, buffers, batch, b_cfg, d_cfg, jcfg)[0]))
    return fn(params)

  g0 = grads(base, dcfg)
  g1 = grads(base.replace(remat_policy="full"),
             dcfg.replace(text=dcfg.text.replace(remat_policy="full")))
  # Recomputation may round differently; the bound is float32 noise relative to each leaf's scale.
  for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    x, y = np.asarray(x), np.asarray(y)
    assert np.abs(x - y).max() <= 1e-4 * max(1.0, np.abs(x).max())
  for lt, i in base.store_layers.items():
    assert float(jnp.abs(g1["base"][f"layer_{i}"]["attn"]["k"]).max()) > 1e-4, lt
  assert float(jnp.abs(g1["drafter"]["layer_0"]["attn"]["q"]).max()) > 1e-4


def test_train_config_from_preset_train_section():
  jcfg = TrainConfig.from_config(dict(
      num_draft_steps=3, drafter_loss_weight=0.1, freeze_base=True, share_embedding_with_base=False,
      draft_query_position="anchor", seq_len=256, learning_rate=1e-3))
  assert (jcfg.num_draft_steps, jcfg.drafter_loss_weight, jcfg.freeze_base) == (3, 0.1, True)
  assert not jcfg.share_embedding_with_base and jcfg.draft_query_position == "anchor"
  with pytest.raises(config_lib.ConfigError, match="draft_query_position"):
    TrainConfig(draft_query_position="middle")
  with pytest.raises(config_lib.ConfigError, match="step_weights"):
    TrainConfig(num_draft_steps=2, step_weights=(1.0,))


def test_chunked_attention_equals_full_attention(fast_compile):
  """attention_chunk_size on base and drafter (whose all-anchor rows read the base's K/V in
  window-sliced blocks, W + 1 keys back) gives the joint loss and gradients of whole attention,
  on packed rows."""
  base, dcfg = tiny_configs(ordered=True, window=3)
  params, buffers = random_params(base, dcfg, seed=4, amp=0.6)
  rng = np.random.default_rng(4)
  t = 22
  batch = {"tokens": jnp.asarray(rng.integers(3, base.vocab_size, (2, t))),
           "segment_ids": jnp.asarray([[1] * 13 + [2] * 9, [1] * 20 + [0] * 2]),
           "positions": jnp.asarray([list(range(13)) + list(range(9)),
                                     list(range(20)) + [0, 0]])}
  jcfg = TrainConfig(num_draft_steps=3, drafter_loss_weight=0.5)

  def value_and_grads(chunk):
    b = base.replace(attention_chunk_size=chunk)
    d = dcfg.replace(text=dcfg.text.replace(attention_chunk_size=chunk))
    return jax.jit(jax.value_and_grad(
        lambda p: joint.loss_fn(p, buffers, batch, b, d, jcfg)[0]))(params)

  v0, g0 = value_and_grads(0)
  v1, g1 = value_and_grads(4)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  # float32 summation order differs (blocked softmax sums, then norm-scale and layer-scalar grads
  # summed over every position): measured <= 1.6e-4 of a leaf's scale; a key off by one is > 1e-2.
  for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    x, y = np.asarray(x), np.asarray(y)
    assert np.abs(x - y).max() <= 5e-4 * max(1.0, np.abs(x).max())
  assert float(jnp.abs(g1["drafter"]["layer_0"]["attn"]["q"]).max()) > 1e-4


def test_default_step_fn_with_chunked_loss_config():
  """joint_forward with `loss_chunk_size` > 0 and the default step function (the logits, for
  inspection) gives the logits of the unchunked forward. It used to pass `hidden_BTD=` to
  `default_step_fn`, which takes no such argument: a TypeError at trace time."""
  base, dcfg = tiny_configs(ordered=True, small=True)
  params, buffers = random_params(base, dcfg, seed=5)
  rng = np.random.default_rng(5)
  batch = {"tokens": jnp.asarray(rng.integers(3, base.vocab_size, (2, 7)))}
  jcfg = TrainConfig(num_draft_steps=2)
  plain = _forward(params, buffers, batch, base, dcfg, jcfg)
  chunked = _forward(params, buffers, batch, base, dcfg,
                     TrainConfig(num_draft_steps=2, loss_chunk_size=3))
  assert np.asarray(chunked.steps).shape == (2, 2, 7, base.vocab_size)
  np.testing.assert_allclose(np.asarray(chunked.steps), np.asarray(plain.steps), atol=1e-5)
  np.testing.assert_allclose(np.asarray(chunked.base_logits), np.asarray(plain.base_logits),
                             atol=1e-5)


def test_router_losses_join_the_loss_and_the_router_load_is_logged():
  """An MoE base: L gains w_aux * aux + w_z * z (from the same forward's `moe.router_losses`), the
  router metrics are logged with weights 0 too, and the router losses train the router."""
  from gemma_mtp_jax.model import moe
  from gemma_mtp_jax.model import transformer
  base, dcfg = tiny_configs(ordered=False, small=True, enable_moe=True, num_experts=4,
                            top_k_experts=2, moe_hidden_dim=16)
  params, buffers = random_params(base, dcfg, seed=1)
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(3, base.vocab_size, (2, 12)))}
  plain = TrainConfig(num_draft_steps=2)
  weighted = TrainConfig(num_draft_steps=2, router_aux_loss_weight=0.5, router_z_loss_weight=0.25)
  loss_fn = jax.jit(lambda p, j: joint.loss_fn(p, buffers, batch, base, dcfg, j), static_argnums=1)
  l0, m0 = loss_fn(params, plain)
  l1, m1 = loss_fn(params, weighted)
  _, state = transformer.Transformer(base).apply(
      {"params": params["base"]}, batch["tokens"], jnp.broadcast_to(jnp.arange(12), (2, 12)),
      mutable=[moe.STATS_COLLECTION])
  want = moe.router_losses(state)
  np.testing.assert_allclose(m0["router/aux_loss"], want["router_aux_loss"], rtol=1e-6)
  np.testing.assert_allclose(m0["router/z_loss"], want["router_z_loss"], rtol=1e-6)
  assert float(m0["router/expert_tokens_min"]) <= float(m0["router/expert_tokens_max"])
  # 2 rows x 12 tokens x top-2 pairs per MoE layer, spread over 4 experts.
  assert float(m0["router/expert_tokens_max"]) <= 48 and float(m0["router/expert_tokens_max"]) >= 12
  np.testing.assert_allclose(
      l1, l0 + 0.5 * want["router_aux_loss"] + 0.25 * want["router_z_loss"], rtol=1e-6)
  assert float(m1["loss"]) == float(l1)
  router_grad = lambda j: jax.grad(lambda p: loss_fn(p, j)[0])(params)["base"]
  g0, g1 = router_grad(plain), router_grad(weighted)
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g0, g1)
  changed = {jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(diff) if v > 0}
  # The router's inputs come from every earlier layer, so those gradients move too; the router's
  # own weights must.
  assert any("router" in k for k in changed), changed


def test_micro_batch_metrics_reduce_min_max_and_mean():
  from gemma_mtp_jax.training import step as step_lib
  v_m = jnp.asarray([3.0, 1.0, 2.0])
  assert float(step_lib.reduce_micro("router/expert_tokens_min", v_m)) == 1.0
  assert float(step_lib.reduce_micro("router/expert_tokens_max", v_m)) == 3.0
  assert float(step_lib.reduce_micro("base/loss", v_m)) == 2.0


def _tiny_vision_pair():
  """tiny_configs' E-style pair with a one-layer vision tower and the bidirectional image mask."""
  from gemma_mtp_jax.model import vision
  tower = vision.VisionConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
      num_key_value_heads=2, head_dim=8, patch_size=2, pooling_kernel_size=2,
      position_embedding_size=16)
  return tiny_configs(ordered=False, window=4, vision=tower, image_token_id=60, boi_token_id=61,
                      eoi_token_id=62, use_bidirectional_attention="vision")


def test_training_forward_equals_draft_api_on_rows_with_images():
  """Rows that hold an image: the training forward's step-k logits at a text anchor t equal
  `drafter.draft` from a prefill of x_0..x_t with the same image (the base's K/V at the image's
  positions included, as at inference); the image changes them."""
  base, dcfg = _tiny_vision_pair()
  params, buffers = random_params(base, dcfg, seed=3)
  rng = np.random.default_rng(3)
  b, t_len, k_steps, n_img = 2, 16, 2, 4  # a 4 x 4-patch image -> 4 soft tokens
  ids = rng.integers(3, 59, (b, t_len))
  ids[:, 1], ids[:, 2:2 + n_img], ids[:, 2 + n_img] = 61, 60, 62  # bos, boi, image x4, eoi, text
  pv = rng.uniform(0, 1, (b, 1, 16, 12)).astype(np.float32)
  ys, xs = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
  pos = np.broadcast_to(np.stack([xs.ravel(), ys.ravel()], -1), (b, 1, 16, 2)).astype(np.int32)
  images = (jnp.asarray(pv), jnp.asarray(pos))
  jcfg = TrainConfig(num_draft_steps=k_steps)
  batch = {"tokens": jnp.asarray(ids), "pixel_values": images[0], "pixel_positions": images[1]}
  train_ABTV = np.asarray(_forward(params, buffers, batch, base, dcfg, jcfg).steps)
  no_image = np.asarray(_forward(params, buffers, {"tokens": jnp.asarray(ids)}, base, dcfg,
                                 jcfg).steps)
  assert np.abs(train_ABTV - no_image)[:, :, 3 + n_img:].max() > 1e-2  # the image is read

  from gemma_mtp_jax.model import drafter
  from gemma_mtp_jax.model import transformer
  base_fn = jax.jit(lambda p, tok, pos_: transformer.Transformer(base).apply(
      {"params": p}, tok, pos_, images=images))
  positions = jnp.broadcast_to(jnp.arange(t_len), (b, t_len))
  padded = np.concatenate([ids, np.zeros((b, k_steps + 2), ids.dtype)], axis=1)
  err = 0.0
  for t in range(3 + n_img, t_len - k_steps - 1):  # text anchors after the image
    seen = np.concatenate([ids[:, :t + 1], rng.integers(3, 59, (b, t_len - t - 1))], axis=1)
    out = base_fn(params["base"], jnp.asarray(seen), positions)
    d = drafter.draft({"params": params["drafter"]}, dcfg, params["base"]["embedding"],
                      out.store_kv, out.hidden[:, t], jnp.asarray(ids[:, t + 1]),
                      jnp.full((b,), t), num_draft_steps=k_steps, dense_head=True,
                      teacher_tokens_BA=jnp.asarray(padded[:, t + 2:t + 2 + k_steps]))
    err = max(err, float(np.abs(np.asarray(d.logits) - np.moveaxis(train_ABTV[:, :, t], 0, 1))
                         .max()))
  print(f"max |logit error| train vs draft on rows with an image: {err:.2e}")
  assert err <= 1e-4
