"""The drafter objectives (`train.drafter_objective`): one registry, name -> what they differ in.

Every objective shares the joint forward (`objective.joint_forward`: the base once, then K drafter
steps for every anchor row t by a scan), the heads, the data and the loss terms. What differs is an
`Objective`:

  pairing: which token 0-based step k at row t consumes and which it is labelled with, the queries'
    RoPE positions and the [B, T, S] masks onto the base's K/V (`Pairing`);
  step_norm: what each step's summed loss is divided by (None: its own target count);
  chunked_attention: whether `attention_chunk_size` may run the drafter's attention in causal
    windows (only when every mask is one: a mask reading later positions is not).

Adding an objective is one `register(Objective(...))` call; the loss (`objective.loss_fn`), the
eval (it always scores `INFERENCE_ALIGNED`, the task drafting meets) and the config check of
`train.drafter_objective` (valid names and its error text: `names()`) read this table.
A label source other than the data (issue 24's `train.drafter_target`: distill the base) is a
separate axis: it keeps the pairing and scores step k at row t against the base's distribution at
row t + `Pairing.label_shift(k)` - 1, the row whose next token is that label.

This module needs no TrainConfig at import time (training/config.py imports it for the names).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import drafter as drafter_lib
from gemma_mtp_jax.model import transformer

Array = jax.Array


# ------------------------------------------------------------------------------ labels
@flax.struct.dataclass
class Targets:
  """The batch padded on the right by K + 1 columns, so `at(j)` reads column t + j for every row t."""
  tokens: Array  # [B, T + K + 1]
  seg: Array  # -1 past the end: never the same document
  loss_mask: Array  # False past the end (also False on padding)
  anchor_ok_BT: Array  # row t is a real token (its hidden and K/V exist)
  anchor_seg_BT: Array

  @classmethod
  def build(cls, tokens_BT, seg_BT, valid_BT, lm_BT, num_draft_steps: int) -> "Targets":
    pad = ((0, 0), (0, num_draft_steps + 1))
    return cls(tokens=jnp.pad(tokens_BT, pad), seg=jnp.pad(seg_BT, pad, constant_values=-1),
               loss_mask=jnp.pad(lm_BT, pad), anchor_ok_BT=valid_BT, anchor_seg_BT=seg_BT)

  def at(self, j) -> tuple[Array, Array]:
    """(x_{t+j} [B, T], mask [B, T]): the token j ahead of each row and whether it is a target of
    row t (same document, a loss token, row t real). `j` may be traced (inside the scan over k)."""
    t = self.anchor_ok_BT.shape[1]
    tok = jax.lax.dynamic_slice_in_dim(self.tokens, j, t, axis=1)
    seg = jax.lax.dynamic_slice_in_dim(self.seg, j, t, axis=1)
    lm = jax.lax.dynamic_slice_in_dim(self.loss_mask, j, t, axis=1)
    # Documents are contiguous, so the same document at t and t + j covers every token between.
    return tok, self.anchor_ok_BT & lm & (seg == self.anchor_seg_BT)

  def same_doc(self, j) -> Array:
    """bool [B, T]: column t + j is in row t's document (False past the row end)."""
    t = self.anchor_ok_BT.shape[1]
    return jax.lax.dynamic_slice_in_dim(self.seg, j, t, axis=1) == self.anchor_seg_BT


@flax.struct.dataclass
class Pairing:
  """An objective's pairing on one batch: the queries' RoPE positions and the [B, T, S] mask per
  layer type (the same for every step), and the pairing: 0-based step k at row t consumes
  x_{t+k+offset} and is labelled x_{t+k+offset+1}. Everything else (base forward, carried hidden,
  heads, losses, data) is shared."""
  q_pos_BT: Array
  masks: dict[str, Array]
  offset: int = flax.struct.field(pytree_node=False, default=1)
  # NeMo fills the step input past the row's end with token 0 (`<pad>`); per document here
  fill_outside_doc: bool = flax.struct.field(pytree_node=False, default=False)

  def label_shift(self, k):
    """The label of step k at row t is column t + label_shift(k) (k may be traced)."""
    return k + self.offset + 1

  def step_arrays(self, targets: Targets, k) -> tuple[Array, Array, Array]:
    """(input token, label, label mask), each [B, T], of 0-based step k (k may be traced)."""
    tok_BT, _ = targets.at(k + self.offset)
    if self.fill_outside_doc:
      tok_BT = jnp.where(targets.same_doc(k + self.offset), tok_BT, 0)
    labels_BT, mask_BT = targets.at(self.label_shift(k))
    return tok_BT, labels_BT, mask_BT


