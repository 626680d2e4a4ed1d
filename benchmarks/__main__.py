"""Side-by-side benchmarks; every figure is a ratio measured in the same run.

  python -m benchmarks model --config=configs/tiny.py
      Base forward tokens/s: JAX (jit) vs HF torch on the same random weights and tokens, and the
      number of JAX compilations per input shape (must be 1).
  python -m benchmarks joint ...    (see benchmarks/joint.py)
  python -m benchmarks convert ...  (see benchmarks/convert.py)
  python -m benchmarks decode ...   (see benchmarks/decode.py)
  python -m benchmarks objective ... (see benchmarks/objective.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _timeit(fn, repeats: int) -> float:
  """Median seconds of `repeats` calls (after one warm-up call)."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def bench_model(argv) -> dict:
  p = argparse.ArgumentParser(prog="benchmark model")
  p.add_argument("--config", default="tiny", help="preset name or configs/X.py")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
  p.add_argument("--json", action="store_true")
  a = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  from gemma_mtp_jax import presets
  from gemma_mtp_jax.model import transformer
  from gemma_mtp_jax.utils import compiles
  from gemma_mtp_jax.checkpoint import hf_base as convert_base
  from gemma_mtp_jax.checkpoint import hf_config

  if a.threads:
    torch.set_num_threads(a.threads)
  cfg, _ = presets.model_configs(presets.load_config(a.config))
  cfg = cfg.replace(dtype="float32", param_dtype="float32", scan_layers=False, remat_policy="none")
  hf_cfg = transformers.Gemma4TextConfig(**hf_config.model_config_to_hf(cfg))
  hf_cfg._attn_implementation = "sdpa"
  torch.manual_seed(0)
  hf = transformers.Gemma4ForCausalLM(hf_cfg).eval()
  state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  params = convert_base.state_dict_to_params(cfg, state)
  params = jax.tree.map(jnp.asarray, params)

  rng = np.random.default_rng(0)
  tokens = rng.integers(3, cfg.vocab_size, (a.batch, a.seq))
  positions = np.broadcast_to(np.arange(a.seq), tokens.shape)
  def forward(params, tokens, positions):
    return transformer.Transformer(cfg).apply({"params": params}, tokens, positions).logits

  fwd = jax.jit(forward)
  jt, jp = jnp.asarray(tokens), jnp.asarray(positions)
  with compiles.counting() as compiled:
    t_jax = _timeit(lambda: fwd(params, jt, jp).block_until_ready(), a.repeats)
  tt = torch.tensor(tokens)

  def torch_fwd():
    with torch.inference_mode():
      hf(input_ids=tt, use_cache=False)

  t_torch = _timeit(torch_fwd, a.repeats)
  # Same outputs (sanity: the two timed programs compute the same thing).
  with torch.inference_mode():
    ref = hf(input_ids=tt, use_cache=False).logits.numpy()
  max_diff = float(np.abs(np.asarray(fwd(params, jt, jp)) - ref).max())
  n_tok = a.batch * a.seq
  res = {
      "config": a.config, "batch": a.batch, "seq": a.seq, "device": jax.devices()[0].device_kind,
      "jax_tokens_per_s": n_tok / t_jax, "torch_tokens_per_s": n_tok / t_torch,
      "jax_over_torch": t_torch / t_jax, "jax_compilations": compiled.n,
      "max_abs_logit_diff": max_diff, "torch_threads": torch.get_num_threads(),
  }
  if a.json:
    print(json.dumps(res))
  else:
    print(f"model forward, config={a.config} batch={a.batch} seq={a.seq} "
          f"({res['device']}, torch threads={res['torch_threads']})")
    print(f"  JAX jit   : {res['jax_tokens_per_s']:10.0f} tokens/s")
    print(f"  HF torch  : {res['torch_tokens_per_s']:10.0f} tokens/s")
    print(f"  ratio JAX/torch: {res['jax_over_torch']:.2f}x   JAX compilations: "
          f"{res['jax_compilations']} (for {a.repeats + 2} calls of one shape)   "
          f"max |logit diff|: {max_diff:.2e}")
  return res


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  commands = {"model": bench_model}
  try:
    from benchmarks import joint as bench_joint
    commands["joint"] = bench_joint.bench_joint
  except ImportError:
    pass
  try:
    from benchmarks import convert as bench_convert
    commands["convert"] = bench_convert.bench_convert
  except ImportError:
    pass
  try:
    from benchmarks import decode as bench_decode
    commands["decode"] = bench_decode.bench_decode
  except ImportError:
    pass
  try:
    from benchmarks import objective as bench_objective
    commands["objective"] = bench_objective.bench_objective
  except ImportError:
    pass
  if not argv or argv[0] not in commands:
    print(f"usage: python -m benchmarks {{{','.join(commands)}}} [flags]",
          file=sys.stderr)
    return 2
  commands[argv[0]](argv[1:])
  return 0


if __name__ == "__main__":
  sys.exit(main())
