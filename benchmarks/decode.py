"""Decode benchmark: plain vs speculative JAX decoding and HF torch assisted generation.

  python -m benchmarks decode [--workdir runs/tiny] [--batch 1,4] [--k 1,2,3,4,6,8]
      [--temperature 0,1] [--max-new-tokens 128] [--prompts 4] [--repeats 3] [--no-random] [--no-hf]
      [--out DIR]

Pairs: the one trained by the embedded default run (`--workdir`, JAX checkpoint; HF side from
its export WORKDIR/hf, or a fresh export to a temp dir) and a random pair of the same preset
(fan-in scaled random weights: the cost of the machinery when drafts are almost never right).
Prompts: held-out chat prompts of the local corpus (the trainer's split), random ids for the
random pair. Every prompt is generated to exactly --max-new-tokens (no stop tokens), so all systems
produce the same amount.

Per (pair, batch B, temperature T, K), plain and speculative timed interleaved in the same process:
  plain / spec         JAX decode-loop tokens per second (the prefill and its first token excluded;
                       compilation excluded), min over --repeats; speedup = spec / plain
  E                    new tokens per base forward of the speculative loop (accepted drafts + 1 per
                       round; rows of a batch counted per row)
  c                    one drafter step / one plain base step (T = 1), both timed in jitted loops
  v                    one verify forward over K + 1 tokens / one plain base step
  ideal                Leviathan et al.'s E / (K c + 1): the speedup if verifying K + 1 tokens cost
                       what one token costs (memory-bound decoding); %ideal = speedup / ideal
  model                E / (K c + v): the speedup these measured costs allow on this machine;
                       %model = speedup / model (what the loop's own overhead leaves of it)
  plain_ms, round_ms   ms per plain step and per speculative round;
  draft, verify, other where a round's ms go: K drafter steps, the verify forward, the rest
  hf_plain / hf_spec   HF torch `generate` (and with `assistant_model`, K constant) decode tok/s on
                       the same exported pair ((n - 1) tokens over time(n) - time(1)); hf_x their
                       ratio. HF assisted generation is batch 1 only ("-" at B > 1); jax/hf =
                       JAX spec tok/s over HF spec tok/s
XLA (unless --xla-threads multi) and torch (unless --threads) run single-threaded.
Results: a table on stdout, OUT/bench_decode.json and OUT/bench_decode.png (speedup vs K).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Sequence

import numpy as np


def _ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
  return [float(x) for x in s.split(",") if x]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m benchmarks decode",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/tiny", help="train workdir of the trained pair")
  p.add_argument("--hf-dir", help="exported HF pair (base/, drafter/); default WORKDIR/hf")
  p.add_argument("--config", default="tiny", help="preset of the random pair")
  p.add_argument("--no-trained", action="store_true", help="skip the trained pair")
  p.add_argument("--no-random", action="store_true", help="skip the random pair")
  p.add_argument("--batch", type=_ints, default=[1, 4])
  p.add_argument("--k", type=_ints, default=[1, 2, 3, 4, 6, 8])
  p.add_argument("--temperature", type=_floats, default=[0.0, 1.0])
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--prompts", type=int, default=4, help="prompts per measurement (batch 1: one "
                 "after the other; batch B: the first B together)")
  p.add_argument("--max-prompt-len", type=int, default=48)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--no-hf", action="store_true", help="skip HF torch")
  p.add_argument("--hf-repeats", type=int, default=1)
  p.add_argument("--threads", type=int, default=1,
                 help="torch threads (0: torch default; 1 by default: on a small shared CPU extra "
                      "OpenMP threads only add contention and noise)")
  p.add_argument("--xla-threads", choices=("single", "multi"), default="single",
                 help="XLA:CPU Eigen thread pool for matmuls (single by default, like torch: "
                      "the small matmuls of decoding gain nothing from threads here)")
  p.add_argument("--out", help="output dir (default WORKDIR/bench_decode, or runs/bench_decode)")
  p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
  return p


# ------------------------------------------------------------------------------ pairs and prompts
def fill_random(shapes, seed: int = 0, amp: float = 1.0):
  """Random arrays for a tree of ShapeDtypeStructs: norm scales 1 +- 0.2, fan-in scaled matrices
  (embedding rows of norm ~amp), zeros for integer leaves. Unlike the near-zero init, logits come
  out spread, so greedy output is not one repeated token that any drafter guesses."""
  import jax
  import jax.numpy as jnp

  flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)

  def rand(path, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return np.zeros(x.shape, x.dtype)
    if x.ndim == 1:
      return 1.0 + 0.2 * rng.standard_normal(x.shape, np.float32)
    fan = x.shape[-1] if "embedding" in jax.tree_util.keystr(path) else int(np.prod(x.shape[:-1]))
    return amp * rng.standard_normal(x.shape, np.float32) / np.float32(np.sqrt(fan))

  return jax.tree.unflatten(tree, [jnp.asarray(rand(p, x)) for p, x in flat])


def random_pair(preset: str, seed: int = 0) -> dict:
  """A pair of `preset` with `fill_random` weights, in decoding layout (a `request.load` dict)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from gemma_mtp_jax.model import drafter as drafter_lib
  from gemma_mtp_jax import presets
  from gemma_mtp_jax.decoding import speculative
  from gemma_mtp_jax.model import transformer

  base_cfg, dcfg = presets.model_configs(presets.load_config(preset))
  params = fill_random(nn.unbox(jax.eval_shape(lambda r: transformer.init_params(base_cfg, r),
                                               jax.random.PRNGKey(0))), seed)
  dshapes = nn.unbox(jax.eval_shape(lambda r: drafter_lib.init_variables(dcfg, r),
                                    jax.random.PRNGKey(0)))
  dvars = {"params": fill_random(dshapes["params"], seed + 1)}
  if dcfg.use_ordered_embeddings:
    perm = np.random.default_rng(seed).permutation(dcfg.text.vocab_size)
    dvars["buffers"] = {"token_ordering": jnp.asarray(perm, jnp.int32)}
  base_cfg, params = speculative.decode_params(base_cfg, params)
  dcfg, dvars = speculative.decode_drafter(dcfg, dvars)
  return dict(name="random", base_cfg=base_cfg, params=params, drafter_cfg=dcfg,
              drafter_vars=dvars, tokenizer=None, query_position="next", pair=None)


