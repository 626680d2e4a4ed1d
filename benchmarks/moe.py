"""MoE block benchmark: routed (`moe.RoutedMoE`) vs dense (`moe.DenseMoE`), forward + backward.

  python -m benchmarks.moe [--experts 128] [--top-k 8] [--embed 256] [--hidden 128]
      [--tokens 4096] [--batch 4] [--repeats 3] [--impl auto] [--json]

26B-A4B's expert count and top-k with widths scaled to the CPU. One jitted step = the block's
output, a scalar loss and its gradients w.r.t. every parameter and the input; both modules share
the same parameters and inputs (the outputs are checked equal). Timed interleaved in one run:
tokens/s of each and their ratio. FLOPs: dense runs all E experts, routed only the top-k, so the
ideal ratio is E / k (16 at 128 / 8), less the router, the sort and (CPU `blocked` matmul) the
padding of each expert's rows to whole blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m benchmarks.moe", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--experts", type=int, default=128)
  p.add_argument("--top-k", type=int, default=8)
  p.add_argument("--embed", type=int, default=256, help="D")
  p.add_argument("--hidden", type=int, default=128, help="F, per expert")
  p.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch * seq)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--impl", default="auto", help="grouped matmul: auto, ragged_dot, blocked")
  p.add_argument("--json", action="store_true")
  return p


def bench_moe(argv=None) -> dict:
  """Runs the benchmark; prints a two-line table (or one JSON line) and returns the figures."""
  a = _parser().parse_args(argv)
  import jax
  import jax.numpy as jnp

  from gemma_mtp_jax.model import moe

  b, t = a.batch, a.tokens // a.batch
  args = (a.experts, a.top_k, a.hidden)
  dense = moe.DenseMoE(*args)
  routed = moe.RoutedMoE(*args, gmm_impl=a.impl)
  kr, kx, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  router_in_BTD = jax.random.normal(kr, (b, t, a.embed), jnp.float32)
  x_BTD = jax.random.normal(kx, (b, t, a.embed), jnp.float32)
  params = dense.init(kp, router_in_BTD, x_BTD)

  def step_fn(module):
    def loss(p, x):
      y = module.apply(p, router_in_BTD, x)
      return jnp.mean(y * y), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  steps = {"dense": step_fn(dense), "routed": step_fn(routed)}
  outs = {n: jax.block_until_ready(f(params, x_BTD)) for n, f in steps.items()}  # compile + warm
  max_diff = float(jnp.abs(outs["dense"][0][1] - outs["routed"][0][1]).max())
  times = {n: [] for n in steps}
  for _ in range(a.repeats):  # interleaved: both see the same machine load
    for n, f in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(params, x_BTD))
      times[n].append(time.perf_counter() - t0)
  tps = {n: a.tokens / float(np.median(ts)) for n, ts in times.items()}
  res = {"experts": a.experts, "top_k": a.top_k, "embed": a.embed, "hidden": a.hidden,
         "tokens": a.tokens, "impl": a.impl, "device": jax.devices()[0].device_kind,
         "dense_tokens_per_s": tps["dense"], "routed_tokens_per_s": tps["routed"],
         "routed_over_dense": tps["routed"] / tps["dense"], "max_abs_out_diff": max_diff}
  if a.json:
    print(json.dumps(res))
  else:
    print(f"MoE block forward+backward: E={a.experts} top-{a.top_k} D={a.embed} F={a.hidden} "
          f"tokens={a.tokens} ({res['device']}, grouped matmul: {a.impl})")
    print(f"  dense  (moe.DenseMoE) : {tps['dense']:10.0f} tokens/s")
    print(f"  routed (moe.RoutedMoE): {tps['routed']:10.0f} tokens/s")
    print(f"  ratio routed/dense: {res['routed_over_dense']:.2f}x   "
          f"max |out diff|: {max_diff:.2e}")
  return res


if __name__ == "__main__":
  bench_moe(sys.argv[1:])
  sys.exit(0)
