"""Plain and speculative decoding of the base with its assistant drafter: one jitted loop for both.

Two compiled programs per (batch, prompt bucket, cache size, K, max_new_tokens, sampling): `prefill`
(one base forward over the left-padded prompt, filling a `KVCache`) and `decode` (a `lax.while_loop`
over rounds; no host round-trip per token). Plain decoding is the same loop with K = 0 drafts.
Prompts with images: the prefill also takes the rows' image slots (`inputs.image_inputs`: their
shapes, slot count bucketed, key its program); the drafter then reads the base's K/V of the image
positions from the cache like any other.

State per row between rounds (p = the last position whose K/V is in the cache):
  cache      the prompt and every emitted token but the newest (`length_B` slots)
  hidden_BM  the base's final-norm hidden at p (it produced `token_B`)
  token_B    x_{p+1}: emitted, not yet in the cache
A round:
  1. the drafter proposes d_1..d_K from (store-layer K/V of the cache, hidden_BM, token_B, p);
  2. the base verifies [token, d_1..d_K] at positions p+1..p+K+1 in one forward (K+1 cache slots
     appended at each row's own offset);
  3. greedy: n = the number of leading d_j equal to the base's argmax at j-1; the bonus is the
     argmax at n. Sampling: d_j is kept with probability min(1, p_j(d_j) / q_j(d_j)) while all
     earlier ones were; the first rejected one is replaced by a sample of norm(max(p - q, 0)) (with
     all K kept, the bonus is sampled from p) -- Leviathan et al. 2023 / Chen et al. 2023, so the
     output is distributed exactly as plain sampling from the base;
  4. each row emits d_1..d_n and the bonus into its own place of a fixed [B, max_new] buffer, its
     cache is rolled back to length + n + 1 (token and the kept drafts; the bonus is the next
     round's token), and hidden/token/p move to position p + n + 1.
Rows accept different n, so lengths, positions and offsets are per row. A row is done once it emits
a stop token (later tokens of the round are dropped) or max_new tokens; done rows still ride along
in the batched forwards but neither emit nor advance, so their cache never grows past its size.

Greedy output equals plain greedy decoding token for token, up to float rounding between a
(K+1)-token verify forward and 1-token steps, which could only flip an exact near-tie of two logits.

Padding: LEFT. Prompts are right-aligned in a [B, Q] block, Q the longest prompt rounded up to
`prompt_bucket`; pad slots are invalid (never attended) and positions count real tokens only, so a
row's RoPE positions do not depend on its padding, and every row's last prompt token sits in column
Q - 1 (its logits start decoding). The cache needs Q + max_new + K + 1 slots (the last round's
verify may write K + 1 slots past the last kept one, and `kv_cache`'s write would silently clamp at
the end), so the size is checked against the limit up front and rounded up to CACHE_BUCKET.

Sampling filters (temperature, top-k, top-p) are one function (`sampling.log_probs`) applied identically to
the base's p and the drafter's q, and the drafter samples its drafts from that same q.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp_jax.decoding import inputs as inputs_lib
from gemma_mtp_jax.decoding.inputs import bucket, check_request, pad_left  # re-exported
from gemma_mtp_jax.decoding.sampling import (  # re-exported: callers use speculative.Sampling
    GenerateError, Sampling, choose, log_probs, sample)
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import drafter as drafter_lib
from gemma_mtp_jax.model import kv_cache as kv_cache_lib
from gemma_mtp_jax.model import transformer

Array = jax.Array

CACHE_BUCKET = 16  # cache lengths are rounded up to a multiple of this (fewer programs)


# ------------------------------------------------------------------------------ state
@flax.struct.dataclass
class DecodeState:
  """Everything the decode loop carries (see the module docstring). R = max rounds, O = max_new,
  A = K draft steps."""

  cache: kv_cache_lib.KVCache
  last_pos_B: Array  # int32 p: last position in the cache
  hidden_BM: Array  # base final-norm hidden at p
  token_B: Array  # int32 x_{p+1}, emitted, not in the cache
  out_BO: Array  # int32 emitted tokens, pad_token_id past num_out_B
  num_out_B: Array  # int32
  done_B: Array  # bool
  stop_ids: Array  # int32 stop token ids, -1 padded
  rng: Array
  round: Array  # int32 scalar: rounds run so far
  forwards_B: Array  # int32 base forwards (rounds) each row took part in, after prefill
  accepted_B: Array  # int32 drafts accepted (summed over rounds; before stop/max_new truncation)
  # Per-round logs, allocated by `decode` (None after `prefill`, which does not depend on K).
  drafts_RBA: Array | None = None  # int32 drafted tokens of each round
  accepted_RB: Array | None = None  # int32 drafts accepted per round; -1 where the row was done


def store_kv_of(cfg: config_lib.ModelConfig,
                cache: kv_cache_lib.KVCache) -> dict[str, transformer.StoreKV]:
  """The drafter's view of the cache: store-layer K/V with slot positions and attendability."""
  valid_BS = cache.attend_mask()
  return {lt: transformer.StoreKV(cache.k[i], cache.v[i], cache.positions_BS, valid_BS)
          for lt, i in cfg.store_layers.items()}


