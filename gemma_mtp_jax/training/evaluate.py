"""Held-out evaluation of a (base, drafter) pair: losses, per-step accuracy, greedy accepted length.

Two measurements, both on the held-out split:

1. Teacher forcing on the eval batches (`make_eval_step`): the base loss and top-1 accuracy, each
   draft step's loss and top-1 accuracy (the dense head, as trained), and per anchor the accepted
   length against the data: the number of leading draft steps whose argmax equals the label.

2. Greedy (`greedy_acceptance`): the base greedily continues held-out prompts (`greedy_generate`,
   KV cache), then one teacher-forced drafter pass runs along each continuation. Because every
   token of a greedy continuation IS the base's argmax, "draft step k at anchor t equals the label"
   is exactly "greedy speculative decoding accepts draft k" (for every k whose earlier drafts were
   accepted, the teacher-forced inputs are the drafts themselves), so the per-anchor count is the
   exact greedy accepted length. The drafter's head is the one HF drafts with (the centroid-masked
   head for ordered embeddings). Walking the continuation round by round (`walk_rounds`: accept
   a(t) drafts, the base adds one token, jump to the next anchor) gives tokens per target forward,
   the figure HF assisted generation reaches with the exported pair (`hf_acceptance` measures it).

The expected speedup of greedy speculative decoding over plain greedy decoding is E / (K c + 1), E
the tokens per target forward and c the cost of one drafter step relative to one base forward
(`flops_ratio`: their per-token FLOPs, context attention left out).

transformers 5.23 differs from exact drafting in one place: after a partial acceptance its candidate
generator hands the assistant K/V computed from the rejected drafts (see `hf_stale_kv_fix`). Its
tokens per target forward can therefore differ from the walked figure; with the fix the two agree
up to float ties (the default tiny run: 2.801 walked, 2.834 HF as installed, 2.805 fixed).

Shapes: K draft steps, B rows, T tokens, V vocab, C centroids, P prompt length, N new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.training import objective as joint
from gemma_mtp_jax.model import kv_cache as kv_cache_lib
from gemma_mtp_jax.model import layers
from gemma_mtp_jax.training import losses
from gemma_mtp_jax.model import transformer
from gemma_mtp_jax.training import distributed

Array = jax.Array


# ------------------------------------------------------------------------------ teacher forcing
def accepted_lengths(hits_KBT: Array) -> Array:
  """Per anchor, the number of leading draft steps that hit: sum_k prod_{j<=k} hit_j, int32 [B, T]."""
  return jnp.sum(jnp.cumprod(hits_KBT.astype(jnp.int32), axis=0), axis=0)


def masked_argmax(logits_BTV: Array, cent_BTC: Array, clusters_V: Array, top_k: int) -> Array:
  """Argmax of the centroid-masked head (`Drafter.masked_logits`) from the dense logits.

  The masked head gives the tokens of the top-k centroids their dense logit and every other token
  min(selected) - 1, so its argmax is the dense argmax over the selected tokens (ties: lowest id in
  both). Computing it here keeps one drafter pass for both the dense losses and the masked hits.
  """
  _, top_BTk = jax.lax.top_k(cent_BTC, top_k)
  selected_BTC = jnp.zeros(cent_BTC.shape, bool).at[
      jnp.arange(cent_BTC.shape[0])[:, None, None], jnp.arange(cent_BTC.shape[1])[None, :, None],
      top_BTk].set(True)
  allowed_BTV = jnp.take(selected_BTC, clusters_V, axis=-1)
  return jnp.argmax(jnp.where(allowed_BTV, logits_BTV, -jnp.inf), axis=-1).astype(jnp.int32)


def _chunked_heads(hidden_BTD: Array, head_VD: Array, labels_BT: Array, mask_BT: Array,
                   chunk: int, cent_BTC: Array | None = None, clusters_V: Array | None = None,
                   top_k: int = 1, softcap: float | None = None, dtype=jnp.float32):
  """(TokenStats, dense argmax [B, T], masked argmax [B, T]) of `hidden @ head^T`, `chunk`
  positions at a time, so [B, T, V] logits never exist (262144-token vocabularies)."""
  b, t, _ = hidden_BTD.shape
  n = -(-t // chunk)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, n * chunk - t)) + ((0, 0),) * (x.ndim - 2))
  split = lambda x: jnp.swapaxes(pad(x).reshape(b, n, chunk, *x.shape[2:]), 0, 1)
  xs = (split(hidden_BTD), split(labels_BT), split(mask_BT),
        split(cent_BTC) if cent_BTC is not None else jnp.zeros((n,)))

  def one(x):
    h_BCD, lab_BC, m_BC, c_BCC = x
    logits_BCV = jnp.einsum("bcd,vd->bcv", h_BCD.astype(dtype), head_VD.astype(dtype),
                            preferred_element_type=jnp.float32)
    logits_BCV = layers.softcap(logits_BCV, softcap)
    stats = losses.token_stats(logits_BCV, lab_BC, m_BC)
    dense_BC = jnp.argmax(logits_BCV, axis=-1).astype(jnp.int32)
    masked_BC = (masked_argmax(logits_BCV, c_BCC, clusters_V, top_k) if cent_BTC is not None
                 else dense_BC)
    return stats, dense_BC, masked_BC

  stats, dense, masked = jax.lax.map(one, xs)
  unsplit = lambda x: jnp.swapaxes(x, 0, 1).reshape(b, n * chunk)[:, :t]
  return jax.tree.map(jnp.sum, stats), unsplit(dense), unsplit(masked)


def eval_sums(params: Mapping, buffers: Mapping | None, batch: Mapping[str, Array],
              base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig,
              jcfg: joint.JointConfig, anchor_BT: Array | None = None):
  """Sums over one batch (add them up over batches, then divide): base and per-step stats, the
  histogram of per-anchor accepted lengths, and the lengths themselves.

  An anchor is a row t whose first draft step has a label (x_{t+2} is a target of the same
  document), and, if given, where `anchor_BT` is True. With `jcfg.loss_chunk_size` > 0 the heads
  run chunk by chunk as in training (no [B, T, V] logits).
  Returns (sums dict of float32 arrays, accepted int32 [B, T], anchor bool [B, T]).
  """
  k_steps = jcfg.num_draft_steps
  ordered = dcfg.use_ordered_embeddings
  chunk = jcfg.loss_chunk_size
  # The centroid scores are needed for the masked head HF drafts with; dense logits for the losses.
  fwd_cfg = dataclasses.replace(jcfg, dense_head=True, centroid_loss_weight=1.0 if ordered else 0.0)
  clusters_V = joint.token_clusters(buffers, dcfg) if ordered else None
  top_k = dcfg.centroid_intermediate_top_k

  def step_fn(k, logits_BTV, cent_BTC, labels_BT, mask_BT, hidden_BTD=None):
    del k
    if logits_BTV is None:  # chunked heads
      stats, dense_BT, pred_BT = _chunked_heads(
          hidden_BTD, params["drafter"]["embedding"], labels_BT, mask_BT, chunk, cent_BTC,
          clusters_V, top_k, jcfg.drafter_logit_softcap, layers.as_dtype(dcfg.text.dtype))
    else:
      stats = losses.token_stats(logits_BTV, labels_BT, mask_BT)
      dense_BT = jnp.argmax(logits_BTV, axis=-1)
      pred_BT = (masked_argmax(logits_BTV, cent_BTC, clusters_V, top_k) if ordered else dense_BT)
    return stats, (pred_BT == labels_BT) & mask_BT, (dense_BT == labels_BT) & mask_BT, mask_BT

  out = joint.joint_forward(params, buffers, batch, base_cfg, dcfg, fwd_cfg, step_fn)
  step_stats, hits_KBT, dense_hits_KBT, masks_KBT = out.steps
  tokens_BT, _, valid_BT, seg_BT, lm_BT = joint.batch_arrays(batch)
  labels_BT, mask_BT = joint.Targets.build(tokens_BT, seg_BT, valid_BT, lm_BT, k_steps).at(1)
  if out.base_logits is None:
    head_VD = (params["base"]["embedding"] if base_cfg.tie_word_embeddings
               else params["base"]["lm_head"].T)
    base = losses.chunked_head_stats(out.base_hidden, head_VD, labels_BT, mask_BT, chunk,
                                     softcap=base_cfg.final_logit_softcap,
                                     dtype=layers.as_dtype(base_cfg.dtype))
  else:
    base = losses.token_stats(out.base_logits, labels_BT, mask_BT)
  anchor = masks_KBT[0] if anchor_BT is None else masks_KBT[0] & anchor_BT
  accepted_BT = jnp.where(anchor, accepted_lengths(hits_KBT), 0)
  hist = jnp.sum(jax.nn.one_hot(accepted_BT, k_steps + 1) * anchor[..., None], axis=(0, 1))
  sums = {
      "base/loss_sum": base.loss_sum, "base/correct": base.correct, "base/count": base.count,
      "drafter/loss_sum": step_stats.loss_sum, "drafter/correct": step_stats.correct,
      "drafter/count": step_stats.count, "accept/hist": hist,
      # What the dense head would accept: the gap to accept/hist is the centroid head's recall loss.
      "accept/dense_sum": jnp.sum(jnp.where(anchor, accepted_lengths(dense_hits_KBT), 0)),
  }
  return sums, accepted_BT, anchor


def make_eval_step(base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig,
                   jcfg: joint.JointConfig):
  """`eval_sums` jitted with the configs closed over: f(params, buffers, batch, anchor=None)."""
  return jax.jit(functools.partial(eval_sums, base_cfg=base_cfg, dcfg=dcfg, jcfg=jcfg))


def summarize(sums: Mapping[str, np.ndarray], prefix: str = "eval/") -> dict[str, float]:
  """Means from summed `eval_sums` outputs: losses, accuracies, accepted length and its histogram."""
  s = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  out = {}
  if "base/count" in s:
    n = max(s["base/count"], 1.0)
    out[prefix + "base/loss"] = float(s["base/loss_sum"] / n)
    out[prefix + "base/acc"] = float(s["base/correct"] / n)
  if "drafter/count" in s:
    for k, (l, c, n) in enumerate(zip(s["drafter/loss_sum"], s["drafter/correct"],
                                      s["drafter/count"])):
      out[prefix + f"drafter/loss_{k + 1}"] = float(l / max(n, 1.0))
      out[prefix + f"drafter/acc_{k + 1}"] = float(c / max(n, 1.0))
  hist = s["accept/hist"]
  anchors = max(hist.sum(), 1.0)
  out[prefix + "accept/anchors"] = float(hist.sum())
  # 1 + accepted drafts: the tokens a target forward yields at that anchor.
  out[prefix + "accept/len_mean"] = float(1.0 + (np.arange(len(hist)) * hist).sum() / anchors)
  if "accept/dense_sum" in s:
    out[prefix + "accept/len_mean_dense_head"] = float(1.0 + s["accept/dense_sum"] / anchors)
  for k in range(1, len(hist)):  # P(accepted >= k): the per-step acceptance curve
    out[prefix + f"accept/rate_{k}"] = float(hist[k:].sum() / anchors)
  return out


# ------------------------------------------------------------------------------ greedy decoding
def prompts_from_batches(batches: Sequence[Mapping[str, np.ndarray]], max_prompts: int,
                         max_prompt_len: int) -> list[np.ndarray]:
  """Held-out prompts: each document's tokens up to its first target (through `<|turn>model\\n`).

  Documents whose prompt is longer than `max_prompt_len`, or who have no target, are skipped.
  """
  prompts = []
  for batch in batches:
    tokens, seg, lm = (np.asarray(batch[k]) for k in ("tokens", "segment_ids", "loss_mask"))
    for b in range(tokens.shape[0]):
      for s in np.unique(seg[b][seg[b] > 0]):
        idx = np.nonzero(seg[b] == s)[0]
        first = np.nonzero(lm[b, idx])[0]
        if len(prompts) >= max_prompts:
          return prompts
        if first.size and 0 < first[0] <= max_prompt_len:
          prompts.append(tokens[b, idx[:first[0]]].astype(np.int32))
  return prompts


def greedy_generate(base_params: Mapping, base_cfg: config_lib.ModelConfig, prompt_BP: Array,
                    prompt_len_B: Array, num_new: int) -> Array:
  """Greedy continuation of right-padded prompts with a KV cache: int32 [B, num_new].

  Padding slots are invalid in the cache (never attended) and the new tokens take positions
  prompt_len, prompt_len + 1, ..., so every row decodes as if it were alone. Stop tokens are not
  special here: the caller cuts each row at its first one.
  """
  model = transformer.Transformer(base_cfg)
  b, p = prompt_BP.shape
  cache = kv_cache_lib.init_cache(base_cfg, b, p + num_new)
  pos_BP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  out = model.apply({"params": base_params}, prompt_BP, pos_BP, pos_BP < prompt_len_B[:, None],
                    cache=cache)
  last_BV = jnp.take_along_axis(out.logits, (prompt_len_B - 1)[:, None, None], axis=1)[:, 0]
  first_B = jnp.argmax(last_BV, axis=-1).astype(jnp.int32)

  def body(carry, i):
    tok_B, cache_ = carry
    pos_B1 = (prompt_len_B + i)[:, None]
    o = model.apply({"params": base_params}, tok_B[:, None], pos_B1, jnp.ones((b, 1), bool),
                    cache=cache_)
    nxt_B = jnp.argmax(o.logits[:, 0], axis=-1).astype(jnp.int32)
    return (nxt_B, o.cache), tok_B

  _, toks_NB = jax.lax.scan(body, (first_B, out.cache), jnp.arange(num_new, dtype=jnp.int32))
  return toks_NB.T


@dataclasses.dataclass
class GreedyBatch:
  """Prompts + their greedy continuations laid out one per row, for `eval_sums`."""
  batch: dict[str, np.ndarray]  # tokens/segment_ids/positions/loss_mask [B, T]
  anchor: np.ndarray  # bool [B, T]: rows t >= prompt_len - 1 (a decoding round may start there)
  prompt_len: np.ndarray  # int [B]
  num_new: np.ndarray  # int [B]: new tokens through the first stop token (or all)
  continuations: list[np.ndarray]


def build_greedy_batch(prompts: Sequence[np.ndarray], new_BN: np.ndarray, stop_ids: Sequence[int],
                       length: int | None = None) -> GreedyBatch:
  """Cuts each continuation after its first stop token and lays prompt + continuation in a row.

  The continuation's tokens are the targets (loss_mask); anchors start at the last prompt token,
  whose base forward produced the first new token (HF's prefill), so the first round drafts from it.
  """
  b, n = len(prompts), new_BN.shape[1]
  t = length or max(len(p) for p in prompts) + n
  arrays = {k: np.zeros((b, t), dt) for k, dt in
            (("tokens", np.int32), ("segment_ids", np.int32), ("positions", np.int32),
             ("loss_mask", bool))}
  anchor = np.zeros((b, t), bool)
  lens, news, conts = np.zeros(b, np.int64), np.zeros(b, np.int64), []
  for i, prompt in enumerate(prompts):
    cont = np.asarray(new_BN[i])
    stops = np.nonzero(np.isin(cont, list(stop_ids)))[0]
    cont = cont[:stops[0] + 1] if stops.size else cont
    seq = np.concatenate([prompt, cont])
    p, m = len(prompt), len(seq)
    arrays["tokens"][i, :m] = seq
    arrays["segment_ids"][i, :m] = 1
    arrays["positions"][i, :m] = np.arange(m)
    arrays["loss_mask"][i, p:m] = True
    anchor[i, p - 1:m] = True
    lens[i], news[i] = p, len(cont)
    conts.append(cont)
  return GreedyBatch(arrays, anchor, lens, news, conts)


def walk_rounds(accepted_T: np.ndarray, prompt_len: int, num_new: int) -> tuple[int, int]:
  """(rounds, tokens) of greedy speculative decoding along one greedy continuation.

  The prefill produced the first new token; each round then drafts from anchor t (the last verified
  position), accepts a(t) drafts and the base adds one more, or only what is left before the end.
  Every round costs one target forward.
  """
  t, end = prompt_len - 1, prompt_len + num_new - 1  # end: index of the last new token
  rounds = tokens = 0
  while t + 1 < end:
    produced = min(int(accepted_T[t]) + 1, end - (t + 1))
    rounds, tokens, t = rounds + 1, tokens + produced, t + produced
  return rounds, tokens


def greedy_acceptance(params: Mapping, buffers: Mapping | None, prompts: Sequence[np.ndarray],
                      num_new: int, stop_ids: Sequence[int], base_cfg: config_lib.ModelConfig,
                      dcfg: config_lib.DrafterConfig, jcfg: joint.JointConfig, *,
                      generate_fn=None, eval_fn=None, batch_size: int = 16,
                      length: int | None = None) -> dict:
  """Exact greedy acceptance on base-greedy continuations of `prompts` (see the module docstring).

  Returns {"metrics": {"eval/greedy/accept/...": `summarize` of the per-anchor lengths,
  "eval/greedy/tokens_per_round": tokens per target forward of the walked decode (the prefill left
  out), "eval/greedy/rounds", "eval/greedy/new_tokens"}, "continuations": the new tokens of each
  prompt, through its first stop token}.
  `generate_fn` / `eval_fn` are the jitted `greedy_generate` / `eval_sums` (made here if None).
  `batch_size` x `length` is the shape of the rows `eval_fn` sees: pass the eval batches' shape
  (when prompt + continuation fit in it) to reuse their compiled program.
  """
  generate_fn = generate_fn or jax.jit(functools.partial(greedy_generate, base_cfg=base_cfg,
                                                         num_new=num_new))
  eval_fn = eval_fn or make_eval_step(base_cfg, dcfg, jcfg)
  p_max = max(len(p) for p in prompts)
  length = max(length or 0, p_max + num_new)
  total, rounds, tokens, conts = None, 0, 0, []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[0]] * (batch_size - real)  # fixed shapes: one compile for every chunk
    prompt_BP = np.zeros((batch_size, p_max), np.int32)
    for i, p in enumerate(chunk):
      prompt_BP[i, :len(p)] = p
    lens = np.asarray([len(p) for p in chunk], np.int32)
    new_BN = np.asarray(generate_fn(params["base"], prompt_BP=prompt_BP, prompt_len_B=lens))
    g = build_greedy_batch(chunk, new_BN, stop_ids, length=length)
    g.anchor[real:] = False
    sums, acc_BT, _ = eval_fn(params, buffers, g.batch, anchor_BT=g.anchor)
    acc_BT = np.asarray(acc_BT)
    for i in range(real):
      r, n = walk_rounds(acc_BT[i], int(g.prompt_len[i]), int(g.num_new[i]))
      rounds, tokens = rounds + r, tokens + n
    conts += g.continuations[:real]
    sums = jax.tree.map(np.asarray, sums)
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  out = summarize({k: total[k] for k in ("accept/hist", "accept/dense_sum")},
                  prefix="eval/greedy/")
  out["eval/greedy/tokens_per_round"] = tokens / max(rounds, 1)
  out["eval/greedy/rounds"] = rounds
  out["eval/greedy/new_tokens"] = float(sum(len(c) for c in conts))
  return dict(metrics=out, continuations=conts)


# ------------------------------------------------------------------------------ cost model
def _layer_macs(cfg: config_lib.ModelConfig, i: int) -> int:
  """Multiply-accumulates per token of decoder layer i's projections (attention scores excluded)."""
  d, n, h = cfg.embed_dim, cfg.num_heads, cfg.layer_head_dim(i)
  macs = 2 * d * n * h  # q and o
  if not cfg.is_kv_shared(i):
    macs += d * cfg.layer_kv_heads(i) * h * (1 if cfg.layer_k_eq_v(i) else 2)
  macs += 3 * d * cfg.layer_hidden_dim(i)  # gate, up, down
  if cfg.enable_moe:  # the router and the top-k experts a token is sent to
    macs += d * cfg.num_experts + cfg.top_k_experts * 3 * d * cfg.moe_hidden_dim
  if cfg.ple_dim:
    macs += 2 * d * cfg.ple_dim
  return macs


def base_macs(cfg: config_lib.ModelConfig) -> int:
  """Per-token multiply-accumulates of one base forward: layers, PLE projection, LM head."""
  macs = sum(_layer_macs(cfg, i) for i in range(cfg.num_layers)) + cfg.vocab_size * cfg.embed_dim
  if cfg.ple_dim:
    macs += cfg.embed_dim * cfg.num_layers * cfg.ple_dim
  return macs


def drafter_macs(dcfg: config_lib.DrafterConfig, dense_head: bool = False) -> int:
  """Per-token multiply-accumulates of one drafter step, with the head it drafts with (the
  centroid-masked head scores C centroids, then k * V / C tokens)."""
  t = dcfg.text
  d, m, v = t.embed_dim, dcfg.backbone_hidden_size, t.vocab_size
  macs = 2 * m * d + d * m + sum(_layer_macs(t, i) for i in range(t.num_layers))
  if dcfg.use_ordered_embeddings and not dense_head:
    macs += d * dcfg.num_centroids + dcfg.centroid_intermediate_top_k * (v // dcfg.num_centroids) * d
  else:
    macs += v * d
  return macs


def flops_ratio(base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig,
                dense_head: bool = False) -> float:
  """c = FLOPs of one drafter step / FLOPs of one base forward, per token, from the configs (the
  projections and heads; the context attention both pay is left out, as are norms)."""
  return drafter_macs(dcfg, dense_head) / base_macs(base_cfg)


def expected_speedup(tokens_per_forward: float, num_draft_steps: int, c: float) -> float:
  """E / (K c + 1): greedy speculative decoding's speedup over plain greedy decoding."""
  return tokens_per_forward / (num_draft_steps * c + 1.0)


# ------------------------------------------------------------------------------ the trainer's eval
@dataclasses.dataclass
class Evaluator:
  """Held-out eval: the teacher-forced batches, then greedy acceptance on held-out prompts."""
  eval_fn: Any  # jitted `eval_sums`
  generate_fn: Any  # jitted `greedy_generate`
  batch_sharding: Any
  base_cfg: config_lib.ModelConfig
  dcfg: config_lib.DrafterConfig
  jcfg: joint.JointConfig
  eval_batches: list
  prompts: list
  stop_ids: list
  num_new: int
  flops_ratio: float
  rows: int  # the eval batches' shape, reused for the greedy rows when they fit (one compile)
  length: int
  last_continuations: list = dataclasses.field(default_factory=list)

  def __call__(self, params, buffers) -> tuple[dict, list]:
    total = None
    for b in self.eval_batches:
      sums, _, _ = self.eval_fn(params, buffers, distributed.global_batch(b, self.batch_sharding))
      sums = jax.tree.map(np.asarray, distributed.to_host(sums))
      total = sums if total is None else jax.tree.map(np.add, total, sums)
    out = summarize(total) if total is not None else {}
    conts = []
    if self.prompts:
      g = greedy_acceptance(params, buffers, self.prompts, self.num_new, self.stop_ids,
                                     self.base_cfg, self.dcfg, self.jcfg,
                                     generate_fn=self.generate_fn,
                                     eval_fn=self.eval_fn, batch_size=self.rows,
                                     length=self.length)
      out.update(g["metrics"])
      conts = self.last_continuations = g["continuations"]
      out["eval/greedy/expected_speedup"] = expected_speedup(
          out["eval/greedy/tokens_per_round"], self.jcfg.num_draft_steps, self.flops_ratio)
    out["eval/flops_ratio"] = self.flops_ratio
    return {k[len("eval/"):]: v for k, v in out.items()}, conts


def make_evaluator(base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig,
                   jcfg: joint.JointConfig, eval_batches: list, prompts: list, stop_ids: list,
                   num_new: int, batch_sharding, rows: int, length: int) -> Evaluator:
  """The trainer's held-out eval: call it with (params, buffers) -> (metrics, continuations)."""
  return Evaluator(make_eval_step(base_cfg, dcfg, jcfg),
                   jax.jit(functools.partial(greedy_generate, base_cfg=base_cfg, num_new=num_new)),
                   batch_sharding, base_cfg, dcfg, jcfg, eval_batches, prompts, stop_ids, num_new,
                   flops_ratio(base_cfg, dcfg), rows, length)
