"""`train.drafter_objective = "nemo_composite"` reproduces NeMo-Automodel's `Gemma4WithDrafter`
training forward (issue #16; the spec: NVIDIA-NeMo/Automodel 36044ad3,
`components/models/gemma4_drafter/composite.py` `Gemma4WithDrafter.forward` and
`recipes/vlm/finetune.py` `_shift_labels_left` / `_maybe_add_drafter_loss`): the pairing, labels,
positions and masks on a hand-built batch, written out from those semantics; the loss against a
torch restatement of the composite on HF modules; and the per-document handling of packed rows.
The aligned objective's alignment tests live in tests/test_joint.py, unchanged."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mtp_jax import hf_torch
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import transformer
from gemma_mtp_jax.training import objective
from gemma_mtp_jax.training import objectives
from gemma_mtp_jax.training.config import TrainConfig
from tests import hf_helpers
from tests.test_drafter import _hf_pair, random_params, tiny_configs

jax.config.update("jax_default_matmul_precision", "highest")

# The notes' hand example: one row x_0..x_7 (S = 8), every x_1..x_7 a loss token, no x_8, no
# padding, K = 2 draft rounds, sliding window W = 3, eager attention.
S, K, W = 8, 2, 3
X = np.arange(10, 10 + S)  # x_t = 10 + t
IGN = -100  # NeMo's ignore index, for readability of the expected tables

# Sliding layers: the rows of HF's flipped bidirectional band |i + j - (S - 1)| <= W (the probe in
# the notes printed exactly these): row 0 reads 4..7, ..., row 7 reads 0..3.
SLIDING_READABLE = [range(4, 8), range(3, 8), range(2, 8), range(1, 8), range(0, 7), range(0, 6),
                    range(0, 5), range(0, 4)]
# Per round k: the input token id and the label of each row t (composite.py: round 0 E(x_t);
# round k E(x_{t+k}), id 0 past the end; `_shift_labels_left(labels, k)` of labels[t] = x_{t+1}).
ROUND_TOKENS = [[10, 11, 12, 13, 14, 15, 16, 17], [11, 12, 13, 14, 15, 16, 17, 0]]
ROUND_LABELS = [[11, 12, 13, 14, 15, 16, 17, IGN], [12, 13, 14, 15, 16, 17, IGN, IGN]]


def _store(pos_BS, valid_BS, seg_BS):
  z = jnp.zeros(pos_BS.shape + (1, 1))
  return {lt: transformer.StoreKV(z, z, jnp.asarray(pos_BS), jnp.asarray(valid_BS),
                                  jnp.asarray(seg_BS))
          for lt in (config_lib.SLIDING, config_lib.FULL)}


def _dcfg(window):
  _, dcfg = tiny_configs(ordered=False, small=True, window=window)
  return dcfg


def test_hand_example_pairing_labels_positions_masks():
  pos = np.arange(S)[None]
  seg = np.ones((1, S), np.int32)
  store = _store(pos, np.ones((1, S), bool), seg)
  pairing = objectives.nemo_composite_pairing(_dcfg(W), store, jnp.asarray(pos), jnp.asarray(seg))

  want_sliding = np.zeros((S, S), bool)
  for i, js in enumerate(SLIDING_READABLE):
    want_sliding[i, list(js)] = True
  np.testing.assert_array_equal(np.asarray(pairing.masks[config_lib.SLIDING])[0], want_sliding)
  # Full layers: every position of the row, the later ones (the targets' K/V) included.
  np.testing.assert_array_equal(np.asarray(pairing.masks[config_lib.FULL])[0], np.ones((S, S), bool))
  # Position ids arange(S) for every round (composite.py passes them unchanged).
  np.testing.assert_array_equal(np.asarray(pairing.q_pos_BT)[0], np.arange(S))

  tokens = jnp.asarray(X[None], jnp.int32)
  lm = jnp.ones((1, S), bool)  # x_0 is never a target; x_1..x_7 are
  targets = objectives.Targets.build(tokens, jnp.asarray(seg), lm, lm, K)
  for k in range(K):
    tok, labels, mask = (np.asarray(a)[0] for a in pairing.step_arrays(targets, k))
    np.testing.assert_array_equal(tok, ROUND_TOKENS[k], err_msg=f"round {k} inputs")
    np.testing.assert_array_equal(np.where(mask, labels, IGN), ROUND_LABELS[k],
                                  err_msg=f"round {k} labels")

  # The aligned objective on the same batch, for contrast: step 0 at row t consumes x_{t+1} and
  # predicts x_{t+2}, at query position t + 1, reading K/V at positions <= t (sliding t-3 .. t).
  aligned = objectives.aligned_pairing(_dcfg(W), TrainConfig(num_draft_steps=K), store,
                                      jnp.asarray(pos), jnp.asarray(seg))
  tok, labels, mask = (np.asarray(a)[0] for a in aligned.step_arrays(targets, 0))
  np.testing.assert_array_equal(tok, list(X[1:]) + [0])
  np.testing.assert_array_equal(np.where(mask, labels, IGN), list(X[2:]) + [IGN, IGN])
  np.testing.assert_array_equal(np.asarray(aligned.q_pos_BT)[0], np.arange(S) + 1)
  full = np.asarray(aligned.masks[config_lib.FULL])[0]
  np.testing.assert_array_equal(full, np.tril(np.ones((S, S), bool)))


def test_prompt_tokens_mask_targets_not_anchors():
  """`_shift_labels_left` masks by the TARGET only: with a 3-token prompt (x_1, x_2 not loss
  tokens), round 1 at row 1 (input x_2, a prompt token) still predicts x_3."""
  tokens = jnp.asarray(X[None], jnp.int32)
  seg = jnp.ones((1, S), jnp.int32)
  lm = jnp.asarray([[False, False, False, True, True, True, True, True]])
  targets = objectives.Targets.build(tokens, seg, jnp.ones((1, S), bool), lm, K)
  pairing = objectives.Pairing(jnp.zeros((1, S), jnp.int32), {}, offset=0, fill_outside_doc=True)
  want = [[IGN, IGN, 13, 14, 15, 16, 17, IGN], [IGN, 13, 14, 15, 16, 17, IGN, IGN]]
  for k in range(K):
    _, labels, mask = pairing.step_arrays(targets, k)
    np.testing.assert_array_equal(np.where(np.asarray(mask), np.asarray(labels), IGN)[0], want[k])


def test_composite_mask_padding_and_empty_band():
  """Padding: the band keeps its shape and pad columns go; a row whose band holds no valid slot
  attends to every slot (eager's uniform softmax over finfo.min logits), as the probe showed."""
  valid = np.array([[True] * 3 + [False] * 5])
  pos = np.arange(S)[None]
  seg = np.where(valid, 1, 0)
  # Per document (n = 3): |i + j - 2| <= 1 over the document's slots.
  m = np.asarray(objectives.composite_mask(jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(pos),
                                          jnp.asarray(valid), jnp.asarray(seg), 1))[0]
  np.testing.assert_array_equal(m[:3, :3], [[0, 1, 1], [1, 1, 1], [1, 1, 0]])
  assert not m[:3, 3:].any()
  assert m[3:].all()  # pad rows: nothing of their own to read -> every slot (no labels there)


def test_packed_rows_are_masked_per_document():
  """Two packed documents give each document the logits it gets alone in an unpadded row."""
  base, dcfg = tiny_configs(ordered=False, small=True, window=2)
  params, buffers = random_params(base, dcfg, seed=3)
  rng = np.random.default_rng(3)
  a, b = rng.integers(3, base.vocab_size, 7), rng.integers(3, base.vocab_size, 5)
  jcfg = TrainConfig(num_draft_steps=2, drafter_objective="nemo_composite")

  def steps(tokens, seg, pos):
    batch = {"tokens": jnp.asarray(tokens[None]), "segment_ids": jnp.asarray(seg[None]),
             "positions": jnp.asarray(pos[None])}
    return np.asarray(objective.joint_forward(params, buffers, batch, base, dcfg, jcfg).steps)

  packed = steps(np.concatenate([a, b]), np.array([1] * 7 + [2] * 5),
                 np.concatenate([np.arange(7), np.arange(5)]))
  alone_a = steps(a, np.ones(7, np.int32), np.arange(7))
  alone_b = steps(b, np.ones(5, np.int32), np.arange(5))
  # Rows whose inputs stay in their document (the last k rows of round k read the 0 fill).
  for k in range(2):
    np.testing.assert_allclose(packed[k, 0, :7 - k], alone_a[k, 0, :7 - k], atol=1e-4)
    np.testing.assert_allclose(packed[k, 0, 7:12 - k], alone_b[k, 0, :5 - k], atol=1e-4)


def _torch_nemo_composite_loss(target, assistant, tokens, loss_mask, num_rounds, lam):
  """The composite's training loss restated on the HF modules (the notes' section 8, checked there
  against NeMo's literal `Gemma4WithDrafter` + `MaskedCrossEntropy`): batch 1, no padding, eager
  masks materialised, labels shifted per round, each round's summed CE over the base's count."""
  import torch
  import torch.nn.functional as F
  s = tokens.shape[1]
  out = target(input_ids=tokens, output_hidden_states=True, return_shared_kv_states=True,
               use_cache=False)
  kv, carry = out.shared_kv_states, out.hidden_states[-1]
  embed = target.get_input_embeddings()
  labels = torch.full_like(tokens, IGN)
  labels[:, :-1] = torch.where(loss_mask[:, 1:], tokens[:, 1:], IGN)  # the collate's labels[:, 1:]
  n = (labels != IGN).sum()
  i, j = torch.arange(s)[:, None], torch.arange(s)[None]
  band = (i + j - (s - 1)).abs() <= assistant.config.text_config.sliding_window
  band = torch.where(band.any(-1, keepdim=True), band, torch.ones_like(band))
  fmin = torch.finfo(torch.float32).min
  masks = {"full_attention": torch.zeros(1, 1, s, s),
           "sliding_attention": torch.where(band, 0.0, fmin)[None, None]}
  loss = F.cross_entropy(out.logits[0].float(), labels[0], ignore_index=IGN, reduction="sum") / n
  for k in range(num_rounds):
    tok = torch.zeros_like(tokens)
    tok[:, :s - k] = tokens[:, k:]
    x = assistant.pre_projection(torch.cat([embed(tok), carry], -1))
    hid = assistant.model(inputs_embeds=x, attention_mask=masks, position_ids=torch.arange(s)[None],
                          shared_kv_states=kv, use_cache=False,
                          output_hidden_states=True).last_hidden_state
    shifted = torch.full_like(labels, IGN)
    shifted[:, :s - k] = labels[:, k:]
    loss = loss + lam * F.cross_entropy(assistant.lm_head(hid)[0].float(), shifted[0],
                                        ignore_index=IGN, reduction="sum") / n
    carry = assistant.post_projection(hid)
  return loss


@pytest.mark.parametrize("objective_name", ["nemo_composite"])
def test_nemo_loss_equals_torch_composite(objective_name):
  """The JAX objective's loss on converted weights equals the composite restated on HF's modules,
  with a 12-token row and W = 4 (so the sliding band is not the whole row) and a prompt."""
  import torch
  target, assistant = _hf_pair(False, 2)
  base, dcfg, params, variables = hf_helpers.jax_pair_from_hf(target, assistant)
  rng = np.random.default_rng(5)
  tokens = rng.integers(3, base.vocab_size, (1, 12))
  lm = np.arange(12)[None] >= 2  # a 2-token prompt
  jcfg = TrainConfig(num_draft_steps=3, drafter_loss_weight=0.5, centroid_loss_weight=0.0,
                     drafter_objective=objective_name)
  with torch.no_grad(), hf_torch.hf_assistant_patch():
    want = float(_torch_nemo_composite_loss(target, assistant, torch.tensor(tokens),
                                            torch.tensor(lm), 3, 0.5))
  batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(lm)}
  got, metrics = jax.jit(lambda p, b: objective.loss_fn(p, variables.get("buffers"), b, base, dcfg,
                                                        jcfg))(params, batch)
  print(f"nemo_composite loss {float(got):.6f} vs torch composite {want:.6f}")
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # The aligned objective is a different task on the same batch.
  aligned, _ = objective.loss_fn(params, variables.get("buffers"), batch, base, dcfg,
                                 dataclasses.replace(jcfg, drafter_objective="aligned"))
  assert abs(float(aligned) - want) > 1e-3
  # N_base = 10 targets (x_2..x_11); round 3 reaches x_3..x_11 only (9), yet divides by 10.
  assert float(metrics["drafter/tokens_3"]) == 9 and float(metrics["base/tokens"]) == 10


