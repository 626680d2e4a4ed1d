"""Peak host memory of hf-to-jax (streaming) vs a naive "load everything, then convert" baseline.

  python -m benchmarks convert [--size-mb 400] [--shard-mb 100] [--json]

Writes a random bfloat16 HF checkpoint of a mid-size Gemma 4 text config (sharded, with
index.json) to a temp dir, then runs each conversion in a fresh child process and reads its peak
RSS (`ru_maxrss`). Figures are the peak above the child's RSS after its imports, so the Python/JAX
runtime does not count; they are printed as ratios to the checkpoint size. Both children end with
the params as jax.Arrays on the default device and write the same orbax checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import ml_dtypes
import numpy as np

# Child programs: import everything first, then measure the conversion alone.
_PRELUDE = """
import json, os, resource, sys, time
import psutil
import jax, jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp, safetensors.numpy
from gemma_mtp_jax.checkpoint import pair as checkpoint
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.checkpoint import hf_base as convert_base
from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.checkpoint import safetensors_io
src, out = sys.argv[1], sys.argv[2]
rss0 = psutil.Process().memory_info().rss
t0 = time.perf_counter()
"""
# load: params in memory as jax.Arrays (what the trainer / decoder do with an HF dir);
# full: the whole hf-to-jax, i.e. load + write the orbax checkpoint.
_STREAM = {
    "load": "pair = checkpoint.load_pair(src)",
    "full": "checkpoint.hf_to_jax(src, out)",
}
# What a converter without streaming does: every shard into one dict, convert it whole, then place.
_NAIVE_LOAD = """
cfg = hf_config.model_config_from_hf(safetensors_io.read_json(os.path.join(src, "config.json")))
state = {}
for f in sorted(os.listdir(src)):
  if f.endswith(".safetensors"):
    state.update(safetensors.numpy.load_file(os.path.join(src, f)))
params = convert_base.state_dict_to_params(cfg, state)
del state
params = jax.tree.map(jnp.asarray, params)
"""
_NAIVE = {
    "load": _NAIVE_LOAD,
    "full": _NAIVE_LOAD + """
os.makedirs(out)
checkpoint.save_params(os.path.join(out, "params"), {"base": params})
""",
}
_EPILOGUE = """
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
print(json.dumps({"rss_after_imports": rss0, "peak_rss": peak, "seconds": dt,
                  "device": jax.devices()[0].device_kind, "platform": jax.default_backend()}))