# ------------------------------------------------------------------------------ proposers
@dataclasses.dataclass(frozen=True)
class DrafterProposer:
  """Drafts K tokens per row with the assistant (`drafter.draft`, a `lax.scan` over K steps).

  `aux` for it is {"drafter": drafter variables}; the base's embedding comes from the base params.
  Returns (drafts [B, A] int32, log q [B, A, V] of the filtered drafter distribution, or None when
  greedy).
  """

  cfg: config_lib.DrafterConfig
  query_position: str = "next"

  def __call__(self, aux, base_params, base_cfg, state: DecodeState, num_draft_steps: int,
               sampling: Sampling, rng: Array):
    sample_fn = (drafter_lib.greedy if sampling.greedy
                 else lambda logits_BV, key: choose(logits_BV, sampling, key))
    out = drafter_lib.draft(
        aux["drafter"], self.cfg, base_params["embedding"], store_kv_of(base_cfg, state.cache),
        state.hidden_BM, state.token_B, state.last_pos_B, num_draft_steps, sample_fn,
        query_position=self.query_position, rng=None if sampling.greedy else rng)
    logq_BAV = None if sampling.greedy else log_probs(out.logits, sampling)
    return out.tokens, logq_BAV


# ------------------------------------------------------------------------------ programs
def _model(cfg: config_lib.ModelConfig) -> transformer.Transformer:
  return transformer.Transformer(cfg)


def prefill_positions(valid_BQ: Array) -> Array:
  """RoPE positions of a left-padded prompt: real tokens count 0, 1, ...; pads get 0."""
  return jnp.maximum(jnp.cumsum(valid_BQ.astype(jnp.int32), axis=1) - 1, 0)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_length", "max_new", "sampling"))