def trained_pair(workdir: str) -> dict:
  from gemma_mtp_jax.decoding import request
  loaded = request.load(workdir)
  if loaded["drafter_cfg"] is None:
    raise SystemExit(f"{workdir}: the checkpoint has no drafter")
  loaded.update(name="trained", query_position=request.default_query_position(loaded))
  return loaded


def heldout_prompts(tokenizer, n: int, max_len: int) -> list[list[int]]:
  """The first `n` held-out chat prompts (the default run's eval split) of at most `max_len`
  tokens: each example's tokens up to its first model-turn token, as the trainer's eval uses."""
  from gemma_mtp_jax.data import pipeline as data

  dcfg = data.default_data_config()
  out = []
  for spec in dcfg.sources:
    source = data.load_source(dict(spec))
    _, held = data.split_source(source, float(dcfg.eval_fraction))
    for i in range(len(held)):
      doc = held.encode(i, tokenizer)
      first = int(np.argmax(doc["loss_mask"]))
      if 0 < first <= max_len:
        out.append(doc["tokens"][:first].astype(int).tolist())
      if len(out) >= n:
        return out
  if not out:
    raise SystemExit("no held-out prompt fits --max-prompt-len")
  return (out * n)[:n]


def random_prompts(vocab: int, n: int, max_len: int, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [[2] + rng.integers(3, vocab, int(rng.integers(max_len // 2, max_len))).tolist()
          for _ in range(n)]


# ------------------------------------------------------------------------------ JAX timings
def _generate(pair: dict, prompts, k: int, n: int, temperature: float, bucket: int, seed: int = 0):
  from gemma_mtp_jax.decoding import speculative
  kw = dict(max_new_tokens=n, sampling=speculative.Sampling(temperature), seed=seed,
            prompt_bucket=bucket)
  if k:
    kw.update(drafter_vars=pair["drafter_vars"], drafter_cfg=pair["drafter_cfg"],
              num_draft_tokens=k, query_position=pair["query_position"])
  return speculative.decode_prompts(pair["params"], pair["base_cfg"], prompts, **kw)


def measure(pair: dict, prompts: list[list[int]], batch: int, ks: Sequence[int], n: int,
            temperature: float, repeats: int, bucket: int) -> dict[int, dict]:
  """Decode-loop tokens/s and acceptance for each K in `ks` (0: plain), min time over `repeats`.

  The configurations are timed interleaved (plain, spec, plain, spec, ...), so a change in machine
  load hits both sides of a ratio alike.
  """
  groups = [prompts[i:i + 1] for i in range(len(prompts))] if batch == 1 else [prompts[:batch]]
  best: dict = {}
  for g, group in enumerate(groups):
    for k in ks:
      _generate(pair, group, k, n, temperature, bucket, seed=g)  # compile + warm up
    for _ in range(repeats):
      for k in ks:
        r = _generate(pair, group, k, n, temperature, bucket, seed=g)
        if (k, g) not in best or r.decode_seconds < best[k, g].decode_seconds:
          best[k, g] = r
  out = {}
  for k in ks:
    rs = [best[k, g] for g in range(len(groups))]
    decode_s = sum(r.decode_seconds for r in rs)
    tokens = sum(len(t) - 1 for r in rs for t in r.tokens)  # the prefill's token is not the loop's
    row_forwards = sum(sum(r.forwards_per_row) for r in rs)
    rounds = sum(r.target_forwards for r in rs)
    accepted = sum(sum(r.accepted_per_row) for r in rs)
    out[k] = dict(tokens_per_s=tokens / decode_s, decode_s=decode_s, tokens=tokens,
                  prefill_s=sum(r.prefill_seconds for r in rs), rounds=rounds,
                  ms_per_round=1e3 * decode_s / max(rounds, 1), E=tokens / max(row_forwards, 1),
                  acceptance=accepted / max(row_forwards * k, 1) if k else None)
  return out


def component_times(pair: dict, batch: int, ks: Sequence[int], prompt_len: int, n: int,
                    loops: int = 100, repeats: int = 5) -> dict:
  """Seconds of one plain base step (T = 1), one verify forward over K + 1 tokens and one drafter
  step (of a K-step draft), each timed as `loops` iterations inside one jitted loop on a cache
  filled like the benchmark's, so host dispatch is not counted. For each K the three are timed
  interleaved (min over `repeats`), so c and v are ratios of times taken under the same load."""
  import jax
  import jax.numpy as jnp

  from gemma_mtp_jax.model import drafter as drafter_lib
  from gemma_mtp_jax.model import kv_cache
  from gemma_mtp_jax.decoding import speculative
  from gemma_mtp_jax.model import transformer

  cfg, params = pair["base_cfg"], pair["params"]
  dcfg, dvars = pair["drafter_cfg"], pair["drafter_vars"]
  cache_len = speculative.bucket(prompt_len + n + max(ks) + 1, speculative.CACHE_BUCKET)
  model = transformer.Transformer(cfg)
  fill = prompt_len + n // 2  # a cache half way through the generation
  cache = kv_cache.init_cache(cfg, batch, cache_len)
  pos_BT = jnp.broadcast_to(jnp.arange(fill), (batch, fill))
  cache = jax.jit(lambda p, c: model.apply({"params": p}, jnp.ones((batch, fill), jnp.int32),
                                           pos_BT, cache=c).cache)(params, cache)

  def compiled(fn, *args):
    f = jax.jit(fn)
    jax.block_until_ready(f(*args))  # compile + warm up
    return lambda: f(*args)

  def interleaved(*fns) -> list[float]:
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
      for i, f in enumerate(fns):
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        best[i] = min(best[i], time.perf_counter() - t0)
    return [b / loops for b in best]

  def verify(t):
    def run(p, c):
      def body(_, carry):
        c, tok_B = carry
        pos = c.length_B[:, None] + jnp.arange(t)
        out = model.apply({"params": p}, jnp.broadcast_to(tok_B[:, None], (batch, t)), pos,
                          cache=c)
        # The next iteration depends on this one, so XLA cannot hoist or drop it.
        return out.cache.rollback(c.length_B), jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)
      return jax.lax.fori_loop(0, loops, body, (c, jnp.ones((batch,), jnp.int32)))[1]
    return compiled(run, params, cache)

  def draft(k):
    def run(v, p, c):
      store = speculative.store_kv_of(cfg, c)

      def body(_, carry):
        tok_B, h_BM = carry
        # Always fill - 1 (tokens are >= 0), but not provably so: the masks and query RoPE that
        # depend on it are rebuilt every iteration, as in decoding, instead of hoisted.
        last_B = jnp.minimum(tok_B + fill - 1, fill - 1)
        d = drafter_lib.draft(v, dcfg, p["embedding"], store, h_BM, tok_B, last_B, k,
                              query_position=pair["query_position"])
        return d.tokens[:, -1], d.hidden[:, -1].astype(h_BM.dtype)
      h0 = jnp.zeros((batch, cfg.embed_dim), jnp.dtype(cfg.dtype))
      return jax.lax.fori_loop(0, loops, body, (jnp.ones((batch,), jnp.int32), h0))[0]
    return compiled(run, dvars, params, cache)

  step = verify(1)
  out = {"base_step_s": {}, "verify_s": {}, "draft_step_s": {}}
  for k in ks:
    base_s, verify_s, draft_s = interleaved(step, verify(k + 1), draft(k))
    out["base_step_s"][k], out["verify_s"][k] = base_s, verify_s
    out["draft_step_s"][k] = draft_s / k
  return out


# ------------------------------------------------------------------------------ HF timings
def export_for_hf(pair: dict, hf_dir: str | None) -> str:
  """An HF export (base/, drafter/) of the pair: `hf_dir` if it holds one, else written to a temp
  dir with `checkpoint.export_hf`."""
  from gemma_mtp_jax.checkpoint import pair as checkpoint

  if hf_dir and all(os.path.isfile(os.path.join(hf_dir, m, "config.json"))
                    for m in ("base", "drafter")):
    return hf_dir
  p = pair["pair"] or checkpoint.Pair(pair["base_cfg"], pair["drafter_cfg"],
                                      {"base": pair["params"], "drafter": pair["drafter_vars"]},
                                      None, dict(kind="memory", path=None, pair={}))
  out = os.path.join(tempfile.mkdtemp(prefix="bench_decode_"), "hf")
  return checkpoint.export_hf(p, out)


class HF:
  """HF torch base + assistant from an exported dir, timed with `generate`."""

  def __init__(self, hf_dir: str, threads: int = 0):
    import torch
    import transformers

    from gemma_mtp_jax import hf_torch

    if threads:
      torch.set_num_threads(threads)
    self.torch = torch
    # Both inside the patch: it also marks the store layers of bases that share no K/V (12B,
    # 26B-A4B, 31B), which transformers 5.23 reads only when the model is built.
    with hf_torch.hf_assistant_patch():
      self.base = transformers.AutoModelForCausalLM.from_pretrained(
          os.path.join(hf_dir, "base"), dtype=torch.float32).eval()
      self.assistant = transformers.AutoModelForCausalLM.from_pretrained(
          os.path.join(hf_dir, "drafter"), dtype=torch.float32).eval()
    self.patch = hf_torch.hf_assistant_patch

  def _run(self, ids, mask, n: int, k: int, temperature: float, seed: int) -> float:
    torch = self.torch
    # min_new_tokens: no early stop, every system generates exactly n tokens.
    kw = dict(attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
              pad_token_id=self.base.config.pad_token_id)
    if temperature > 0:
      kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
      kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    if k:
      self.assistant.generation_config.num_assistant_tokens = k
      self.assistant.generation_config.num_assistant_tokens_schedule = "constant"
      kw["assistant_model"] = self.assistant
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad(), self.patch():
      out = self.base.generate(ids, **kw)
    assert out.shape[1] - ids.shape[1] == n
    return time.perf_counter() - t0

  def measure(self, prompts, batch: int, k: int, n: int, temperature: float,
              repeats: int) -> dict | None:
    """Decode tok/s: (n - 1) new tokens per (time for n - time for 1), the prefill cancelling."""
    torch = self.torch
    if k and batch > 1:
      return None  # HF assisted generation supports batch size 1 only
    groups = [prompts[i:i + 1] for i in range(len(prompts))] if batch == 1 else [prompts[:batch]]
    tokens, secs = 0, 0.0
    for g, group in enumerate(groups):
      width = max(map(len, group))
      ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
      mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
      self._run(ids, mask, 2, k, temperature, g)  # warm-up
      t_n = min(self._run(ids, mask, n, k, temperature, g) for _ in range(repeats))
      t_1 = min(self._run(ids, mask, 1, k, temperature, g) for _ in range(repeats))
      tokens += (n - 1) * len(group)
      secs += max(t_n - t_1, 1e-9)
    return dict(tokens_per_s=tokens / secs)


# ------------------------------------------------------------------------------ report
COLUMNS = [("pair", "{}"), ("B", "{}"), ("T", "{:g}"), ("K", "{}"), ("plain", "{:.0f}"),
           ("spec", "{:.0f}"), ("speedup", "{:.2f}"), ("E", "{:.2f}"), ("c", "{:.2f}"),
           ("v", "{:.2f}"), ("ideal", "{:.2f}"), ("%ideal", "{:.0f}"), ("model", "{:.2f}"),
           ("%model", "{:.0f}"), ("plain_ms", "{:.2f}"), ("round_ms", "{:.2f}"),
           ("draft", "{:.2f}"), ("verify", "{:.2f}"), ("other", "{:.2f}"), ("hf_plain", "{:.0f}"),
           ("hf_spec", "{:.0f}"), ("hf_x", "{:.2f}"), ("jax/hf", "{:.1f}")]


def table(rows: list[dict]) -> str:
  """Aligned text table of `rows` (COLUMNS; "-" where a value does not apply)."""
  cells = [[name for name, _ in COLUMNS]] + [
      [fmt.format(r[name]) if r.get(name) is not None else "-" for name, fmt in COLUMNS]
      for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
  return "\n".join(" ".join(c.ljust(w) if i == 0 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(row, widths))) for row in cells)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = sorted({(r["pair"], r["B"], r["T"]) for r in rows})
  fig, axes = plt.subplots(1, len({k[0] for k in keys}), figsize=(6 * len({k[0] for k in keys}), 4),
                           squeeze=False)
  for ax, name in zip(axes[0], sorted({k[0] for k in keys})):
    for _, b, t in [k for k in keys if k[0] == name]:
      rs = sorted([r for r in rows if (r["pair"], r["B"], r["T"]) == (name, b, t)],
                  key=lambda r: r["K"])
      ks = [r["K"] for r in rs]
      line, = ax.plot(ks, [r["speedup"] for r in rs], "o-", label=f"JAX B={b} T={t:g}")
      ax.plot(ks, [r["ideal"] for r in rs], "--", color=line.get_color(), alpha=0.6,
              label=f"Leviathan ideal E/(Kc+1) B={b} T={t:g}")
      ax.plot(ks, [r["model"] for r in rs], "-.", color=line.get_color(), alpha=0.4,
              label=f"cost model E/(Kc+v) B={b} T={t:g}")
      hf = [(r["K"], r["hf_x"]) for r in rs if r.get("hf_x") is not None]
      if hf:
        ax.plot(*zip(*hf), "x:", color=line.get_color(), label=f"HF assisted B={b} T={t:g}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(title=f"{name} pair: speculative / plain decode", xlabel="K (drafts per round)",
           ylabel="speedup")
    ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------ main
def _row(name: str, b: int, t: float, k: int, m: dict, comp: dict, hf_plain, hf_spec) -> dict:
  """One table row: JAX plain vs speculative (`measure`'s m[0] and m[k]), the component times'
  model of the speedup, and HF's figures when measured."""
  plain, s = m[0], m[k]
  base_s = comp["base_step_s"][k]
  c = comp["draft_step_s"][k] / base_s
  v = comp["verify_s"][k] / base_s
  speedup = s["tokens_per_s"] / plain["tokens_per_s"]
  ideal = s["E"] / (k * c + 1)
  draft_ms = 1e3 * k * comp["draft_step_s"][k]
  verify_ms = 1e3 * comp["verify_s"][k]
  row = dict(pair=name, B=b, T=t, K=k, plain=plain["tokens_per_s"],
             spec=s["tokens_per_s"], speedup=speedup, E=s["E"], c=c, v=v, ideal=ideal,
             model=s["E"] / (k * c + v), draft=draft_ms, verify=verify_ms,
             plain_ms=plain["ms_per_round"], round_ms=s["ms_per_round"],
             other=s["ms_per_round"] - draft_ms - verify_ms,
             hf_plain=hf_plain["tokens_per_s"] if hf_plain else None,
             hf_spec=hf_spec["tokens_per_s"] if hf_spec else None,
             hf_x=(hf_spec["tokens_per_s"] / hf_plain["tokens_per_s"])
             if hf_spec and hf_plain else None,
             acceptance=s["acceptance"], ms_per_round=s["ms_per_round"],
             plain_ms_per_token=1e3 * plain["decode_s"] / plain["tokens"],
             **{"jax/hf": (s["tokens_per_s"] / hf_spec["tokens_per_s"])
                if hf_spec else None})
  row["%ideal"] = 100 * speedup / ideal
  row["%model"] = 100 * speedup / row["model"]
  return row


def bench_decode(argv: Sequence[str] | None = None) -> dict:
  a = _parser().parse_args(argv)
  if a.xla_threads == "single":
    # Read when the backend starts, i.e. at the first jax call below (not at `import jax`).
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
  import jax

  from gemma_mtp_jax.decoding import speculative

  pairs = []
  if not a.no_trained:
    if os.path.isdir(a.workdir):
      pairs.append(trained_pair(a.workdir))
    else:
      print(f"[decode bench] {a.workdir} not found: run `python -m gemma_mtp_jax.train` first; "
            "benchmarking the random pair only")
  if not a.no_random:
    pairs.append(random_pair(a.config))
  out_dir = a.out or (os.path.join(a.workdir, "bench_decode") if os.path.isdir(a.workdir)
                      else os.path.join("runs", "bench_decode"))
  os.makedirs(out_dir, exist_ok=True)
  rows, components, traces0 = [], {}, dict(speculative.compiled_programs())
  n_prompts = max(a.prompts, max(a.batch))
  t_start = time.time()
  for pair in pairs:
    if pair["tokenizer"] is not None:
      prompts = heldout_prompts(pair["tokenizer"], n_prompts, a.max_prompt_len)
    else:
      prompts = random_prompts(pair["base_cfg"].vocab_size, n_prompts, a.max_prompt_len)
    bucket = speculative.bucket(max(map(len, prompts)), 16)  # one prompt program for all
    hf = None
    if not a.no_hf:
      hf_dir = a.hf_dir or (os.path.join(a.workdir, "hf") if pair["name"] == "trained" else None)
      hf = HF(export_for_hf(pair, hf_dir), a.threads)
    for b in a.batch:
      comp = component_times(pair, b, a.k, bucket, a.max_new_tokens)
      components[f"{pair['name']}/B{b}"] = comp
      for t in a.temperature:
        hf_plain = hf.measure(prompts[:a.prompts], b, 0, a.max_new_tokens, t,
                              a.hf_repeats) if hf else None
        for k in a.k:
          m = measure(pair, prompts[:a.prompts], b, (0, k), a.max_new_tokens, t, a.repeats, bucket)
          hf_spec = hf.measure(prompts[:a.prompts], b, k, a.max_new_tokens, t,
                               a.hf_repeats) if hf else None
          row = _row(pair["name"], b, t, k, m, comp, hf_plain, hf_spec)
          rows.append(row)
          print(f"[decode bench] {pair['name']} B={b} T={t:g} K={k}: speedup {row['speedup']:.2f} "
                f"(E {row['E']:.2f}, c {row['c']:.2f}, v {row['v']:.2f}, ideal "
                f"{row['ideal']:.2f})", flush=True)
  compiles = {k: v - traces0.get(k, 0) for k, v in speculative.compiled_programs().items()}
  res = dict(
      device=jax.devices()[0].device_kind, max_new_tokens=a.max_new_tokens, prompts=a.prompts,
      repeats=a.repeats, rows=rows, components=components, compiles=compiles,
      configurations=len(rows) + len(pairs) * len(a.batch) * len(a.temperature),
      wall_s=time.time() - t_start)
  with open(os.path.join(out_dir, "bench_decode.json"), "w") as f:
    json.dump(res, f, indent=1, default=float)
  if rows:
    plot(rows, os.path.join(out_dir, "bench_decode.png"))
  if a.json:
    print(json.dumps(res, default=float))
  else:
    print(f"\ndecode benchmark ({res['device']}, {a.max_new_tokens} new tokens, {a.prompts} "
          f"prompts, min of {a.repeats}); tok/s = decode-loop tokens per second")
    print(table(rows))
    print(f"programs compiled: {compiles} for {res['configurations']} configurations (one "
          "prefill per batch / prompt bucket / cache size, one decode loop per batch / T / K, "
          "shared by pairs of the same shapes; repeated calls compile nothing)")
    print(f"wrote {out_dir}/bench_decode.json and bench_decode.png")
  return res
