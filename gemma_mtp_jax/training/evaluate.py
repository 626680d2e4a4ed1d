"""Held-out evaluation of a (base, drafter) pair: losses, per-step accuracy, greedy accepted length.

Two measurements, both on the held-out split:

1. Teacher forcing on the eval batches (`make_eval_step`): the base loss and top-1 accuracy, each
   draft step's loss and top-1 accuracy (the dense head, as trained), and per anchor the accepted
   length against the data: the number of leading draft steps whose argmax equals the label.

2. Greedy speculative decoding of held-out prompts (`greedy_acceptance`) with THE decoder
   `python -m gemma_mtp_jax.generate` ships (`speculative.decode_prompts`: the same jitted prefill
   and decode loop, the drafter proposing K = num_draft_steps tokens per round). Its tokens per
   target forward (the prefill left out: sum over prompts of new tokens - 1, over the sum of target
   forwards) is what `generate --json` reports per prompt as mean_accepted_length, and its per-round
   accepted counts give the per-position acceptance (`greedy/decode/rate_k`). The continuations it
   produced are then scored teacher-forced (`eval_sums` on prompt + continuation, anchors from the
   last prompt token on): since every token of a greedy continuation IS the base's argmax, "draft
   step k at anchor t equals the label" is "greedy speculative decoding would accept draft k there",
   which gives the per-anchor histogram `greedy/accept/*` (every anchor, not only those a round
   started from) and, with the dense head, what the centroid head's recall costs.

The expected speedup of greedy speculative decoding over plain greedy decoding is E / (K c + 1), E
the tokens per target forward and c the cost of one drafter step relative to one base forward
(`flops.flops_ratio`: their per-token FLOPs, context attention left out).

transformers 5.23 differs from exact drafting in one place: after a partial acceptance its candidate
generator hands the assistant K/V computed from the rejected drafts (see `hf_torch.hf_stale_kv_fix`).
Its tokens per target forward can therefore differ from the decoder's; with the fix the two agree
up to float ties (the default tiny run: 2.801 exact, 2.834 HF as installed, 2.805 fixed).

Shapes (the table in `gemma_mtp_jax.model`): A draft steps, B rows, T tokens, V vocab, C centroids,
Q prompt tokens, O new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp_jax.data import batch_layout
from gemma_mtp_jax.decoding import speculative
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import flops
from gemma_mtp_jax.training import distributed
from gemma_mtp_jax.training.config import TrainConfig
from gemma_mtp_jax.training import losses
from gemma_mtp_jax.training import objective as joint
from gemma_mtp_jax.training import objectives

Array = jax.Array


# ------------------------------------------------------------------------------ teacher forcing
def accepted_lengths(hits_ABT: Array) -> Array:
  """Per anchor, the number of leading draft steps that hit: sum_a prod_{j<=a} hit_j, int32 [B, T]."""
  return jnp.sum(jnp.cumprod(hits_ABT.astype(jnp.int32), axis=0), axis=0)


def eval_sums(params: Mapping, buffers: Mapping | None, batch: Mapping[str, Array],
              base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig,
              jcfg: TrainConfig, anchor_BT: Array | None = None):
  """Sums over one batch (add them up over batches, then divide): base and per-step stats, the
  histogram of per-anchor accepted lengths, and the lengths themselves.

  An anchor is a row t whose first draft step has a label (x_{t+2} is a target of the same
  document), and, if given, where `anchor_BT` is True. The heads run through `losses.head_stats`
  as in training (chunked with `jcfg.loss_chunk_size` > 0: no [B, T, V] logits). The losses score
  the dense head; the hits use the head HF drafts with (centroid-masked for ordered embeddings).
  Returns (sums dict of float32 arrays, accepted int32 [B, T], anchor bool [B, T]).
  """
  num_draft_steps = jcfg.num_draft_steps
  # The eval scores the task drafting meets whatever objective trained the drafter.
  jcfg = dataclasses.replace(jcfg, drafter_objective=objectives.INFERENCE_ALIGNED)
  head = joint.drafter_head(params, buffers, dcfg, jcfg).replace(masked=False)
  chunk = jcfg.loss_chunk_size

  def step_fn(a, hidden_BTD, cent_BTC, labels_BT, mask_BT):
    del a
    out = losses.head_stats(head, hidden_BTD, labels_BT, mask_BT, cent_BTC=cent_BTC, chunk=chunk,
                            predictions=True)
    return (out.stats, (out.masked_argmax_BT == labels_BT) & mask_BT,
            (out.argmax_BT == labels_BT) & mask_BT, mask_BT)

  out = joint.joint_forward(params, buffers, batch, base_cfg, dcfg, jcfg, step_fn, centroids=True)
  step_stats, hits_ABT, dense_hits_ABT, masks_ABT = out.steps
  labels_BT, mask_BT = out.targets.at(1)
  base = losses.head_stats(joint.base_head(params, base_cfg), out.base_hidden, labels_BT, mask_BT,
                           chunk=chunk).stats
  anchor = masks_ABT[0] if anchor_BT is None else masks_ABT[0] & anchor_BT
  accepted_BT = jnp.where(anchor, accepted_lengths(hits_ABT), 0)
  hist = jnp.sum(jax.nn.one_hot(accepted_BT, num_draft_steps + 1) * anchor[..., None], axis=(0, 1))
  sums = {
      "base/loss_sum": base.loss_sum, "base/correct": base.correct, "base/count": base.count,
      "drafter/loss_sum": step_stats.loss_sum, "drafter/correct": step_stats.correct,
      "drafter/count": step_stats.count, "accept/hist": hist,
      # What the dense head would accept: the gap to accept/hist is the centroid head's recall loss.
      "accept/dense_sum": jnp.sum(jnp.where(anchor, accepted_lengths(dense_hits_ABT), 0)),
  }
  return sums, accepted_BT, anchor


def make_eval_step(base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig,
                   jcfg: TrainConfig):
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
                         max_prompt_len: int, image_token_id: int | None = None
                         ) -> tuple[list[np.ndarray], list]:
  """Held-out prompts: each document's tokens up to its first target (through `<|turn>model\\n`),
  and the images of that prompt: (pixel_values_ipc, pixel_positions_ip2) of its image blocks (runs
  of `image_token_id`; a row's k-th block is its k-th slot, `gemma_mtp_jax.data.batch_layout`), or None
  for a prompt without images.

  Documents whose prompt is longer than `max_prompt_len`, or who have no target, are skipped.
  """
  prompts, images = [], []
  for batch in batches:
    tokens, seg, lm = (np.asarray(batch[k]) for k in ("tokens", "segment_ids", "loss_mask"))
    for b in range(tokens.shape[0]):
      starts = None
      if "pixel_values" in batch and image_token_id is not None:
        is_image = tokens[b] == image_token_id
        starts = np.nonzero(is_image & ~np.concatenate([[False], is_image[:-1]]))[0]
      for s in np.unique(seg[b][seg[b] > 0]):
        idx = np.nonzero(seg[b] == s)[0]
        first = np.nonzero(lm[b, idx])[0]
        if len(prompts) >= max_prompts:
          return prompts, images
        if first.size and 0 < first[0] <= max_prompt_len:
          prompts.append(tokens[b, idx[:first[0]]].astype(np.int32))
          images.append(_slots_between(batch, b, starts, idx[0], idx[first[0] - 1]))
  return prompts, images


def _slots_between(batch, b: int, starts, lo: int, hi: int):
  """The image slots of row b whose blocks start in positions [lo, hi]; None if there are none."""
  if starts is None:
    return None
  ks = np.nonzero((starts >= lo) & (starts <= hi))[0]
  if not ks.size:
    return None
  pv, pos = np.asarray(batch["pixel_values"])[b], np.asarray(batch["pixel_positions"])[b]
  return pv[ks], pos[ks]


@dataclasses.dataclass
class GreedyBatch:
  """Prompts + their greedy continuations laid out one per row, for `eval_sums`."""
  batch: dict[str, np.ndarray]  # tokens/segment_ids/positions/loss_mask [B, T]
  anchor: np.ndarray  # bool [B, T]: rows t >= prompt_len - 1 (a decoding round may start there)


def build_greedy_batch(prompts: Sequence[np.ndarray], continuations: Sequence[np.ndarray],
                       length: int, images: Sequence | None = None,
                       slots: tuple[int, int, int] | None = None) -> GreedyBatch:
  """Lays prompt + continuation in a row of `length` tokens (right padding) of a training batch
  (`batch_layout`); with `slots` (i, p, c), each row also gets its prompt's images (`images[row]`,
  or None) in i image slots.

  The continuation's tokens are the targets (loss_mask); anchors start at the last prompt token,
  whose base forward produced the first new token (the prefill), so the first round drafts from it.
  """
  b = len(prompts)
  arrays = batch_layout.empty_batch(b, length, slots)
  if slots is not None:
    for row, img in enumerate(images or ()):
      if img is not None:
        arrays["pixel_values"][row, :len(img[0])] = img[0]
        arrays["pixel_positions"][row, :len(img[1])] = img[1]
  anchor = np.zeros((b, length), bool)
  for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
    seq = np.concatenate([prompt, cont])
    p, m = len(prompt), len(seq)
    arrays["tokens"][i, :m] = seq
    arrays["segment_ids"][i, :m] = 1
    arrays["positions"][i, :m] = np.arange(m)
    arrays["loss_mask"][i, p:m] = True
    anchor[i, p - 1:m] = True
  return GreedyBatch(arrays, anchor)


def decode_pair(params: Mapping, buffers: Mapping | None, base_cfg: config_lib.ModelConfig,
                dcfg: config_lib.DrafterConfig) -> dict:
  """The pair in the layout the decoder runs (unboxed, loop layout, no remat), as the keyword
  arguments of `speculative.decode_prompts`."""
  bcfg, base_params = speculative.decode_params(base_cfg, params["base"])
  d_cfg, d_vars = speculative.decode_drafter(dcfg, joint.drafter_variables(params["drafter"],
                                                                           buffers))
  return dict(base_params=base_params, base_cfg=bcfg, drafter_vars=d_vars, drafter_cfg=d_cfg)


def decode_metrics(results: Sequence[tuple[speculative.GenerateResult, int]],
                   num_draft_steps: int, prefix: str = "eval/greedy/") -> dict[str, float]:
  """Aggregates decoder results (each with its number of real rows, the first ones): tokens per
  target forward = sum of (new tokens - 1) / sum of target forwards after the prefill (per row,
  `GenerateResult.row_stats`'s mean_accepted_length), and per draft position k the fraction of
  rounds that accepted >= k drafts (`decode/rate_k`)."""
  decoded = forwards = new = 0
  accepted_R = []
  for res, real in results:
    for b in range(real):
      decoded += max(len(res.tokens[b]) - 1, 0)
      new += len(res.tokens[b])
      forwards += res.forwards_per_row[b]
      accepted_R += [r["accepted"] for r in res.rounds[b]]
  out = {prefix + "tokens_per_round": decoded / max(forwards, 1), prefix + "rounds": forwards,
         prefix + "new_tokens": float(new)}
  acc = speculative.acceptance_rates(accepted_R, num_draft_steps)
  for k in range(1, num_draft_steps + 1):
    out[prefix + f"decode/rate_{k}"] = acc["rate"][k - 1]
    out[prefix + f"decode/alpha_{k}"] = acc["alpha"][k - 1]
  return out


def greedy_acceptance(params: Mapping, buffers: Mapping | None, prompts: Sequence[np.ndarray],
                      num_new: int, stop_ids: Sequence[int], base_cfg: config_lib.ModelConfig,
                      dcfg: config_lib.DrafterConfig, jcfg: TrainConfig, *,
                      eval_fn=None, batch_size: int = 16, length: int | None = None,
                      images: Sequence | None = None,
                      slots: tuple[int, int, int] | None = None) -> dict:
  """Greedy speculative decoding of `prompts` with the shipped decoder, then the teacher-forced
  histogram of its continuations (see the module docstring).

  Returns {"metrics": {"eval/greedy/tokens_per_round", "eval/greedy/rounds" (target forwards after
  the prefills), "eval/greedy/new_tokens", "eval/greedy/decode/rate_k", and "eval/greedy/accept/..."
  (`summarize` of the per-anchor lengths)}, "continuations": the new tokens of each prompt, through
  its first stop token}.
  `eval_fn`: the jitted `eval_sums` (made here if None). `batch_size` prompts decode together;
  `batch_size` x `length` is the shape of the rows `eval_fn` sees: pass the eval batches' shape
  (when prompt + continuation fit in it) to reuse their compiled program. `images`: per prompt,
  its images (`prompts_from_batches`) or None; `slots`: the eval batches' (i, p, c) image slots.
  """
  eval_fn = eval_fn or make_eval_step(base_cfg, dcfg, jcfg)
  pair = decode_pair(params, buffers, base_cfg, dcfg)
  length = max(length or 0, max(len(p) for p in prompts) + num_new)
  total, results, conts = None, [], []
  for start in range(0, len(prompts), batch_size):
    chunk = [np.asarray(p, np.int32) for p in prompts[start:start + batch_size]]
    real = len(chunk)
    chunk += [chunk[0]] * (batch_size - real)  # fixed shapes: one compile for every chunk
    imgs = None
    if images is not None:
      imgs = list(images[start:start + real]) + [images[start]] * (batch_size - real)
    res = speculative.decode_prompts(
        prompts=[p.tolist() for p in chunk], num_draft_tokens=jcfg.num_draft_steps,
        max_new_tokens=num_new, stop_tokens=stop_ids,
        query_position=jcfg.draft_query_position, images=imgs, **pair)
    results.append((res, real))
    new = [np.asarray(t, np.int32) for t in res.tokens]
    g = build_greedy_batch(chunk, new, length, imgs, slots)
    g.anchor[real:] = False
    sums, _, _ = eval_fn(params, buffers, g.batch, anchor_BT=g.anchor)
    conts += new[:real]
    sums = jax.tree.map(np.asarray, sums)
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  out = summarize({k: total[k] for k in ("accept/hist", "accept/dense_sum")},
                  prefix="eval/greedy/")
  out.update(decode_metrics(results, jcfg.num_draft_steps))
  return dict(metrics=out, continuations=conts)


def expected_speedup(tokens_per_forward: float, num_draft_steps: int, c: float) -> float:
  """E / (A c + 1): greedy speculative decoding's speedup over plain greedy decoding."""
  return tokens_per_forward / (num_draft_steps * c + 1.0)


# ------------------------------------------------------------------------------ draft length
def draft_length_advice(rates: Sequence[float], cost_ratio: float) -> dict:
  """The draft length K' = 0..K to serve with, from the greedy walk's per-position rates.

  rates[k-1] = P(accepted >= k) over the rounds of a walk drafting K tokens. Drafting K' <= K,
  greedy speculative decoding yields E(K') = 1 + sum_{j<=K'} P(accepted >= j) tokens per target
  forward -- an approximation: the rates were measured with K drafts per round and are truncated
  at K' (a round with fewer drafts would restart earlier, from other positions). Its expected
  speedup over plain decoding is E(K') / (1 + K' c), c the cost of one drafter step over one base
  forward. K' = 0 is plain decoding (speedup 1): the best K' is 0 when drafting does not pay.
  Returns {"expected_tokens": [E(0..K)], "speedup": [..], "best_k", "best_speedup"}.
  """
  e = np.concatenate([[1.0], 1.0 + np.cumsum(np.asarray(rates, np.float64))])
  speedup = e / (1.0 + np.arange(len(e)) * float(cost_ratio))
  best = int(np.argmax(speedup))  # the smallest K' on a tie: fewer drafter steps
  return dict(expected_tokens=e.tolist(), speedup=speedup.tolist(), best_k=best,
              best_speedup=float(speedup[best]))


def measure_cost_ratio(pair: Mapping, prompt: Sequence[int], num_draft_steps: int, num_new: int,
                       query_position: str = "next", repeats: int = 2, images=None) -> float:
  """c on the running machine, with the compiled decode programs at batch 1: the time of a round
  drafting K tokens over a plain decode step's, per draft: c = (t_K / t_0 - 1) / K (>= 0).

  A round's extra cost is K drafter steps plus the verify forward's K extra tokens; folding both
  into c makes E / (1 + K c) the measured speedup at K (the verify's extra tokens are nearly free
  on an accelerator, not on a CPU). Each timing is the fastest of `repeats` compiled runs."""
  def per_round(k: int) -> float:
    kw = pair if k else dict(pair, drafter_vars=None, drafter_cfg=None)
    best = float("inf")
    for _ in range(repeats):
      res = speculative.decode_prompts(prompts=[list(map(int, prompt))], num_draft_tokens=max(k, 1),
                                       max_new_tokens=num_new, query_position=query_position,
                                       images=None if images is None else [images], **kw)
      best = min(best, res.decode_seconds / max(res.target_forwards, 1))
    return best

  t0 = per_round(0)
  return max((per_round(num_draft_steps) / t0 - 1.0) / num_draft_steps, 0.0) if t0 > 0 else 0.0


def advice_metrics(rates: Sequence[float], measured: float, configured: float = 0.0,
                   prefix: str = "eval/greedy/draft_len/") -> dict[str, float]:
  """The eval's draft-length metrics: E(K') for K' = 1..K, and the speedup and best K' under c
  measured here (`measured/`) and, when `eval.cost_ratio` > 0, under that c (`config/`); the
  top-level best_k / best_speedup / cost_ratio use the configured c if set, else the measured."""
  out = {}
  chosen = None
  for name, c in (("measured", measured), ("config", configured)):
    if name == "config" and not configured > 0:
      continue
    adv = draft_length_advice(rates, c)
    for k in range(1, len(adv["speedup"])):
      out[prefix + f"expected_tokens_{k}"] = adv["expected_tokens"][k]
      out[prefix + f"{name}/speedup_{k}"] = adv["speedup"][k]
    out[prefix + f"{name}/best_k"] = float(adv["best_k"])
    out[prefix + f"{name}/cost_ratio"] = float(c)
    chosen = (adv, c)
  adv, c = chosen
  out.update({prefix + "best_k": float(adv["best_k"]), prefix + "best_speedup": adv["best_speedup"],
              prefix + "cost_ratio": float(c)})
  return out


def draft_length_message(m: Mapping[str, float], num_draft_steps: int) -> str | None:
  """The "[eval] draft length" line from an eval's metrics (None without a greedy walk)."""
  p = "greedy/draft_len/"
  if p + "best_k" not in m:
    return None
  row = lambda key: "[" + ", ".join(f"{m[key.format(k)]:.2f}"
                                    for k in range(1, num_draft_steps + 1)) + "]"
  src = "config" if p + "config/best_k" in m else "measured"
  line = (f"[eval] draft length: per-position acceptance alpha {row('greedy/decode/alpha_{}')}, "
          f"P(accepted >= k) {row('greedy/decode/rate_{}')}; E(K') {row(p + 'expected_tokens_{}')};"
          f" speedup E(K')/(1 + K' c) at c = {m[p + 'cost_ratio']:.3f} "
          f"({'eval.cost_ratio' if src == 'config' else 'measured here'}) "
          f"{row(p + src + '/speedup_{}')}; best K' = {int(m[p + 'best_k'])} "
          f"({m[p + 'best_speedup']:.2f}x)")
  if src == "config":
    line += (f"; with the c measured here ({m[p + 'measured/cost_ratio']:.3f}) best K' = "
             f"{int(m[p + 'measured/best_k'])}")
  return line


# ------------------------------------------------------------------------------ the trainer's eval
@dataclasses.dataclass
class Evaluator:
  """Held-out eval: the teacher-forced batches, then greedy speculative decoding of held-out
  prompts (`greedy_acceptance`).

  Several processes: the eval batches are global arrays (`distributed.global_batch`) and the sums
  are gathered to every host. The prompts are the same on every process (the loop gathers them),
  and every process runs the same decode of all of them with the (global) params, so every process
  computes the same greedy figures; there is no per-process split of the prompts.
  """
  eval_fn: Any  # jitted `eval_sums`
  batch_sharding: Any
  base_cfg: config_lib.ModelConfig
  dcfg: config_lib.DrafterConfig
  jcfg: TrainConfig
  eval_batches: list
  prompts: list
  stop_ids: list
  num_new: int
  flops_ratio: float
  rows: int  # the eval batches' shape, reused for the greedy rows when they fit (one compile)
  length: int
  prompt_images: list | None = None  # per prompt: its images or None (`prompts_from_batches`)
  slots: tuple[int, int, int] | None = None  # the eval batches' image slots (i, p, c)
  last_continuations: list = dataclasses.field(default_factory=list)
  cost_ratio: float = 0.0  # `eval.cost_ratio`: c of the serving hardware (0: the measured one)
  measured_cost_ratio: float | None = None  # measured once, at the first eval with prompts

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
                            self.base_cfg, self.dcfg, self.jcfg, eval_fn=self.eval_fn,
                            batch_size=self.rows, length=self.length,
                            images=self.prompt_images if self.slots else None, slots=self.slots)
      out.update(g["metrics"])
      conts = self.last_continuations = g["continuations"]
      out["eval/greedy/expected_speedup"] = expected_speedup(
          out["eval/greedy/tokens_per_round"], self.jcfg.num_draft_steps, self.flops_ratio)
      out.update(self._advice(params, buffers, out))
    out["eval/flops_ratio"] = self.flops_ratio
    return {k[len("eval/"):]: v for k, v in out.items()}, conts


  def _advice(self, params, buffers, out: dict) -> dict:
    """Draft-length advice (`advice_metrics`) from the walk's rates; c is measured once."""
    k = self.jcfg.num_draft_steps
    if self.measured_cost_ratio is None:
      self.measured_cost_ratio = measure_cost_ratio(
          decode_pair(params, buffers, self.base_cfg, self.dcfg), self.prompts[0], k,
          self.num_new, self.jcfg.draft_query_position,
          images=self.prompt_images[0] if self.slots else None)
    rates = [out[f"eval/greedy/decode/rate_{j}"] for j in range(1, k + 1)]
    return advice_metrics(rates, self.measured_cost_ratio, self.cost_ratio)


def make_evaluator(base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig,
                   jcfg: TrainConfig, eval_batches: list, prompts: list, stop_ids: list,
                   num_new: int, batch_sharding, rows: int, length: int,
                   cost_ratio: float = 0.0, prompt_images: list | None = None) -> Evaluator:
  """The trainer's held-out eval: call it with (params, buffers) -> (metrics, continuations).
  `cost_ratio`: `eval.cost_ratio` (0: advise the draft length with the c measured here);
  `prompt_images`: the prompts' images (`prompts_from_batches`), for image data."""
  slots = None
  if eval_batches and "pixel_values" in eval_batches[0]:
    i, p, c = eval_batches[0]["pixel_values"].shape[1:]
    slots = (int(i), int(p), int(c))
  return Evaluator(make_eval_step(base_cfg, dcfg, jcfg), batch_sharding, base_cfg, dcfg, jcfg,
                   eval_batches, prompts, stop_ids, num_new, flops.flops_ratio(base_cfg, dcfg),
                   rows, length, cost_ratio=cost_ratio, prompt_images=prompt_images, slots=slots)