def prefill(params, prompt_BQ: Array, valid_BQ: Array, stop_ids: Array, rng: Array,
            images=None, image_soft=None, *, cfg: config_lib.ModelConfig, cache_length: int,
            max_new: int, sampling: Sampling) -> DecodeState:
  """Base forward over the prompt into a fresh cache; the first new token is chosen from the last
  column's logits (left padding puts every row's last prompt token there). stop_ids: stop token ids,
  padded with -1 (an array, so stop sets of one size share the programs). images / image_soft: the
  rows' image slots (`inputs.image_inputs`), or None; only the prefill sees them (decode steps
  are text, attended causally, as in HF's `generate`)."""
  b, _ = prompt_BQ.shape
  pos_BQ = prefill_positions(valid_BQ)
  cache = kv_cache_lib.init_cache(cfg, b, cache_length)
  out = _model(cfg).apply({"params": params}, prompt_BQ, pos_BQ, valid_BQ, cache=cache,
                          return_logits=False, images=images, image_soft=image_soft)
  hidden_BM = out.hidden[:, -1]
  # Logits of the last column only: the prompt's other V-wide logits would be wasted work.
  logits_BV = _model(cfg).apply({"params": params}, hidden_BM[:, None],
                                method=transformer.Transformer.logits)[:, 0]
  rng, key = jax.random.split(rng)
  token_B = choose(logits_BV, sampling, key)
  out_BO = jnp.full((b, max_new), cfg.pad_token_id, jnp.int32).at[:, 0].set(token_B)
  done_B = jnp.isin(token_B, stop_ids) | (max_new <= 1)
  zeros_B = jnp.zeros((b,), jnp.int32)
  return DecodeState(
      cache=out.cache, last_pos_B=pos_BQ[:, -1], hidden_BM=hidden_BM, token_B=token_B,
      out_BO=out_BO, num_out_B=zeros_B + 1, done_B=done_B, stop_ids=stop_ids, rng=rng,
      round=jnp.zeros((), jnp.int32), forwards_B=zeros_B, accepted_B=zeros_B)


def accept(logits_BJV: Array, drafts_BA: Array, logq_BAV: Array | None, sampling: Sampling,
           rng: Array) -> tuple[Array, Array]:
  """Verifies K drafts against the base's logits at J = K + 1 positions.

  logits_BJV[:, j] is the base's prediction after [token, d_1..d_j]; logq_BAV the drafter's filtered
  log-probs (None when greedy). Returns (n [B]: drafts accepted, next [B]: the token after them --
  the base's bonus, or the correction sampled from norm(max(p - q, 0)) at the first rejection).
  """
  b, k = drafts_BA.shape
  if k == 0:  # plain decoding
    return jnp.zeros((b,), jnp.int32), choose(logits_BJV[:, 0], sampling, rng)
  if sampling.greedy:
    target_BJ = jnp.argmax(logits_BJV, axis=-1).astype(jnp.int32)
    ok_BA = drafts_BA == target_BJ[:, :k]
    n_B = jnp.sum(jnp.cumprod(ok_BA.astype(jnp.int32), axis=1), axis=1)
    return n_B, jnp.take_along_axis(target_BJ, n_B[:, None], axis=1)[:, 0]
  k_acc, k_res = jax.random.split(rng)
  p_BJV = jnp.exp(log_probs(logits_BJV, sampling))
  q_BAV = jnp.exp(logq_BAV)
  p_d_BA = jnp.take_along_axis(p_BJV[:, :k], drafts_BA[..., None], axis=-1)[..., 0]
  q_d_BA = jnp.take_along_axis(q_BAV, drafts_BA[..., None], axis=-1)[..., 0]
  u_BA = jax.random.uniform(k_acc, (b, k))
  ok_BA = u_BA * q_d_BA < p_d_BA  # u < p / q, without dividing by a q that may underflow
  n_B = jnp.sum(jnp.cumprod(ok_BA.astype(jnp.int32), axis=1), axis=1)
  # Position n: residual of p against the rejected draft's q; past the last draft q is 0, so the
  # bonus is sampled from p.
  q_pad_BJV = jnp.concatenate([q_BAV, jnp.zeros_like(q_BAV[:, :1])], axis=1)
  p_n_BV = jnp.take_along_axis(p_BJV, n_B[:, None, None], axis=1)[:, 0]
  q_n_BV = jnp.take_along_axis(q_pad_BJV, n_B[:, None, None], axis=1)[:, 0]
  resid_BV = jnp.maximum(p_n_BV - q_n_BV, 0.0)
  # p == q makes a rejection impossible; only rounding can get here with an all-zero residual.
  mass_B1 = jnp.sum(resid_BV, axis=-1, keepdims=True)
  next_B = sample(k_res, jnp.where(mass_B1 > 1e-12, resid_BV, p_n_BV))
  return n_B, next_B


