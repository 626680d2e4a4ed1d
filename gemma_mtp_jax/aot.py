"""Ahead-of-time memory and FLOPs plan: compile the real joint train step for a TPU topology.

  JAX_PLATFORMS=cpu python -m gemma_mtp_jax.aot --config=configs/e4b.py --topology=v5e-16 \
      [--batch=16] [--seq=4096] [--mode=joint|drafter_only] [--mesh=fsdp:-1] [--step_time=1.0]

Needs the `tpu` extra (libtpu, pinned to the same jax version); no TPU is needed: the program is
lowered and compiled for the topology's devices on this CPU machine, and XLA's own
`memory_analysis()` / `cost_analysis()` report what one chip would hold and compute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemma_mtp_jax import config as config_lib
from gemma_mtp_jax import drafter as drafter_lib
from gemma_mtp_jax import joint
from gemma_mtp_jax import presets
from gemma_mtp_jax import sharding
from gemma_mtp_jax import transformer

# name -> (jax topology string, HBM bytes per chip, peak bf16 FLOP/s per chip).
# v5e-N counts chips; v4/v5p-N count TensorCores (2 per chip), as Cloud TPU names them.
TOPOLOGIES = {
    "v5e-1": ("v5e:1x1", 16 * 2**30, 197e12),
    "v5e-4": ("v5e:2x2", 16 * 2**30, 197e12),
    "v5e-8": ("v5e:2x4", 16 * 2**30, 197e12),
    "v5e-16": ("v5e:4x4", 16 * 2**30, 197e12),
    "v5e-32": ("v5e:4x8", 16 * 2**30, 197e12),
    "v5e-64": ("v5e:8x8", 16 * 2**30, 197e12),
    "v5e-256": ("v5e:16x16", 16 * 2**30, 197e12),
    "v5p-8": ("v5p:2x2x1", 95 * 2**30, 459e12),
    "v5p-16": ("v5p:2x2x2", 95 * 2**30, 459e12),
    "v5p-32": ("v5p:2x2x4", 95 * 2**30, 459e12),
    "v5p-64": ("v5p:2x4x4", 95 * 2**30, 459e12),
    "v5p-128": ("v5p:4x4x4", 95 * 2**30, 459e12),
    "v4-8": ("v4:2x2x1", 32 * 2**30, 275e12),
    "v4-32": ("v4:2x2x4", 32 * 2**30, 275e12),
    "v6e-8": ("v6e:2x4", 32 * 2**30, 918e12),
    "v6e-16": ("v6e:4x4", 32 * 2**30, 918e12),
}


def topology_devices(name: str):
  # libtpu takes a machine-wide lock when it loads; compiling for a topology needs no TPU, so let
  # it load alongside other JAX processes (tests, a training run) on the same host.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  if name not in TOPOLOGIES:
    raise config_lib.ConfigError(f"unknown --topology {name!r}{config_lib._closest(name, TOPOLOGIES)}"
                                 f"; known: {', '.join(TOPOLOGIES)}")
  topo = topologies.get_topology_desc(topology_name=TOPOLOGIES[name][0], platform="tpu")
  return topo.devices


def boxed_params(base_cfg, dcfg, rng):
  """Params {"base", "drafter"} with their logical-axis boxes, plus drafter buffers."""
  rb, rd = jax.random.split(rng)
  variables = drafter_lib.init_variables(dcfg, rd)
  return ({"base": transformer.init_params(base_cfg, rb), "drafter": variables["params"]},
          variables.get("buffers"))


def model_flops_per_token(base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig,
                          seq: int, num_draft_steps: int, train_base: bool) -> float:
  """6 * active matmul params (+ attention scores) per token, base forward+backward and K drafter
  steps. Embedding lookups are free; the tied LM heads count (they are matmuls)."""
  def active_matmul_params(c: config_lib.ModelConfig, kv_owner=True) -> float:
    n = 0.0
    for i in range(c.num_layers):
      h, hd = c.num_heads, c.layer_head_dim(i)
      n += 2 * c.embed_dim * h * hd  # q, o
      if not c.is_kv_shared(i) and kv_owner:
        n += c.embed_dim * c.layer_kv_heads(i) * hd * (1 if c.layer_k_eq_v(i) else 2)
      n += 3 * c.embed_dim * c.layer_hidden_dim(i)
      if c.enable_moe:
        n += c.top_k_experts * 3 * c.embed_dim * c.moe_hidden_dim + c.embed_dim * c.num_experts
      if c.ple_dim:
        n += 2 * c.embed_dim * c.ple_dim
    if c.ple_dim:
      n += c.embed_dim * c.num_layers * c.ple_dim
    return n + c.embed_dim * c.vocab_size  # LM head

  def attn_flops(c: config_lib.ModelConfig) -> float:
    f = 0.0
    for i in range(c.num_layers):
      span = min(seq, c.sliding_window) if c.is_sliding(i) else seq / 2
      f += 2 * 2 * c.num_heads * c.layer_head_dim(i) * span  # QK^T and PV
    return f

  base = 2 * active_matmul_params(base_cfg) + attn_flops(base_cfg)
  d = dcfg.text
  draft = 2 * (active_matmul_params(d, kv_owner=False) + 2 * dcfg.backbone_hidden_size * d.embed_dim)
  draft += attn_flops(d)
  # forward + backward = 3x forward; a frozen base still runs its forward (and the backward into
  # nothing), so count 1x for it.
  return (3 if train_base else 1) * base + 3 * num_draft_steps * draft


@dataclasses.dataclass
class Plan:
  topology: str
  mesh: dict
  batch: int
  seq: int
  mode: str
  argument_gib: float
  output_gib: float
  temp_gib: float
  alias_gib: float
  total_gib: float
  hbm_gib: float
  fits: bool
  compiled_flops_per_chip: float
  model_flops_per_step: float
  mfu_at_step_time: float
  step_time_s: float


def plan(config_name: str, topology: str, batch: int, seq: int, mode: str = "joint",
         mesh_axes: dict | None = None, step_time: float = 1.0, overrides: dict | None = None,
         remat: str | None = None, loss_chunk: int = 1024) -> Plan:
  cfg = presets.load_config(config_name)
  base_cfg, dcfg = presets.model_configs(cfg)
  base_cfg = base_cfg.replace(**(overrides or {}))
  if remat:
    base_cfg = base_cfg.replace(remat_policy=remat)
  train = cfg.train.to_dict()
  train["freeze_base"] = mode == "drafter_only"
  # Real vocabularies (262144) make [B, T, V] logits the largest activation: chunk the head + loss.
  train["loss_chunk_size"] = loss_chunk
  jcfg = joint.JointConfig.from_train_config(train)
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(mesh_axes or {"fsdp": -1}, devices)
  rules = sharding.DEFAULT_RULES
  tx = optax.adamw(1e-5, weight_decay=0.1)

  def init_state(rng):
    params, buffers = boxed_params(base_cfg, dcfg, rng)
    return joint.init_train_state(params, tx, jcfg), buffers

  abstract_state, abstract_buffers = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  state_sh = sharding.logical_shardings(abstract_state, mesh, rules)
  buffers_sh = jax.tree.map(lambda _: sharding.replicated(mesh), abstract_buffers)
  state_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           nn.unbox(abstract_state), nn.unbox(state_sh))
  buffers_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             abstract_buffers, buffers_sh)
  bs = sharding.batch_sharding(mesh, rules)
  batch_abs = {
      "tokens": jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=bs),
      "segment_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=bs),
      "positions": jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=bs),
      "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.bool_, sharding=bs),
  }
  step = jax.jit(lambda s, b, x: joint.train_step(s, b, x, base_cfg=base_cfg, dcfg=dcfg,
                                                  jcfg=jcfg, tx=tx),
                 out_shardings=(nn.unbox(state_sh), None), donate_argnums=(0,))
  with sharding.use_mesh(mesh, rules):
    compiled = step.lower(state_abs, buffers_abs, batch_abs).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = 2.0 ** 30
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
  hbm, peak = TOPOLOGIES[topology][1], TOPOLOGIES[topology][2]
  n_chips = len(devices)
  mflops = model_flops_per_token(base_cfg, dcfg, seq, jcfg.num_steps, mode == "joint") * batch * seq
  return Plan(
      topology=topology, mesh={k: int(v) for k, v in mesh.shape.items() if v > 1}, batch=batch,
      seq=seq, mode=mode, argument_gib=mem.argument_size_in_bytes / gib,
      output_gib=mem.output_size_in_bytes / gib, temp_gib=mem.temp_size_in_bytes / gib,
      alias_gib=mem.alias_size_in_bytes / gib, total_gib=total / gib, hbm_gib=hbm / gib,
      fits=total <= hbm, compiled_flops_per_chip=float(cost.get("flops", 0.0)),
      model_flops_per_step=mflops, mfu_at_step_time=mflops / (step_time * peak * n_chips),
      step_time_s=step_time)


def _parse_mesh(s: str | None) -> dict | None:
  if not s:
    return None
  out = {}
  for part in s.split(","):
    name, _, size = part.partition(":")
    out[name.strip()] = int(size)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m gemma_mtp_jax.aot", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True)
  p.add_argument("--topology", required=True, help=f"one of {', '.join(TOPOLOGIES)}")
  p.add_argument("--batch", type=int, default=None, help="global batch (default: one per chip)")
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--mode", choices=("joint", "drafter_only"), default="joint")
  p.add_argument("--mesh", default=None, help="e.g. fsdp:-1 or fsdp:8,tensor:2")
  p.add_argument("--remat", default=None, help="override the preset's remat_policy")
  p.add_argument("--step_time", type=float, default=1.0, help="seconds per step for the MFU line")
  p.add_argument("--loss_chunk", type=int, default=1024,
                 help="positions per head/loss chunk (0: full [B, T, V] logits)")
  p.add_argument("--scan_layers", action="store_true", help="nn.scan over layer periods "
                 "(faster compile of deep models; same program semantics)")
  p.add_argument("--json", action="store_true")
  a = p.parse_args(argv)
  batch = a.batch or len(topology_devices(a.topology))
  r = plan(a.config, a.topology, batch, a.seq, a.mode, _parse_mesh(a.mesh), a.step_time,
           overrides={"scan_layers": True} if a.scan_layers else None, remat=a.remat,
           loss_chunk=a.loss_chunk)
  if a.json:
    print(json.dumps(dataclasses.asdict(r)))
  else:
    print(f"{a.config} {r.mode} on {r.topology} mesh={r.mesh} batch={r.batch} seq={r.seq}")
    print(f"  per chip: arguments {r.argument_gib:.2f} GiB + outputs {r.output_gib:.2f} + temps "
          f"{r.temp_gib:.2f} - aliased {r.alias_gib:.2f} = {r.total_gib:.2f} GiB of "
          f"{r.hbm_gib:.0f} GiB HBM -> {'fits' if r.fits else 'DOES NOT FIT'}")
    print(f"  compiled FLOPs per chip per step: {r.compiled_flops_per_chip:.3e}; model FLOPs per "
          f"step: {r.model_flops_per_step:.3e}; MFU at {r.step_time_s:g}s/step: "
          f"{100 * r.mfu_at_step_time:.1f}%")
  return 0


if __name__ == "__main__":
  sys.exit(main())