# ------------------------------------------------------------------------------ the registry
# (dcfg, jcfg (a TrainConfig), store_kv {layer type: StoreKV}, positions [B, T], segments [B, T])
PairingFn = Callable[[config_lib.DrafterConfig, Any, dict, Array, Array], Pairing]
# (the base's TokenStats, K) -> [A] divisors of the steps' summed losses
StepNormFn = Callable[[Any, int], Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  """One `train.drafter_objective`: what it changes in the shared joint forward and loss."""
  name: str
  pairing: PairingFn
  step_norm: StepNormFn | None = None  # None: each step's loss is a mean over its own targets
  # False: the masks are not causal windows, so the drafter runs with attention_chunk_size = 0
  chunked_attention: bool = True


REGISTRY: dict[str, Objective] = {}


def register(obj: Objective) -> Objective:
  """Adds `obj` under its name (ValueError if the name is taken); returns it."""
  if obj.name in REGISTRY:
    raise ValueError(f"drafter objective {obj.name!r} is already registered")
  REGISTRY[obj.name] = obj
  return obj


def names() -> tuple[str, ...]:
  """The registered objective names, in registration order (the default first)."""
  return tuple(REGISTRY)


def get(name: str) -> Objective:
  """The registered objective `name`; ConfigError naming `train.drafter_objective` otherwise."""
  if name not in REGISTRY:
    raise config_lib.ConfigError(f"config key 'train.drafter_objective': must be one of "
                                 f"{names()}, got {name!r}")
  return REGISTRY[name]


# ------------------------------------------------------------------------------ aligned
def aligned_pairing(dcfg: config_lib.DrafterConfig, jcfg, store_kv: dict[str, transformer.StoreKV],
                    pos_BT: Array, seg_BT: Array) -> Pairing:
  """The default objective (`objective`'s module docstring): step k at row t consumes x_{t+k+1}
  with h_t or the carry, at query position `jcfg.draft_query_position`, reading base K/V at
  positions <= t: exactly the draft API's step (tests/test_joint.py)."""
  return Pairing(drafter_lib.query_positions(pos_BT, jcfg.draft_query_position),
                 drafter_lib.kv_masks(dcfg, store_kv, pos_BT, seg_BT), offset=1)


# The objective whose steps are the draft API's: the default, and what the eval always scores.
INFERENCE_ALIGNED = register(Objective("aligned", aligned_pairing)).name


# ------------------------------------------------------------------------------ nemo_composite
def composite_mask(q_pos_BT: Array, q_seg_BT: Array | None, kv_pos_BS: Array, kv_valid_BS: Array,
                   kv_seg_BS: Array | None, window: int | None) -> Array:
  """bool [B, T, S]: the base slots HF's drafter lets query row t read when it is called on a whole
  sequence with eager attention (`Gemma4AssistantForCausalLM.create_attention_masks`,
  modeling_gemma4_assistant.py, transformers 5.12.1 as NeMo pins and 5.23).

  Full layers (`window` None): `create_bidirectional_mask`, every valid slot of the document,
  later ones included. Sliding layers: `create_bidirectional_sliding_window_mask` on the flipped
  padding mask, then flipped on the kv axis: |i + j - (n - 1)| <= W with i, j the offsets of query
  and slot in the document and n its length -- an anti-diagonal band tied to the row's end, not to
  i. A row with no allowed slot attends to all S slots uniformly (eager adds finfo.min instead of
  masking, `eager_attention_forward`); here that row gets every slot.
  Per document: NeMo never packs (one conversation per row, batch 1 in the MedPix recipe, which
  has no padding), so with a packed row each document is masked as if it were NeMo's whole row; a
  row that is one unpadded document gives exactly NeMo's mask. (With right padding NeMo's band is
  tied to the padded row end instead; this port ties it to the document's last token.)
  """
  doc_BTS = kv_valid_BS[:, None, :]
  if q_seg_BT is not None and kv_seg_BS is not None:
    doc_BTS = doc_BTS & (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :])
  allowed_BTS = doc_BTS
  if window is not None:
    n_BT1 = jnp.sum(doc_BTS, axis=-1, keepdims=True, dtype=jnp.int32)
    kv_pos_B1S = kv_pos_BS[:, None, :]
    start_BT1 = jnp.min(jnp.where(doc_BTS, kv_pos_B1S, jnp.iinfo(jnp.int32).max), axis=-1,
                        keepdims=True)
    i_BT1, j_BTS = q_pos_BT[:, :, None] - start_BT1, kv_pos_B1S - start_BT1
    allowed_BTS = doc_BTS & (jnp.abs(i_BT1 + j_BTS - (n_BT1 - 1)) <= window)
  return allowed_BTS | ~jnp.any(allowed_BTS, axis=-1, keepdims=True)