def _round(state: DecodeState, params, aux, *, cfg, propose, num_draft, max_new,
           sampling) -> DecodeState:
  """One draft + verify + accept round for every row (done rows ride along inactive)."""
  b, k = state.token_B.shape[0], num_draft
  rng, k_draft, k_acc = jax.random.split(state.rng, 3)
  active_B = ~state.done_B
  if k:
    drafts_BA, logq_BAV = propose(aux, params, cfg, state, k, sampling, k_draft)
  else:
    drafts_BA, logq_BAV = jnp.zeros((b, 0), jnp.int32), None
  tokens_BJ = jnp.concatenate([state.token_B[:, None], drafts_BA], axis=1)
  j_J = jnp.arange(k + 1, dtype=jnp.int32)
  pos_BJ = state.last_pos_B[:, None] + 1 + j_J
  out = _model(cfg).apply({"params": params}, tokens_BJ, pos_BJ, cache=state.cache)
  n_B, next_B = accept(out.logits, drafts_BA, logq_BAV, sampling, k_acc)

  # Emitted this round: d_1..d_n then next; truncated at the first stop token and at max_new.
  drafts_pad_BJ = jnp.concatenate([drafts_BA, jnp.zeros((b, 1), jnp.int32)], axis=1)
  emit_BJ = jnp.where(j_J < n_B[:, None], drafts_pad_BJ, next_B[:, None])
  slot_BJ = state.num_out_B[:, None] + j_J
  live_BJ = active_B[:, None] & (j_J <= n_B[:, None]) & (slot_BJ < max_new)
  stop_BJ = live_BJ & jnp.isin(emit_BJ, state.stop_ids)
  stopped_B = jnp.any(stop_BJ, axis=1)
  first_stop_B = jnp.argmax(stop_BJ, axis=1)
  keep_BJ = live_BJ & (~stopped_B[:, None] | (j_J <= first_stop_B[:, None]))
  # Dropped tokens write out of bounds (mode="drop") instead of being branched around.
  rows_BJ = jnp.broadcast_to(jnp.arange(b)[:, None], slot_BJ.shape)
  out_BO = state.out_BO.at[rows_BJ, jnp.where(keep_BJ, slot_BJ, max_new)].set(emit_BJ, mode="drop")
  num_out_B = state.num_out_B + jnp.sum(keep_BJ, axis=1, dtype=jnp.int32)
  done_B = state.done_B | stopped_B | (num_out_B >= max_new)

  # Rows still going keep token + d_1..d_n in the cache; the others stay where they were, so their
  # later (ignored) verify writes never run past the cache.
  advance_B = active_B & ~done_B
  length_B = jnp.where(advance_B, state.cache.length_B + n_B + 1, state.cache.length_B)
  hidden_BM = jnp.take_along_axis(out.hidden, n_B[:, None, None], axis=1)[:, 0]
  r = state.round
  return state.replace(
      cache=out.cache.rollback(length_B),
      last_pos_B=jnp.where(advance_B, state.last_pos_B + n_B + 1, state.last_pos_B),
      hidden_BM=jnp.where(advance_B[:, None], hidden_BM.astype(state.hidden_BM.dtype),
                          state.hidden_BM),
      token_B=jnp.where(advance_B, next_B, state.token_B),
      out_BO=out_BO, num_out_B=num_out_B, done_B=done_B, rng=rng, round=r + 1,
      forwards_B=state.forwards_B + active_B,
      accepted_B=state.accepted_B + jnp.where(active_B, n_B, 0),
      drafts_RBA=state.drafts_RBA.at[r].set(drafts_BA, mode="drop"),
      accepted_RB=state.accepted_RB.at[r].set(jnp.where(active_B, n_B, -1), mode="drop"))


@functools.partial(jax.jit, static_argnames=("cfg", "propose", "num_draft", "max_new", "sampling"),
                   donate_argnames=("state",))
