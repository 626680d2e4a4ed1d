"""Speculative decoding is lossless: greedy equals plain greedy (and HF's, for both families),
sampling keeps the base's distribution, rows of a batch are independent, and bad requests fail
before any compute.

The pairs are small random ones (no training): a random drafter is rarely right, so the acceptance
paths are also driven by an oracle proposer that drafts the true greedy continuation with
corruptions.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import decode as bench_decode
from gemma_mtp_jax import hf_torch
from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import drafter as drafter_lib
from gemma_mtp_jax.decoding import speculative as spec
from gemma_mtp_jax.model import transformer
from gemma_mtp_jax.checkpoint import hf_assistant as convert_drafter
from gemma_mtp_jax.checkpoint import hf_base as convert_base
from tests import hf_helpers

jax.config.update("jax_default_matmul_precision", "highest")

S, F = config_lib.SLIDING, config_lib.FULL


# ------------------------------------------------------------------------------ helpers
def _configs(vocab=64, window=3, embed=32, head_dim=8, global_head_dim=16, centroids=8):
  """An E2B-style base (PLE, KV sharing, double-wide MLP, small window) and a [s, f] drafter with
  ordered embeddings reading its store layers (2 and 1; layer 3 is KV-shared). Few layers: the
  compile time of every program grows with depth."""
  base = config_lib.ModelConfig(
      vocab_size=vocab, embed_dim=embed, num_layers=4, num_heads=2, num_kv_heads=1,
      head_dim=head_dim, global_head_dim=global_head_dim, hidden_dim=48,
      layer_types=(S, F, S, F), sliding_window=window, ple_dim=4, ple_vocab_size=vocab,
      num_kv_shared_layers=1, use_double_wide_mlp=True)
  text = config_lib.ModelConfig(
      vocab_size=vocab, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
      head_dim=head_dim, global_head_dim=global_head_dim, hidden_dim=32, layer_types=(S, F),
      sliding_window=window, final_logit_softcap=None)
  dcfg = config_lib.DrafterConfig(text=text, backbone_hidden_size=embed,
                                  use_ordered_embeddings=True, num_centroids=centroids,
                                  centroid_intermediate_top_k=2)
  dcfg.check_fits(base)
  return base, dcfg


def _random_base(cfg, seed=0):
  shapes = nn.unbox(jax.eval_shape(lambda r: transformer.init_params(cfg, r),
                                   jax.random.PRNGKey(0)))
  return bench_decode.fill_random(shapes, seed, amp=1.2)


def _random_drafter(dcfg, seed=1, amp=1.2):
  shapes = nn.unbox(jax.eval_shape(lambda r: drafter_lib.init_variables(dcfg, r),
                                   jax.random.PRNGKey(0)))
  variables = {"params": bench_decode.fill_random(shapes["params"], seed, amp)}
  if dcfg.use_ordered_embeddings:
    perm = np.random.default_rng(seed).permutation(dcfg.text.vocab_size)
    variables["buffers"] = {"token_ordering": jnp.asarray(perm, jnp.int32)}
  return variables


def _prompts(rng, vocab, lengths):
  return [rng.integers(3, vocab, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def pair():
  base, dcfg = _configs()
  return base, _random_base(base), dcfg, _random_drafter(dcfg)


def _plain(base, params, prompts, n, **kw):
  return spec.decode_prompts(params, base, prompts, max_new_tokens=n, **kw)


def _spec(pair_, prompts, n, k, **kw):
  base, params, dcfg, dvars = pair_
  return spec.decode_prompts(params, base, prompts, drafter_vars=dvars, drafter_cfg=dcfg,
                       num_draft_tokens=k, max_new_tokens=n, **kw)


@dataclasses.dataclass(frozen=True)
class OracleProposer:
  """Drafts the reference continuation `aux["ref"]` [B, N + K] (plain greedy output) with draft
  m + 1 corrupted, m = (round + 2 * row) mod (K + 1) (m = K: none), so that row accepts exactly m:
  every length 0..K within K + 1 rounds, and rows differ in the same round."""

  vocab: int

  def __call__(self, aux, params, cfg, state, k, sampling, rng):
    ref_BO = aux["ref"]
    b = ref_BO.shape[0]
    idx_BA = state.num_out_B[:, None] + jnp.arange(k)  # ref[num_out - 1] is state.token_B
    d_BA = jnp.take_along_axis(ref_BO, idx_BA, axis=1)
    m_B = (state.round + 2 * jnp.arange(b)) % (k + 1)
    return jnp.where(jnp.arange(k) == m_B[:, None], (d_BA + 1) % self.vocab, d_BA), None



def test_executable_cache_is_bounded_and_counts_every_compile(pair, monkeypatch):
  """The decode programs stay cached up to `_MAX_EXECUTABLES` (least recently used dropped first);
  `compiled_programs` counts every compile, evicted ones too, and an evicted shape compiles again."""
  base = pair[0]
  rng = np.random.default_rng(11)
  monkeypatch.setattr(spec, "_EXECUTABLES", spec.collections.OrderedDict())
  monkeypatch.setattr(spec, "_MAX_EXECUTABLES", 2)
  before = spec.compiled_programs()
  first = _spec(pair, _prompts(rng, base.vocab_size, [5, 6]), 4, 2)
  assert first.compile_seconds > 0 and len(spec._EXECUTABLES) == 2
  again = _spec(pair, _prompts(rng, base.vocab_size, [4, 7]), 4, 2)
  assert again.compile_seconds == 0.0  # same bucket: reused
  other = _spec(pair, _prompts(rng, base.vocab_size, [5, 6]), 4, 3)  # K = 3: new programs
  assert other.compile_seconds > 0 and len(spec._EXECUTABLES) == 2
  evicted = _spec(pair, _prompts(rng, base.vocab_size, [5, 6]), 4, 2)
  assert evicted.compile_seconds > 0 and len(spec._EXECUTABLES) == 2
  # prefill does not depend on K: compiled once, kept (recently used); decode for K = 2, K = 3,
  # then K = 2 again after its eviction.
  assert spec.compiled_programs() - before == {"prefill": 1, "decode": 3}

# ------------------------------------------------------------------------------ sampling filters
def test_log_probs_temperature_top_k_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  p = np.exp(np.asarray(spec.log_probs(logits, spec.Sampling(1.0))))
  np.testing.assert_allclose(p, [[0.5, 0.3, 0.15, 0.05]], rtol=1e-5)
  p = np.exp(np.asarray(spec.log_probs(logits, spec.Sampling(1.0, top_k=2))))
  np.testing.assert_allclose(p, [[0.625, 0.375, 0, 0]], rtol=1e-5)
  # top_p 0.8: 0.5 + 0.3 reaches it, so the 0.15 and 0.05 tokens go.
  p = np.exp(np.asarray(spec.log_probs(logits, spec.Sampling(1.0, top_p=0.8))))
  np.testing.assert_allclose(p, [[0.625, 0.375, 0, 0]], rtol=1e-5)
  p = np.exp(np.asarray(spec.log_probs(logits, spec.Sampling(1.0, top_p=0.81))))
  np.testing.assert_allclose(p[0, :3].sum(), 1.0, rtol=1e-5)
  p = np.exp(np.asarray(spec.log_probs(logits, spec.Sampling(0.5))))
  q = np.asarray([0.5, 0.3, 0.15, 0.05]) ** 2
  np.testing.assert_allclose(p[0], q / q.sum(), rtol=1e-5)
  # The most likely token always survives top-p.
  p = np.exp(np.asarray(spec.log_probs(logits, spec.Sampling(1.0, top_p=0.1))))
  np.testing.assert_allclose(p, [[1, 0, 0, 0]])
  assert int(spec.choose(logits, spec.Sampling(), None)[0]) == 0
  # Inverse-CDF sampling: never a zero-probability token, frequencies as given (unnormalised).
  draws = np.asarray(spec.sample(jax.random.PRNGKey(0), jnp.tile(jnp.asarray([[0, 1.0, 0, 3.0]]),
                                                                 (4000, 1))))
  assert set(draws.tolist()) == {1, 3} and abs((draws == 3).mean() - 0.75) < 0.03


# ------------------------------------------------------------------------------ greedy
def _drafter_for(family, cfg):
  """(DrafterConfig, variables, HF assistant or None) fitting the HF-converted base `cfg`: a random
  [s, f] drafter for the gemma4 row; for the 12B row the converted HF `Gemma4UnifiedAssistant`
  (so HF's own assisted generation can run the pair too)."""
  if family == hf_config.UNIFIED:
    assistant = hf_helpers.hf_unified_assistant(ordered=False)
    dcfg = hf_config.drafter_config_from_hf(assistant.config.to_dict())
    dvars = jax.tree.map(jnp.asarray, convert_drafter.state_dict_to_variables(
        dcfg, hf_helpers.numpy_state(assistant)))
    return dcfg, dvars, assistant
  text = config_lib.ModelConfig(
      vocab_size=cfg.vocab_size, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=1,
      head_dim=cfg.head_dim, global_head_dim=cfg.global_head_dim, hidden_dim=32,
      layer_types=(S, F), sliding_window=cfg.sliding_window, final_logit_softcap=None)
  dcfg = config_lib.DrafterConfig(text=text, backbone_hidden_size=cfg.embed_dim)
  return dcfg, _random_drafter(dcfg), None


# Per family: the HF base variant, and whether greedy decoding stops on eos (the E2B-style
# weights reach it in one row; the 12B-style ones decode all n tokens in both).
GREEDY_ROWS = {hf_config.GEMMA4: ("e_style", True), hf_config.UNIFIED: ("unified", False)}


@pytest.mark.parametrize("family", sorted(GREEDY_ROWS))
def test_plain_and_speculative_greedy_equal_hf_generate(family):
  variant, stop = GREEDY_ROWS[family]
  with hf_torch.hf_assistant_patch():  # the store layers an assistant reads, in every base
    hf = hf_helpers.hf_causal_lm(variant, seed=0)
  cfg = hf_config.model_config_from_hf(hf.config.to_dict())
  params = convert_base.state_dict_to_params(cfg, hf_helpers.numpy_state(hf))
  prompts = [[2, 17, 60, 121, 9, 250, 33, 7, 40, 41, 42], [2, 5, 5, 99]]
  n = 16
  # HF with left padding and an attention mask, as we pad.
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  eos = cfg.eos_token_id if stop else None
  if not stop:
    hf.generation_config.eos_token_id = None  # no stop: n tokens in every row
  kw = dict(do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
  with torch.no_grad():
    out = hf.generate(input_ids=ids, attention_mask=mask, **kw)[:, width:].tolist()
  # HF pads a finished row after its eos; we emit the eos and stop.
  ref = [row[:row.index(eos) + 1] if eos in row else row for row in out]
  assert len(ref[0]) == n and (any(eos in row for row in ref) if stop else len(ref[1]) == n)
  stops = (eos,) if stop else ()
  plain = spec.decode_prompts(params, cfg, prompts, max_new_tokens=n, stop_tokens=stops)
  assert plain.tokens == ref
  assert plain.target_forwards == n - 1  # the first token comes from the prefill
  # A drafter that fits this base: whatever it proposes, the output is HF's.
  dcfg, dvars, assistant = _drafter_for(family, cfg)
  fast = spec.decode_prompts(params, cfg, prompts, drafter_vars=dvars, drafter_cfg=dcfg,
                             num_draft_tokens=3, max_new_tokens=n, stop_tokens=stops)
  assert fast.tokens == ref
  if assistant is not None:  # HF's own assisted generation runs the pair (batch 1) too
    assistant.generation_config.num_assistant_tokens = 3
    with torch.no_grad(), hf_torch.hf_assistant_patch():
      hf_spec = hf.generate(input_ids=torch.tensor([prompts[0]]), assistant_model=assistant, **kw)
    assert hf_spec[0, width:].tolist() == ref[0]


@pytest.mark.parametrize("k", range(1, 9))
def test_speculative_greedy_equals_plain_greedy(pair, k):
  base, params = pair[0], pair[1]
  rng = np.random.default_rng(k)
  prompts = _prompts(rng, base.vocab_size, rng.integers(1, 15, 3))
  plain = _plain(base, params, prompts, 12)
  fast = _spec(pair, prompts, 12, k)
  assert fast.tokens == plain.tokens
  assert all(len(t) == 12 for t in fast.tokens)
  # Every round drafts K and emits accepted + 1 tokens (no stop tokens here).
  for b in range(3):
    assert fast.drafted_per_row[b] == k * fast.forwards_per_row[b]
    assert sum(r["accepted"] + 1 for r in fast.rounds[b]) >= 11
    assert all(len(r["drafted"]) == k for r in fast.rounds[b])


@pytest.mark.parametrize("k", [6])
def test_oracle_drafts_exercise_every_acceptance_length(pair, k):
  """Greedy with drafts that are right up to random corruptions: equal to plain greedy, every
  acceptance length 0..K occurs, rows accept different numbers in the same round, and the number of
  base forwards drops accordingly."""
  base, params = pair[0], pair[1]
  rng = np.random.default_rng(10 + k)
  prompts = _prompts(rng, base.vocab_size, [4, 11, 7])
  n = (k + 1) * (k + 2) // 2 + k + 2  # room for a full cycle of m = 0..K per row
  plain = _plain(base, params, prompts, n)
  ref = np.zeros((3, n + k), np.int32)
  ref[:, :n] = np.asarray(plain.tokens)
  fast = spec.decode_prompts(params, base, prompts, max_new_tokens=n, num_draft_tokens=k,
                       propose=OracleProposer(base.vocab_size), aux={"ref": jnp.asarray(ref)})
  assert fast.tokens == plain.tokens
  accepted = [[r["accepted"] for r in rows] for rows in fast.rounds]
  for row in accepted:
    assert set(row[:k + 1]) == set(range(k + 1)), row
  assert accepted[0][0] != accepted[1][0] != accepted[2][0]  # rows go their own way
  for b in range(3):
    assert fast.forwards_per_row[b] < n - 1
    assert sum(accepted[b]) == fast.accepted_per_row[b]
    # Tokens emitted by rounds: accepted + 1 each, the last round possibly cut at max_new.
    emitted = sum(a + 1 for a in accepted[b])
    assert n - 1 <= emitted <= n - 1 + k


def test_batch_equals_per_row_with_padding_and_stop_tokens(pair):
  """Rows of different lengths (two prompt buckets when run alone), stop tokens hit at different
  rounds: each row of the batch equals that row generated alone, and equals the unstopped plain
  output cut after its first stop token."""
  base, params = pair[0], pair[1]
  rng = np.random.default_rng(3)
  prompts = _prompts(rng, base.vocab_size, [3, 9, 20, 14])
  n = 16
  free = _plain(base, params, prompts, n).tokens
  stops = (free[0][5], free[2][9])
  expected = []
  for row in free:
    cut = [i for i, t in enumerate(row) if t in stops]
    expected.append(row[:cut[0] + 1] if cut else row)
  assert len({len(e) for e in expected}) > 1
  batch = _spec(pair, prompts, n, 3, stop_tokens=stops)
  assert batch.tokens == expected
  for b, p in enumerate(prompts):
    alone = _spec(pair, [p], n, 3, stop_tokens=stops)
    assert alone.tokens[0] == batch.tokens[b]
  plain = _plain(base, params, prompts, n, stop_tokens=stops)
  assert plain.tokens == expected


def test_compiles_once_per_shape_and_max_new_one(pair):
  """Two programs per shape at most; other prompts of the same bucket and other seeds reuse them
  (the shapes of the K = 3 property test above)."""
  base = pair[0]
  rng = np.random.default_rng(5)
  before = dict(spec.compiled_programs())
  _spec(pair, _prompts(rng, base.vocab_size, [5, 6, 14]), 12, 3, seed=1)
  mid = dict(spec.compiled_programs())
  assert sum(mid.values()) - sum(before.values()) <= 2
  second = _spec(pair, _prompts(rng, base.vocab_size, [9, 2, 1]), 12, 3, seed=2,
                 stop_tokens=(5, 7))
  assert dict(spec.compiled_programs()) == mid and second.compile_seconds == 0.0
  one = _spec(pair, [[5, 6, 7]], 1, 2)
  assert len(one.tokens[0]) == 1 and one.target_forwards == 0


# ------------------------------------------------------------------------------ sampling
def _chi2_pvalue(counts, probs, min_expected=5.0):
  """Goodness of fit of `counts` to `probs`; cells expected below `min_expected` are pooled."""
  counts, probs = np.asarray(counts, np.float64).ravel(), np.asarray(probs, np.float64).ravel()
  expected = probs / probs.sum() * counts.sum()
  small = expected < min_expected
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  stat = float(((obs - exp) ** 2 / exp).sum())
  dof = len(obs) - 1
  # chi2 survival function = regularised upper incomplete gamma Q(dof / 2, stat / 2).
  return float(jax.scipy.special.gammaincc(dof / 2.0, stat / 2.0)), stat, dof


def _exact_marginals(cfg, params, prompt, sampling, steps):
  """Exact plain-sampling distributions of the first `steps` new tokens (tiny vocab): one no-cache
  forward over the prompt followed by every possible (steps - 1)-token continuation; causality
  makes column len(prompt) - 1 + j hold P(x_{j+1} | x_1..x_j).

  Returns (marginals: [P(x_t)] for t = 1..steps, joints: [P(x_1..x_t)] of shape [V] * t).
  """
  v, n = cfg.vocab_size, steps - 1
  grid = np.stack(np.meshgrid(*[np.arange(v)] * n, indexing="ij"), -1).reshape(-1, n)
  seqs = np.concatenate([np.broadcast_to(prompt, (len(grid), len(prompt))), grid], 1)
  model = transformer.Transformer(cfg)
  fwd = jax.jit(lambda p, t: model.apply({"params": p}, t, jnp.arange(t.shape[1])[None]).logits)
  logits = fwd(params, jnp.asarray(seqs, jnp.int32))
  cond = np.exp(np.asarray(spec.log_probs(logits[:, len(prompt) - 1:], sampling), np.float64))
  cond = cond.reshape([v] * n + [steps, v])
  joint, marginals, joints = np.ones(()), [], []
  for j in range(steps):
    # P(x_{j+1} | x_1..x_j): any value of the later grid tokens (0) gives the same row.
    joint = joint[..., None] * cond[tuple([slice(None)] * j + [0] * (n - j) + [j])]
    joints.append(joint)
    marginals.append(joint.reshape(-1, v).sum(0))
  return marginals, joints


@pytest.mark.parametrize("sampling", [spec.Sampling(1.0), spec.Sampling(1.3, top_k=6, top_p=0.9)],
                         ids=["t1", "t1.3-k6-p0.9"])
def test_speculative_sampling_keeps_the_base_distribution(sampling):
  """Many rows of one prompt (independent randomness per row): the empirical distributions of the
  2nd-4th new tokens and of the (2nd, 3rd) pair fit the exact plain-sampling ones (chi-square), for
  speculative and plain sampling alike, while the raw drafts do not (the test has power)."""
  base, dcfg = _configs(vocab=16, centroids=4)
  params, dvars = _random_base(base, 3), _random_drafter(dcfg, 4, amp=2.0)
  prompt = [2, 9, 4, 11, 7]
  n_rows, n = 3000, 4
  marg, joints = _exact_marginals(base, params, prompt, sampling, n)
  assert max(m.max() for m in marg) < 0.6  # spread distributions: a real test
  fast = spec.decode_prompts(params, base, [prompt] * n_rows, drafter_vars=dvars, drafter_cfg=dcfg,
                       num_draft_tokens=2, max_new_tokens=n, sampling=sampling, seed=11)
  plain = spec.decode_prompts(params, base, [prompt] * n_rows, max_new_tokens=n, sampling=sampling,
                        seed=12)
  v = base.vocab_size
  for name, res in (("speculative", fast), ("plain", plain)):
    toks = np.asarray(res.tokens)
    for t in range(1, n):
      pv, stat, dof = _chi2_pvalue(np.bincount(toks[:, t], minlength=v), marg[t])
      assert pv > 1e-3, (name, t, stat, dof)
    pair_counts = np.bincount(toks[:, 1] * v + toks[:, 2], minlength=v * v)
    pv, stat, dof = _chi2_pvalue(pair_counts, joints[2].sum(0).ravel())
    assert pv > 1e-3, (name, "pair", stat, dof)
  # Acceptance happens, and so do rejections (the correction path is exercised).
  rate = sum(fast.accepted_per_row) / sum(fast.drafted_per_row)
  assert 0.05 < rate < 0.95, rate
  # Power: the first draft of round 1 (drafter distribution q) fails the same test against p.
  drafts = np.asarray([rows[0]["drafted"][0] for rows in fast.rounds])
  pv, _, _ = _chi2_pvalue(np.bincount(drafts, minlength=v), marg[1])
  assert pv < 1e-6


# ------------------------------------------------------------------------------ errors
def test_bad_requests_fail_before_any_compute(pair):
  base, params, dcfg, dvars = pair
  before = dict(spec.compiled_programs())

  def fails(match, **kw):
    args = dict(drafter_vars=dvars, drafter_cfg=dcfg, num_draft_tokens=2, max_new_tokens=4)
    args.update(kw)
    prompts = args.pop("prompts", [[2, 3, 4]])
    with pytest.raises(spec.GenerateError, match=match):
      spec.decode_prompts(params, base, prompts, **args)

  fails("backbone_hidden_size", drafter_cfg=dcfg.replace(backbone_hidden_size=48))
  fails("vocab_size", drafter_cfg=dcfg.replace(text=dcfg.text.replace(vocab_size=32),
                                               num_centroids=4))
  fails("head_dim", drafter_cfg=dcfg.replace(text=dcfg.text.replace(head_dim=4)))
  fails("num-draft-tokens", num_draft_tokens=0)
  fails("outside the vocab", prompts=[[2, 3], [5, base.vocab_size]])
  fails("empty", prompts=[[2, 3], []])
  fails("max-new-tokens", max_new_tokens=0)
  fails(r"prompt length 40 \(padded to 48\) \+ --max-new-tokens 30",
        prompts=[list(range(3, 43))], max_new_tokens=30, max_cache_length=64)
  with pytest.raises(spec.GenerateError, match="top_p"):
    spec.Sampling(1.0, top_p=0.0)
  assert dict(spec.compiled_programs()) == before
