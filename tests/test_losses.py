"""Losses and training switches: masked CE, L = L_base + lambda sum_k w_k L_k, frozen base, shared
embedding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mtp_jax import hf_torch
from gemma_mtp_jax import sharding
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.training import objective as joint
from gemma_mtp_jax.training import losses
from gemma_mtp_jax.training import step as step_lib
from gemma_mtp_jax.training.config import TrainConfig
from gemma_mtp_jax.utils import compiles
from tests import hf_helpers
from tests.test_drafter import _hf_pair, random_params, tiny_configs

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def fast_compile():
  """XLA without most optimisations: these tests check gradients, not speed, and compile 2x faster."""
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_stats_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  labels = rng.integers(0, 7, (2, 5))
  mask = rng.random((2, 5)) > 0.3
  nll = -np.take_along_axis(_log_softmax(logits), labels[..., None], -1)[..., 0]
  hit = logits.argmax(-1) == labels
  s = losses.token_stats(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  np.testing.assert_allclose(s.loss, nll[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(s.accuracy, hit[mask].mean(), rtol=1e-6)
  assert float(s.count) == mask.sum()
  # z-loss: + w * logsumexp^2, off by default.
  lse = np.log(np.exp(logits).sum(-1))
  z = losses.token_stats(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask),
                         z_loss_weight=1e-2)
  np.testing.assert_allclose(z.loss, (nll + 1e-2 * lse ** 2)[mask].mean(), rtol=1e-5)
  # Soft-capping raw logits first, as the models cap theirs.
  capped = np.tanh(logits / 2.0) * 2.0
  c = losses.token_stats(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), softcap=2.0)
  want = -np.take_along_axis(_log_softmax(capped), labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(c.loss, want[mask].mean(), rtol=1e-5)
  # Top-k hits (centroid recall).
  top3 = (np.argsort(-logits, -1)[..., :3] == labels[..., None]).any(-1)
  t = losses.token_stats(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), top_k=3)
  np.testing.assert_allclose(t.accuracy, top3[mask].mean(), rtol=1e-6)
  # No valid token: zero loss, not NaN.
  e = losses.token_stats(jnp.asarray(logits), jnp.asarray(labels), jnp.zeros((2, 5), bool))
  assert float(e.loss) == 0.0


def test_combine_weights_steps():
  def stats(loss, acc, n):
    n = jnp.asarray(n, jnp.float32)
    return losses.TokenStats(loss_sum=jnp.asarray(loss) * n, correct=jnp.asarray(acc) * n,
                             count=n, z_sum=jnp.zeros_like(n))

  base = stats(2.0, 0.5, 10.0)
  steps = stats([3.0, 4.0, 5.0], [0.4, 0.3, 0.2], [9.0, 8.0, 7.0])
  w = losses.step_weights(3, (1.0, 0.5, 0.25))
  loss, m = losses.combine(base, steps, 0.1, w)
  np.testing.assert_allclose(loss, 2.0 + 0.1 * (3.0 + 0.5 * 4.0 + 0.25 * 5.0), rtol=1e-6)
  np.testing.assert_allclose(m["drafter/loss_2"], 4.0)
  np.testing.assert_allclose(m["drafter/acc_3"], 0.2, rtol=1e-6)
  with pytest.raises(ValueError, match="2 entries for 3 steps"):
    losses.step_weights(3, (1.0, 1.0))


def test_loss_fn_is_mean_over_valid_targets():
  """loss_fn equals the loss recomputed by hand from joint_forward's logits and the label rule."""
  base, dcfg = tiny_configs(ordered=False, small=True)
  params, buffers = random_params(base, dcfg, seed=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, base.vocab_size, (2, 8))
  seg = np.array([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]])
  lm = rng.random((2, 8)) > 0.2
  batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg),
           "positions": jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 0]]),
           "loss_mask": jnp.asarray(lm)}
  jcfg = TrainConfig(num_draft_steps=2, drafter_loss_weight=0.3, step_weights=(1.0, 0.5))
  loss, metrics = jax.jit(lambda p: joint.loss_fn(p, buffers, batch, base, dcfg, jcfg))(params)
  out = jax.jit(lambda p: joint.joint_forward(p, buffers, batch, base, dcfg, jcfg))(params)

  def mean_nll(logits_BTV, j):
    """Row t predicts x_{t+j}: valid iff t + j is in the row, same document, a loss token."""
    lp = _log_softmax(np.asarray(logits_BTV, np.float64))
    total, n = 0.0, 0
    for b in range(2):
      for t in range(8 - j):
        if seg[b, t] and seg[b, t + j] == seg[b, t] and lm[b, t + j]:
          total -= lp[b, t, tokens[b, t + j]]
          n += 1
    return total / n

  want_base = mean_nll(out.base_logits, 1)
  want_steps = [mean_nll(out.steps[k], k + 2) for k in range(2)]
  np.testing.assert_allclose(metrics["base/loss"], want_base, rtol=1e-5)
  np.testing.assert_allclose([metrics["drafter/loss_1"], metrics["drafter/loss_2"]], want_steps,
                             rtol=1e-5)
  np.testing.assert_allclose(loss, want_base + 0.3 * (want_steps[0] + 0.5 * want_steps[1]),
                             rtol=1e-5)