def decode(params, aux, state: DecodeState, *, cfg: config_lib.ModelConfig, propose,
           num_draft: int, max_new: int, sampling: Sampling) -> DecodeState:
  """Rounds until every row is done (`lax.while_loop`: one program for the whole generation)."""
  body = functools.partial(_round, params=params, aux=aux, cfg=cfg, propose=propose,
                           num_draft=num_draft, max_new=max_new, sampling=sampling)
  # Every round emits >= 1 token per live row and the prefill emitted the first one.
  num_rounds = max(max_new - 1, 1)
  b = state.token_B.shape[0]
  state = state.replace(drafts_RBA=jnp.zeros((num_rounds, b, num_draft), jnp.int32),
                        accepted_RB=jnp.full((num_rounds, b), -1, jnp.int32))
  return jax.lax.while_loop(lambda s: jnp.any(~s.done_B) & (s.round < num_rounds), body, state)


# ------------------------------------------------------------------------------ host API
@dataclasses.dataclass
class GenerateResult:
  """Host-side result of `decode_prompts`. Per row b: tokens[b] (new tokens, stop token included)."""

  tokens: list[list[int]]
  target_forwards: int  # base forward passes after prefill (loop rounds; rows may sit some out)
  forwards_per_row: list[int]
  drafted_per_row: list[int]
  accepted_per_row: list[int]
  rounds: list[list[dict]]  # per row, per round it took part in: {"drafted": ids, "accepted": n}
  prefill_seconds: float
  decode_seconds: float
  num_draft_tokens: int
  compile_seconds: float = 0.0

  @property
  def new_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  def row_stats(self, b: int = 0) -> dict:
    """The CLI's statistics for row b. mean_accepted_length: tokens the decode loop emitted per base
    forward (the prefill's first token excluded; 1.0 for plain decoding)."""
    fwd = self.forwards_per_row[b]
    decoded = max(len(self.tokens[b]) - 1, 0)
    return dict(
        target_forwards=fwd, draft_rounds=fwd if self.num_draft_tokens else 0,
        drafted=self.drafted_per_row[b], accepted=self.accepted_per_row[b],
        mean_accepted_length=decoded / fwd if fwd else 0.0)

  def acceptance(self, b: int | None = None) -> dict:
    """Per-position acceptance of row b's rounds (every row's: None): `acceptance_rates`."""
    rows = range(len(self.rounds)) if b is None else [b]
    return acceptance_rates([r["accepted"] for i in rows for r in self.rounds[i]],
                            self.num_draft_tokens)

  @property
  def tokens_per_second(self) -> float:
    """New tokens (all rows) per second of prefill + decode."""
    t = self.prefill_seconds + self.decode_seconds
    return self.new_tokens / t if t > 0 else float("inf")


def acceptance_rates(accepted_R: Sequence[int], num_draft: int) -> dict:
  """Per draft position k = 1..num_draft, from the drafts accepted in each round (R rounds):
  "rate" P(accepted >= k), the fraction of rounds whose first k drafts were all kept, and "alpha"
  P(accepted >= k | accepted >= k - 1), draft k's acceptance given it was reached (0 when no
  round reached it). Tokens per target forward = 1 + sum_k rate_k (before stop/max_new cuts)."""
  acc_R = np.asarray(accepted_R, np.int64)
  rate = [float(np.mean(acc_R >= k)) if acc_R.size else 0.0 for k in range(1, num_draft + 1)]
  prev = [1.0 if acc_R.size else 0.0] + rate[:-1]
  return dict(rate=rate, alpha=[r / p if p > 0 else 0.0 for r, p in zip(rate, prev)])


