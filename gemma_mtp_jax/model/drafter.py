"""The Gemma 4 assistant drafter (HF `gemma4_assistant`) and its K-step draft recurrence.

One draft step (HF `Gemma4AssistantForCausalLM.forward`):

  x = concat(base_embed(token) * sqrt(M), h) @ pre_projection      # [B, T, 2M] -> [B, T, D]
  x = 4 query-only decoder layers reading the base's store-layer K/V
  hidden = final_norm(x)
  logits = hidden @ embedding^T  (or the centroid head with ordered embeddings; never soft-capped)
  h_next = hidden @ post_projection                                  # [B, T, M], fed to the next step

The token embedding of a step is the BASE's (HF feeds `target_model_input_embeddings`); the
drafter's own `embedding` [V, D] is only its tied LM head.

Which base K/V a drafter query sees (HF's masks, worked out). HF drafts with one query (q_len 1)
against the shared K/V of the base's prefix, slots 0..S-1 (positions 0..p, p = the last position
the base has verified). Full layers use a plain bidirectional mask: every valid slot. Sliding layers
use `create_bidirectional_sliding_window_mask` (|q_idx - kv_idx| <= W with q_idx = 0, so kv_idx
0..W) and then flip the kv axis: the allowed slots are S-1-W .. S-1, the W + 1 most recent
positions p - W .. p, inclusive at both ends. (The base's own sliding layers see W positions, their
query's included; the drafter's query sits one past p and sees W + 1.)
Here masks come from slot positions and validity, never from array ends: slot s is attended iff
valid[s] and p - W <= pos[s] <= p (sliding) or pos[s] <= p (full). That is exactly HF's first
drafting round (tests/test_drafter.py), and stays exact for a KV cache with stale or rejected slots
past a row's length. HF's later rounds differ after a rejection, and we do not reproduce them: they
cut the verify forward's shared K/V by array length (`[:input_ids.shape[1]]`), so full layers also
read the rejected draft at position p + 1, and sliding layers read the last W + 1 entries of the
sliding cache (W - 1 old + K + 1 verified entries), rejected drafts included. (Emulating that view
with `Drafter.step` reproduced HF's later-round logits to 1e-5 when this was written; not a test.)

Query position (`query_position`): "next" (HF, MLX: p + 1, the position of the token the first step
consumes, constant over the K steps) or "anchor" (vLLM / tpu-inference: p). It changes only the RoPE
position of the drafter's queries; the K/V slots seen are the same.

Shapes (the table in `gemma_mtp_jax.model`): B batch, T rows (anchors), S KV slots, A draft steps,
V vocab, D drafter hidden, M base (backbone) hidden, C centroids, Z tokens of centroid lists.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gemma_mtp_jax.model import attention
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import layers
from gemma_mtp_jax.model import transformer

Array = jax.Array
QUERY_POSITIONS = ("next", "anchor")


# ------------------------------------------------------------------------------ masks and positions
def query_positions(last_pos: Array, query_position: str = "next") -> Array:
  """RoPE position of the drafter's queries given the last verified base position p."""
  if query_position == "next":
    return last_pos + 1
  if query_position == "anchor":
    return last_pos
  raise ValueError(f"query_position must be one of {QUERY_POSITIONS}, got {query_position!r}")


def kv_window(cfg: config_lib.DrafterConfig, layer_type: str) -> int | None:
  """`attention.causal_mask` window for a drafter layer: W + 1 positions (p - W .. p) on sliding
  layers, as HF's inclusive bidirectional window plus kv flip gives (see the module docstring)."""
  return cfg.text.sliding_window + 1 if layer_type == config_lib.SLIDING else None