def test_frozen_base_gets_no_update_and_no_optimizer_state(fast_compile):
  """The trainer's own step (`step.programs(...).step`: jitted, donated, with its optimizer)."""
  base, dcfg = tiny_configs(ordered=True, small=True)
  params, buffers = random_params(base, dcfg, seed=1)
  tcfg = TrainConfig(num_draft_steps=2, freeze_base=True, learning_rate=1e-2, warmup_steps=1)
  progs = step_lib.programs(base, dcfg, tcfg, sharding.make_mesh({"data": 1, "fsdp": 1}))
  before = jax.tree.map(np.asarray, params)
  state = progs.new_state(params)
  n_drafter = sum(x.size for x in jax.tree.leaves(params["drafter"]))
  # Adam keeps mu and nu for the drafter only (its other leaves are scalar step counts).
  assert sum(np.size(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x)) == 2 * n_drafter
  rng = np.random.default_rng(1)
  batches = [{"tokens": rng.integers(3, base.vocab_size, (2, 8)).astype(np.int32)} for _ in range(3)]
  with compiles.counting() as compiled:
    for batch in batches:
      state, metrics = progs.step(state, buffers, batch)
    jax.block_until_ready(metrics)
  assert compiled.n == 1  # one compile for every step
  assert {"drafter/loss_1", "drafter/acc_2", "drafter/centroid_recall_1"} <= set(metrics)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params["base"]),
               before["base"])
  moved = [np.abs(np.asarray(a) - b).max() for a, b in
           zip(jax.tree.leaves(state.params["drafter"]), jax.tree.leaves(before["drafter"]))]
  assert min(moved) > 0  # every drafter leaf trains


@pytest.mark.parametrize("share", [True, False], ids=["shared", "separate"])
def test_shared_embedding_gets_gradient_from_both_losses(share, fast_compile):
  """With sharing, the base embedding's gradient is the sum of the base loss's and the drafter loss's
  (through the drafter's input lookup); without, the drafter loss leaves it alone. The drafter loss
  is kept away from h and the store K/V here so only the embedding path connects it to the base."""
  base, dcfg = tiny_configs(ordered=True, small=True)
  params, buffers = random_params(base, dcfg, seed=2)
  batch = {"tokens": jnp.asarray(np.random.default_rng(2).integers(3, base.vocab_size, (2, 8)))}
  jcfg = TrainConfig(num_draft_steps=2, drafter_loss_weight=1.0, share_embedding_with_base=share,
                           drafter_grads_to_base=False, centroid_loss_weight=0.0)

  def parts(p):
    loss, m = joint.loss_fn(p, buffers, batch, base, dcfg, jcfg)
    return jnp.stack([m["base/loss"], m["drafter/loss"], loss])

  jac = jax.jit(jax.jacrev(parts))(params)
  emb = np.asarray(jac["base"]["embedding"])  # [3, V, M]: d(base, drafter, total) / d embedding
  assert np.abs(emb[0]).max() > 1e-3
  np.testing.assert_allclose(emb[2], emb[0] + emb[1], atol=1e-6)
  if share:
    assert np.abs(emb[1]).max() > 1e-3
  else:
    assert np.abs(emb[1]).max() == 0.0
  # Any other base leaf gets nothing from the drafter loss (drafter_grads_to_base=False).
  for path, g in jax.tree_util.tree_flatten_with_path(jac["base"])[0]:
    if "embedding" != jax.tree_util.keystr(path).strip("[]'"):
      assert np.abs(np.asarray(g)[1]).max() == 0.0, path


def test_loss_fn_equals_hf_torch_composite():
  """`joint.loss_fn` on converted HF weights equals the benchmark's torch composite (HF base with
  shared KV states + the K-step loop over HF's assistant modules): both the training semantics and
  the benchmark's claim to time the same computation."""
  import torch
  target, assistant = _hf_pair(True, 2)
  base, dcfg, params, variables = hf_helpers.jax_pair_from_hf(target, assistant)
  rng = np.random.default_rng(4)
  tokens = rng.integers(3, base.vocab_size, (2, 12))
  lm = rng.random((2, 12)) > 0.2
  jcfg = TrainConfig(num_draft_steps=2, drafter_loss_weight=0.5, step_weights=(1.0, 0.7),
                           centroid_loss_weight=0.3)
  with torch.no_grad(), hf_torch.hf_assistant_patch():
    want = float(hf_torch.torch_composite_loss(target, assistant, torch.tensor(tokens),
                                                  torch.tensor(lm), jcfg, dcfg))
  batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(lm)}
  got, metrics = jax.jit(lambda p, b: joint.loss_fn(p, variables["buffers"], b, base, dcfg,
                                                    jcfg))(params, batch)
  print(f"joint loss {float(got):.6f} vs HF torch composite {want:.6f}")
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert float(metrics["drafter/loss_2"]) > 0.5


def test_chunked_head_loss_equals_full_logits(fast_compile):
  """loss_chunk_size computes the same loss, metrics and gradients without [B, T, V] logits."""
  base, dcfg = tiny_configs(ordered=True, small=True)
  params, buffers = random_params(base, dcfg, seed=1)
  rng = np.random.default_rng(1)
  batch = {"tokens": jnp.asarray(rng.integers(3, base.vocab_size, (2, 9))),
           "segment_ids": jnp.asarray([[1] * 5 + [2] * 4, [1] * 7 + [0] * 2])}
  full = TrainConfig(num_draft_steps=2, drafter_loss_weight=0.5)
  chunked = dataclasses.replace(full, loss_chunk_size=4)  # 9 rows: 3 chunks, the last padded

  def grads(jcfg):
    return jax.jit(jax.value_and_grad(
        lambda p: joint.loss_fn(p, buffers, batch, base, dcfg, jcfg), has_aux=True))(params)

  (l0, m0), g0 = grads(full)
  (l1, m1), g1 = grads(chunked)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for key in ("base/loss", "base/acc", "drafter/loss_2", "drafter/acc_2"):
    np.testing.assert_allclose(m1[key], m0[key], rtol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6 * float(np.abs(b).max() + 1)),
               g1, g0)