def decode_prompts(base_params, base_cfg: config_lib.ModelConfig, prompts: Sequence[Sequence[int]], *,
             drafter_vars=None, drafter_cfg: config_lib.DrafterConfig | None = None,
             num_draft_tokens: int = 4, max_new_tokens: int = 64,
             sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = (), seed: int = 0,
             query_position: str = "next", prompt_bucket: int = 16,
             max_cache_length: int | None = None, propose: Callable | None = None,
             aux: Any = None, images: Sequence | None = None,
             image_soft: Sequence | None = None) -> GenerateResult:
  """Decodes up to `max_new_tokens` per prompt; speculative with a drafter, plain without. THE
  decoder: `python -m gemma_mtp_jax.generate`, the trainer's greedy eval and the decode benchmark
  all run it.

  Args:
    base_params: base Flax params (loop layout, see `decode_params`).
    prompts: B lists of token ids (any lengths; left-padded to a multiple of `prompt_bucket`).
    drafter_vars / drafter_cfg: the assistant; None for plain decoding.
    num_draft_tokens: K drafts per round (ignored without a drafter).
    sampling: greedy (default) or temperature / top-k / top-p.
    stop_tokens: ids that end a row (the stop token is emitted).
    seed: the sampling rng (rows draw independent numbers from it).
    query_position: the drafter's query RoPE position, "next" (HF) or "anchor"; use what it was
      trained with.
    max_cache_length: refuse requests needing more cache slots (default: max_position_embeddings).
    propose / aux: a custom proposer (tests) with its pytree of arrays; default the drafter.
    images: per prompt None or its image slots (pixel_values_ipc, pixel_positions_ip2) as HF's
      image processor gives them; image_soft: the same as soft tokens (soft_isD, valid_is).
  Returns:
    GenerateResult. Compilation happens before the clock starts (`compile_seconds`, 0 when the
    programs were already compiled), so the timings are steady-state ones.
  """
  speculative = drafter_cfg is not None or propose is not None
  if speculative and num_draft_tokens < 1:
    raise GenerateError(f"--num-draft-tokens (K) must be >= 1 for speculative decoding, got "
                        f"{num_draft_tokens}")
  if propose is None and drafter_cfg is not None:
    propose = DrafterProposer(drafter_cfg, query_position)
    aux = {"drafter": drafter_vars}
  k = num_draft_tokens if speculative else 0
  p_len = bucket(max((len(p) for p in prompts), default=0), prompt_bucket)
  needed = check_request(base_cfg, prompts, drafter_cfg=drafter_cfg, num_draft=k,
                         max_new_tokens=max_new_tokens, prompt_length=p_len,
                         max_cache_length=max_cache_length)
  # Rounded up so that nearby K / max_new share programs; never past the limit.
  cache_length = min(bucket(needed, CACHE_BUCKET),
                     max_cache_length or base_cfg.max_position_embeddings)
  tokens_BQ, valid_BQ = pad_left(prompts, p_len, base_cfg.pad_token_id)
  stop = sorted({int(t) for t in stop_tokens})
  stop_ids = np.full(bucket(max(len(stop), 1), 4), -1, np.int32)
  stop_ids[:len(stop)] = stop
  slots = inputs_lib.image_inputs(base_cfg, prompts, images, image_soft)
  args = (base_params, jnp.asarray(tokens_BQ), jnp.asarray(valid_BQ), jnp.asarray(stop_ids),
          jax.random.PRNGKey(seed), *jax.tree.map(jnp.asarray, slots))

  compile_s = 0.0
  run_prefill, dt = _compiled(prefill, args, cfg=base_cfg, cache_length=cache_length,
                              max_new=max_new_tokens, sampling=sampling)
  compile_s += dt
  run_decode, dt = _compiled(decode, (base_params, aux, run_prefill.out_info), cfg=base_cfg,
                             propose=propose, num_draft=k, max_new=max_new_tokens,
                             sampling=sampling)
  compile_s += dt
  t0 = time.perf_counter()
  state = jax.block_until_ready(run_prefill(*args))
  t1 = time.perf_counter()
  state = jax.block_until_ready(run_decode(base_params, aux, state))
  t2 = time.perf_counter()
  result = _result(jax.device_get(state), k, t1 - t0, t2 - t1)
  result.compile_seconds = compile_s
  return result