def kv_masks(cfg: config_lib.DrafterConfig, store_kv: dict[str, transformer.StoreKV],
             last_pos_BT: Array, last_seg_BT: Array | None = None) -> dict[str, Array]:
  """Layer type -> bool [B, T, S]: the base slots each drafter query may read.

  Row t of the query attends slot s iff valid[s], pos[s] <= last_pos[t], inside the window, and (in
  packed training) in the same document. Positions, not array ends, decide, so stale cache slots past
  a row's length and future positions in a training row are both excluded.
  """
  out = {}
  for lt in sorted(set(cfg.text.layer_types)):
    kv = store_kv[lt]
    use_seg = last_seg_BT is not None and kv.segment_BS is not None
    out[lt] = attention.causal_mask(last_pos_BT, kv.positions_BS, kv.valid_BS, kv_window(cfg, lt),
                                    last_seg_BT if use_seg else None,
                                    kv.segment_BS if use_seg else None)
  return out


def embed_tokens(embedding_VM: Array, tokens: Array, dtype) -> Array:
  """The base's scaled token embedding (`Transformer.embed`): sqrt(M) rounded to the weight dtype."""
  return layers.embed_lookup(embedding_VM, tokens, dtype)


# ------------------------------------------------------------------------------ module
class Drafter(nn.Module):
  """The assistant's weights and one draft step, for any number of rows T (1 at decode, all
  anchors in training). Collection `buffers`: `token_ordering` (ordered embeddings; int32, fixed)."""

  cfg: config_lib.DrafterConfig

  def setup(self):
    cfg, t = self.cfg, self.cfg.text
    pdt = layers.as_dtype(t.param_dtype)
    p = functools.partial(layers.param_with_axes, self, dtype=pdt)
    m, d = cfg.backbone_hidden_size, t.embed_dim
    self.embedding = p("embedding", nn.initializers.normal(1.0), (t.vocab_size, d),
                       axes=("vocab", "embed"))
    self.pre_projection = p("pre_projection", layers.default_kernel_init, (2 * m, d),
                            axes=("backbone_embed", "embed"))
    self.post_projection = p("post_projection", layers.default_kernel_init, (d, m),
                             axes=("embed", "backbone_embed"))
    block = layers.remat(transformer.Block, t.remat_policy)
    self.blocks = [block(t, i, kv_window(cfg, t.layer_types[i]), name=f"layer_{i}")
                   for i in range(t.num_layers)]
    self.final_norm = layers.RMSNorm(t.rms_norm_eps, param_dtype=pdt)
    if cfg.use_ordered_embeddings:
      self.centroids = p("centroids", layers.default_kernel_init, (d, cfg.num_centroids),
                         axes=("embed", "centroids"))
      # An identity ordering until a checkpoint says otherwise (HF initialises it to zeros).
      self.token_ordering = self.variable("buffers", "token_ordering",
                                          lambda: jnp.arange(t.vocab_size, dtype=jnp.int32))

  def __call__(self, emb_BTM: Array, h_BTM: Array, q_pos_BT: Array,
               store_kv: dict[str, transformer.StoreKV], masks: dict[str, Array]):
    """One step for T rows. Returns (final-norm hidden [B,T,D], carried hidden h_next [B,T,M])."""
    t = self.cfg.text
    dt = layers.as_dtype(t.dtype)
    x_BT2M = jnp.concatenate([emb_BTM.astype(dt), h_BTM.astype(dt)], axis=-1)
    x_BTD = jnp.einsum("btm,md->btd", x_BT2M, self.pre_projection.astype(dt))
    rope = {lt: transformer.rope_tables(t, lt, q_pos_BT, dt) for lt in sorted(set(t.layer_types))}
    for i, block in enumerate(self.blocks):
      lt = t.layer_types[i]
      kv = store_kv[lt]
      x_BTD, _ = block(x_BTD, rope[lt][0], rope[lt][1], masks[lt], (kv.k, kv.v))
    hidden_BTD = self.final_norm(x_BTD)
    h_next_BTM = jnp.einsum("btd,dm->btm", hidden_BTD, self.post_projection.astype(dt))
    return hidden_BTD, h_next_BTM

  def dense_logits(self, hidden_BTD: Array) -> Array:
    """Tied head over the whole vocab, float32 [B, T, V]."""
    return layers.head_logits(hidden_BTD, self.embedding, layers.as_dtype(self.cfg.text.dtype))

  def centroid_logits(self, hidden_BTD: Array) -> Array:
    """Centroid scores [B, T, C] (float32)."""
    dt = layers.as_dtype(self.cfg.text.dtype)
    return jnp.einsum("btd,dc->btc", hidden_BTD.astype(dt), self.centroids.astype(dt),
                      preferred_element_type=jnp.float32)

  def masked_logits(self, hidden_BTD: Array) -> Array:
    """HF `Gemma4AssistantMaskedEmbedder`: the top-k centroids' tokens get their tied-head logit,
    every other token min(selected) - 1. Only k * V / C embedding rows are read.

    HF takes that min over the whole [B, T] batch; we take it per row so rows stay independent
    (identical for HF's drafting, which runs one row of one token).
    """
    cfg = self.cfg
    dt = layers.as_dtype(cfg.text.dtype)
    b, t, _ = hidden_BTD.shape
    v, c, k = cfg.text.vocab_size, cfg.num_centroids, cfg.centroid_intermediate_top_k
    _, top_BTk = jax.lax.top_k(self.centroid_logits(hidden_BTD), k)
    ordering_CZ = jnp.asarray(self.token_ordering.value).reshape(c, v // c)
    ids_BTZ = ordering_CZ[top_BTk].reshape(b, t, k * (v // c))
    emb_BTZD = jnp.take(self.embedding, ids_BTZ, axis=0).astype(dt)
    sel_BTZ = jnp.einsum("btd,btzd->btz", hidden_BTD.astype(dt), emb_BTZD,
                         preferred_element_type=jnp.float32)
    fill_BT1 = jnp.min(sel_BTZ, axis=-1, keepdims=True) - 1.0
    out_BTV = jnp.broadcast_to(fill_BT1, (b, t, v))
    bi = jnp.arange(b)[:, None, None]
    ti = jnp.arange(t)[None, :, None]
    return out_BTV.at[bi, ti, ids_BTZ].set(sel_BTZ)

  def step(self, emb_BTM, h_BTM, q_pos_BT, store_kv, masks, dense_head: bool = False,
           with_centroids: bool = False):
    """One step with its head: (logits [B,T,V] float32, h_next [B,T,M], centroid logits or None).

    dense_head: the full tied head even with ordered embeddings (training: the masked head's top-k
    selection has no gradient; its selected entries equal the dense logits).
    """
    hidden_BTD, h_next_BTM = self(emb_BTM, h_BTM, q_pos_BT, store_kv, masks)
    if self.cfg.use_ordered_embeddings and not dense_head:
      logits_BTV = self.masked_logits(hidden_BTD)
    else:
      logits_BTV = self.dense_logits(hidden_BTD)
    cent_BTC = None
    if with_centroids and self.cfg.use_ordered_embeddings:
      cent_BTC = self.centroid_logits(hidden_BTD)
    return logits_BTV, h_next_BTM, cent_BTC


def dummy_store_kv(cfg: config_lib.DrafterConfig, batch: int = 1, length: int = 2,
                   dtype=jnp.float32) -> dict[str, transformer.StoreKV]:
  """Zero store K/V with the shapes the drafter reads (for init and shape checks)."""
  t = cfg.text
  out = {}
  for lt in set(t.layer_types):
    i = t.layer_types.index(lt)
    shape = (batch, length, t.layer_kv_heads(i), t.layer_head_dim(i))
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    out[lt] = transformer.StoreKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), pos,
                                  jnp.ones((batch, length), bool))
  return out


def init_variables(cfg: config_lib.DrafterConfig, rng: Array) -> dict:
  """Random drafter variables: {"params": ... (boxed with logical axes), "buffers": ...}."""
  m = cfg.backbone_hidden_size
  store = dummy_store_kv(cfg)
  last = jnp.ones((1, 1), jnp.int32)
  masks = kv_masks(cfg, store, last)
  z = jnp.zeros((1, 1, m), jnp.float32)
  return dict(Drafter(cfg).init(rng, z, z, last + 1, store, masks, method=Drafter.step,
                                 with_centroids=True))


# ------------------------------------------------------------------------------ draft API
@flax.struct.dataclass
class DraftOutput:
  tokens: Array  # [B, A] int32 drafted tokens
  logits: Array  # [B, A, V] float32 drafter logits of each step
  hidden: Array  # [B, A, M] carried hidden after each step (h_next)


def greedy(logits_BV: Array, rng: Array | None = None) -> Array:
  """Argmax sampling (`sample_fn` signature: (logits [B, V], rng or None) -> tokens [B])."""
  del rng
  return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def draft(variables: dict, cfg: config_lib.DrafterConfig, base_embedding: Array,
          store_kv: dict[str, transformer.StoreKV], h_BM: Array, token_B: Array, last_pos_B: Array,
          num_draft_steps: int, sample_fn: Callable[[Array, Any], Array] = greedy, *,
          query_position: str = "next", teacher_tokens_BA: Array | None = None,
          rng: Array | None = None, dense_head: bool = False,
          logit_softcap: float | None = None) -> DraftOutput:
  """Drafts `num_draft_steps` tokens per row with a `lax.scan` (one compile for any positions).

  Args:
    variables: drafter variables ({"params": ..., "buffers": ...}).
    base_embedding: the base's input embedding table [V, M] (the step's token embedding).
    store_kv: the base's store-layer K/V (`Transformer` output, from a no-cache forward or a KV cache;
      slots are masked by their positions and validity only).
    h_BM: the base's final-norm hidden at position p (the one that produced `token_B`).
    token_B: x_{p+1}, the token the base produced; the first step consumes it.
    last_pos_B: p, the last base position verified per row (rows may differ).
    sample_fn: (logits [B, V], rng) -> tokens [B]; `greedy` by default.
    teacher_tokens_BA: optional labels of each step; step k+1 then consumes teacher_tokens_BA[:, k]
      instead of the step-k sample (teacher forcing; the last column is never consumed).
    dense_head: use the full tied head even with ordered embeddings (as the training forward does).
    logit_softcap: optional cap on the drafter logits (HF's assistant applies none).
  Returns:
    DraftOutput(tokens [B, A], logits [B, A, V], hidden [B, A, M]).
  """
  model = Drafter(cfg)
  dt = layers.as_dtype(cfg.text.dtype)
  last_pos_B1 = last_pos_B.astype(jnp.int32)[:, None]
  masks = kv_masks(cfg, store_kv, last_pos_B1)
  q_pos_B1 = query_positions(last_pos_B1, query_position)
  keys = (jax.random.split(rng, num_draft_steps) if rng is not None
          else jnp.zeros((num_draft_steps,), jnp.uint32))
  if teacher_tokens_BA is not None:
    forced_AB = jnp.swapaxes(teacher_tokens_BA, 0, 1).astype(jnp.int32)
  else:
    forced_AB = jnp.zeros((num_draft_steps, token_B.shape[0]), jnp.int32)

  def body(carry, xs):
    tok_B, h_BM_ = carry
    key, forced_B = xs
    emb_B1M = embed_tokens(base_embedding, tok_B[:, None], dt)
    logits_B1V, h_next_B1M, _ = model.apply(variables, emb_B1M, h_BM_[:, None], q_pos_B1, store_kv,
                                            masks, dense_head, method=Drafter.step)
    logits_BV = layers.softcap(logits_B1V[:, 0], logit_softcap)
    new_B = sample_fn(logits_BV, key if rng is not None else None).astype(jnp.int32)
    next_B = forced_B if teacher_tokens_BA is not None else new_B
    return (next_B, h_next_B1M[:, 0]), (new_B, logits_BV, h_next_B1M[:, 0])

  # The carry holds the drafter's dtype (the base's hidden may be another).
  _, (tok_AB, logits_ABV, h_ABM) = jax.lax.scan(
      body, (token_B.astype(jnp.int32), h_BM.astype(dt)), (keys, forced_AB))
  return DraftOutput(tokens=jnp.swapaxes(tok_AB, 0, 1), logits=jnp.swapaxes(logits_ABV, 0, 1),
                     hidden=jnp.swapaxes(h_ABM, 0, 1))