"""


def mid_size_config(target_bytes: int):
  """A Gemma 4 text config (1024 wide, 5:1 sliding/global) with as many layers as fit the target
  size in bfloat16."""
  from gemma_mtp_jax.model import config as config_lib
  from gemma_mtp_jax.checkpoint import hf_names as names

  def make(n):
    return config_lib.ModelConfig(
        vocab_size=32_768, embed_dim=1024, num_layers=n, num_heads=8, num_kv_heads=2, head_dim=128,
        global_head_dim=256, hidden_dim=4096, layer_types=config_lib.layer_types_from_pattern(n, 6),
        ple_dim=0, ple_vocab_size=0, param_dtype="bfloat16")

  def nbytes(cfg):
    return 2 * sum(int(np.prod(e.hf_shape)) for e in names.base_entries(cfg))

  n = 1
  while nbytes(make(n + 1)) <= target_bytes:
    n += 1
  return make(n)


def write_random_checkpoint(cfg, out_dir: str, shard_size: str, seed: int = 0) -> int:
  """Random bfloat16 HF checkpoint of `cfg` (generated one tensor at a time); returns its bytes."""
  from gemma_mtp_jax.checkpoint import hf_config
  from gemma_mtp_jax.checkpoint import hf_names as names
  from gemma_mtp_jax.checkpoint import safetensors_io
  from gemma_mtp_jax.utils import files

  prefix = "model."
  entries = {prefix + names.fused_name(e.hf): e.hf_shape for e in names.base_entries(cfg)}
  bf16 = np.dtype(ml_dtypes.bfloat16)
  specs = {n: safetensors_io.TensorSpec(s, bf16) for n, s in entries.items()}
  rng = np.random.default_rng(seed)

  def get(name):
    x = rng.standard_normal(specs[name].shape, dtype=np.float32) * 0.02
    return x.astype(ml_dtypes.bfloat16)

  os.makedirs(out_dir, exist_ok=True)
  safetensors_io.write_safetensors(out_dir, specs, get, shard_size)
  hf = dict(hf_config.model_config_to_hf(cfg), architectures=["Gemma4ForCausalLM"],
            dtype="bfloat16")
  files.write_json(os.path.join(out_dir, safetensors_io.CONFIG_NAME), hf)
  return sum(s.nbytes for s in specs.values())


def _child(body: str, src: str, out: str) -> dict:
  code = textwrap.dedent(_PRELUDE) + textwrap.dedent(body) + textwrap.dedent(_EPILOGUE)
  res = subprocess.run([sys.executable, "-c", code, src, out], capture_output=True, text=True)
  if res.returncode:
    raise RuntimeError(f"child failed:\n{res.stderr[-4000:]}")
  r = json.loads(res.stdout.strip().splitlines()[-1])
  r["delta"] = r["peak_rss"] - r["rss_after_imports"]
  return r


def bench_convert(argv) -> dict:
  """Benchmark CLI (see the module docstring); returns the figures."""
  p = argparse.ArgumentParser(prog="benchmark convert")
  p.add_argument("--size-mb", type=float, default=400, help="approximate checkpoint size")
  p.add_argument("--shard-mb", type=float, default=100, help="max shard size of the checkpoint")
  p.add_argument("--dir", help="work dir (default: a temp dir, removed afterwards)")
  p.add_argument("--json", action="store_true")
  a = p.parse_args(argv)

  work = a.dir or tempfile.mkdtemp(prefix="bench_convert-")
  try:
    cfg = mid_size_config(int(a.size_mb * 1e6))
    src = os.path.join(work, "hf")
    t0 = time.perf_counter()
    size = write_random_checkpoint(cfg, src, f"{int(a.shard_mb * 1e6)}")
    t_write = time.perf_counter() - t0
    shard = max(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src)
                if f.endswith(".safetensors"))
    runs = {}
    for method, bodies in (("stream", _STREAM), ("naive", _NAIVE)):
      for stage, body in bodies.items():
        runs[method, stage] = _child(body, src, os.path.join(work, f"{method}_{stage}"))
  finally:
    if not a.dir:
      shutil.rmtree(work, ignore_errors=True)

  mb = 1e6
  first = runs["stream", "load"]
  res = {"layers": cfg.num_layers, "checkpoint_mb": size / mb, "largest_shard_mb": shard / mb,
         "write_seconds": t_write, "device": first["device"], "platform": first["platform"],
         "rss_after_imports_mb": first["rss_after_imports"] / mb}
  for (method, stage), r in runs.items():
    res[f"{method}_{stage}_peak_mb"] = r["delta"] / mb
    res[f"{method}_{stage}_over_checkpoint"] = r["delta"] / size
    res[f"{method}_{stage}_seconds"] = r["seconds"]
  for stage in ("load", "full"):
    res[f"{stage}_stream_over_naive"] = runs["stream", stage]["delta"] / runs["naive", stage]["delta"]
  if a.json:
    print(json.dumps(res))
    return res
  on_host = ("; JAX on CPU: the placed params themselves live in host RAM (1.0x checkpoint)"
             if res["platform"] == "cpu" else "")
  print(f"hf-to-jax peak host memory (RSS above the child's RSS after imports, "
        f"{res['rss_after_imports_mb']:.0f} MB), random bf16 checkpoint {res['checkpoint_mb']:.0f} "
        f"MB = {cfg.num_layers} layers, shards <= {res['largest_shard_mb']:.0f} MB, device "
        f"{res['device']}{on_host}")
  print(f"  {'':34s}{'streaming':>22s}{'naive (load all)':>22s}{'stream/naive':>14s}")
  for stage, label in (("load", "load to jax.Arrays (load_pair)"),
                       ("full", "hf-to-jax (load + orbax save)")):
    cells = [f"{res[f'{m}_{stage}_peak_mb']:6.0f} MB {res[f'{m}_{stage}_over_checkpoint']:4.2f}x "
             f"{res[f'{m}_{stage}_seconds']:4.1f}s" for m in ("stream", "naive")]
    print(f"  {label:34s}{cells[0]:>22s}{cells[1]:>22s}{res[f'{stage}_stream_over_naive']:14.2f}")
  return res


if __name__ == "__main__":
  bench_convert(sys.argv[1:])