# The compiled decode programs, least recently used first. Bounded: a long-lived process (a server,
# a test session) that decodes many shapes would otherwise keep every executable it ever built.
_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()
_MAX_EXECUTABLES = 32
_COMPILES: collections.Counter = collections.Counter()


def compiled_programs() -> collections.Counter:
  """How many executables each decode program ("prefill", "decode") has compiled in this process,
  one per (shapes, options) set: a request that reuses them compiles nothing (`_compiled` is the
  only way the programs are compiled). XLA compiles of everything else: `utils.compiles`."""
  return collections.Counter(_COMPILES)


def clear_executables() -> None:
  """Drops the cached decode executables (the compile counts stay)."""
  _EXECUTABLES.clear()


def _compiled(fn, args, **static):
  """(`fn` lowered and compiled for these argument shapes and static options, seconds spent
  compiling: 0 when cached). The newest `_MAX_EXECUTABLES` executables are kept."""
  leaves, treedef = jax.tree.flatten(args)
  # The shardings too: the trainer's eval decodes with params laid out on its mesh.
  key = (fn.__name__, treedef,
         tuple((x.shape, jnp.dtype(x.dtype), getattr(x, "sharding", None)) for x in leaves),
         tuple(sorted(static.items())))
  exe = _EXECUTABLES.get(key)
  if exe is not None:
    _EXECUTABLES.move_to_end(key)
    return exe, 0.0
  t0 = time.perf_counter()
  exe = _EXECUTABLES[key] = fn.lower(*args, **static).compile()
  _COMPILES[fn.__name__] += 1
  while len(_EXECUTABLES) > _MAX_EXECUTABLES:
    _EXECUTABLES.popitem(last=False)
  return exe, time.perf_counter() - t0


def _result(state: DecodeState, k: int, prefill_s: float, decode_s: float) -> GenerateResult:
  out_BO, n_B = np.asarray(state.out_BO), np.asarray(state.num_out_B)
  acc_RB, drafts_RBA = np.asarray(state.accepted_RB), np.asarray(state.drafts_RBA)
  rounds = int(state.round)
  b_rows = out_BO.shape[0]
  per_round = [[{"drafted": drafts_RBA[r, b].tolist(), "accepted": int(acc_RB[r, b])}
                for r in range(min(rounds, acc_RB.shape[0])) if acc_RB[r, b] >= 0]
               for b in range(b_rows)] if k else [[] for _ in range(b_rows)]
  fwd = np.asarray(state.forwards_B)
  return GenerateResult(
      tokens=[out_BO[b, :n_B[b]].tolist() for b in range(b_rows)],
      target_forwards=rounds, forwards_per_row=fwd.tolist(),
      drafted_per_row=(fwd * k).tolist(), accepted_per_row=np.asarray(state.accepted_B).tolist(),
      rounds=per_round, prefill_seconds=prefill_s, decode_seconds=decode_s, num_draft_tokens=k)


def decode_params(cfg: config_lib.ModelConfig, params) -> tuple[config_lib.ModelConfig, Any]:
  """(cfg, params) in the layout decoding uses: unboxed, loop layout, no scan, no remat."""
  params = nn.unbox(params)
  if any(str(k).startswith("scan_") for k in params):
    params = transformer.unstack_layer_params(cfg, params)
  return cfg.replace(scan_layers=False, remat_policy="none"), params


def decode_drafter(cfg: config_lib.DrafterConfig, variables) -> tuple[config_lib.DrafterConfig,
                                                                     Any]:
  """(cfg, variables) of the drafter for decoding: unboxed, no remat."""
  return cfg.replace(text=cfg.text.replace(remat_policy="none")), nn.unbox(variables)