def nemo_composite_pairing(dcfg: config_lib.DrafterConfig,
                           store_kv: dict[str, transformer.StoreKV], pos_BT: Array,
                           seg_BT: Array) -> Pairing:
  """NeMo-Automodel's `Gemma4WithDrafter` training forward, exactly (issue #16; read at
  NVIDIA-NeMo/Automodel 36044ad3, unchanged since the feature merge 9238c3e6):

  - pairing (`nemo_automodel/components/models/gemma4_drafter/composite.py`,
    `Gemma4WithDrafter.forward`): round 0 at row t consumes E(x_t) with h_t; round k >= 1 consumes
    E(x_{t+k}) (`shifted_ids`, 0-filled past the row end) with the carried hidden of the same row.
    E is the base's scaled embedding (`get_input_embeddings`), as here.
  - labels (`nemo_automodel/recipes/vlm/finetune.py`, `_shift_labels_left` on the collate's
    `labels[:, 1:]`, `collate_fns.default_collate_fn`): round k at row t predicts x_{t+k+1}, masked
    only where that target is not a loss token or lies past the row end (no anchor mask): here
    `Targets.at(k + 1)` (offset 0).
  - position ids (`forward`: `position_ids` passed unchanged to every round; None in the VLM
    collate, so arange(S)): the query at row t sits at t in every round, i.e. the anchor position.
  - carried hidden (`forward`: `prev_last_hidden_state = drafter_out.last_hidden_state`, HF's
    post-projected final-norm hidden), not detached: the scan's carry, as in the aligned objective.
  - mask: `composite_mask` (the HF drafter's eager masks on a whole row, per document).
  - loss normaliser: `base_count_norm` (each round's summed CE over the base's label count).
  Kept from this project, so that only the objective changes (issue #16: same losses otherwise):
  the dense head and centroid loss of `drafter_head` (NeMo's HF assistant scores the centroid-
  masked head with ordered embeddings and has no centroid loss), the step weights (NeMo: none;
  the default w_k = 1 matches) and the switches `freeze_base`, `share_embedding_with_base`,
  `drafter_grads_to_base` (NeMo's recipe: False, True, True, the defaults).
  `draft_query_position` is not read in training (NeMo: the anchor); decoding still uses it.
  """
  masks = {}
  for lt in sorted(set(dcfg.text.layer_types)):
    kv = store_kv[lt]
    window = dcfg.text.sliding_window if lt == config_lib.SLIDING else None
    masks[lt] = composite_mask(pos_BT, seg_BT, kv.positions_BS, kv.valid_BS, kv.segment_BS,
                               window)
  return Pairing(pos_BT, masks, offset=0, fill_outside_doc=True)


def base_count_norm(base, num_draft_steps: int) -> Array:
  """[A]: every step's summed loss over the BASE's target count N (NeMo's recipe loss:
  `FinetuneRecipeForVLM._maybe_add_drafter_loss` passes `num_label_tokens` = the base's label
  count to `MaskedCrossEntropy`, reduction "sum", no per-round weights), so round k weighs N_k / N
  of a per-round mean: how the composite weighs its rounds."""
  return jnp.full((num_draft_steps,), base.count)


# The composite's band is not a causal window, which chunked attention assumes.
register(Objective(
    "nemo_composite", lambda dcfg, jcfg, store_kv, pos_BT, seg_BT: nemo_composite_pairing(
        dcfg, store_kv, pos_BT, seg_BT),
    step_norm=base_count_norm, chunked_attention=False))