def test_config_rejects_unknown_objective():
  with pytest.raises(config_lib.ConfigError, match="drafter_objective"):
    TrainConfig(drafter_objective="nemo")


@pytest.fixture
def made_up_objective():
  """An objective registered for one test with one `register` call (the registry restored after):
  a toy pairing that skips a token (step k at row t consumes x_{t+k+2} and is labelled x_{t+k+3},
  reading K/V at positions <= t) with the composite's base-count step normaliser."""
  saved = dict(objectives.REGISTRY)

  def skip_one(dcfg, jcfg, store_kv, pos_BT, seg_BT):
    return objectives.aligned_pairing(dcfg, jcfg, store_kv, pos_BT, seg_BT).replace(offset=2)

  objectives.register(objectives.Objective("skip_one", skip_one,
                                           step_norm=objectives.base_count_norm))
  yield "skip_one"
  objectives.REGISTRY.clear()
  objectives.REGISTRY.update(saved)


def test_a_registered_objective_needs_no_other_edit(made_up_objective):
  """Config validation, the loss and the eval read the registry: the made-up name validates, the
  loss changes exactly as the entry says, and the eval still scores the inference-aligned task."""
  from gemma_mtp_jax.training import evaluate
  base, dcfg = tiny_configs(ordered=False, small=True)
  params, buffers = random_params(base, dcfg, seed=4)
  rng = np.random.default_rng(4)
  batch = {"tokens": jnp.asarray(rng.integers(3, base.vocab_size, (2, 10))),
           "loss_mask": jnp.asarray(np.arange(10)[None].repeat(2, 0) >= 2)}
  lam, steps = 0.5, (1, 2)

  def jcfg(name):
    return TrainConfig(num_draft_steps=len(steps), drafter_loss_weight=lam, drafter_objective=name)

  def loss(name):  # eager: three small calls cost less than compiling them
    got, m = objective.loss_fn(params, buffers, batch, base, dcfg, jcfg(name))
    return float(got), {k: float(v) for k, v in m.items()}

  aligned, am = loss("aligned")
  got, m = loss(made_up_objective)
  assert np.isfinite(got) and abs(got - aligned) > 1e-3
  # The pairing: step k's labels are aligned step k + 1's (the same target mask); the base's are
  # untouched. The normaliser: L = L_base + lambda sum_k S_k / N_base (metrics stay means).
  assert m["drafter/tokens_1"] == am["drafter/tokens_2"] < m["base/tokens"] == am["base/tokens"]
  assert m["base/loss"] == pytest.approx(am["base/loss"], rel=1e-6)
  want = m["base/loss"] + lam * sum(m[f"drafter/loss_{k}"] * m[f"drafter/tokens_{k}"]
                                    for k in steps) / m["base/tokens"]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The eval scores what drafting meets, whatever objective trained the drafter: its per-step
  # figures are the aligned objective's (dense head here, as the loss's).
  sums, _, _ = evaluate.eval_sums(params, buffers, batch, base, dcfg, jcfg(made_up_objective))
  for k in steps:
    assert float(sums["drafter/count"][k - 1]) == am[f"drafter/tokens_{k}"]
    np.testing.assert_allclose(float(sums["drafter/loss_sum"][k - 1]) / am[f"drafter/tokens_{k}"],
                               am[f"drafter/loss_{k}"], rtol=1e-5)
  # A bad name's error lists every registered objective.
  with pytest.raises(config_lib.ConfigError,
                     match="one of \\('aligned', 'nemo_composite', 'skip_one'\\), got 'skip'"):
    TrainConfig(drafter_objective="skip")
