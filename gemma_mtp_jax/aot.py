"""Ahead-of-time memory and FLOPs plan: compile the trainer's train step for a TPU topology.

  JAX_PLATFORMS=cpu python -m gemma_mtp_jax.aot --config=configs/e4b.py --topology=v5e-16 \
      [--config.train.batch_size=16] [--config.train.freeze_base=True] \
      [--config.mesh.axes.fsdp=8 --config.mesh.axes.tensor=2] [--step_time=1.0] [--json]

The program is the one `python -m gemma_mtp_jax.train` runs with the same config (`training.step.programs`:
the same shardings, optimizer, gradient accumulation, remat, chunked loss and attention, donation);
only the devices are a TPU topology's. Needs the `tpu` extra (libtpu at the same jax version); no
TPU is needed: the program is lowered and compiled on this CPU machine, and XLA's own
`memory_analysis()` / `cost_analysis()` report what one chip would hold and compute.
Exit codes (`gemma_mtp_jax.cli`): 0 fits, 1 does not fit the chip's HBM (only that), 2 bad
configuration (one `error:` line: a mesh that does not divide the topology, a batch that does not
split over its devices, ...), 70 a bug (traceback).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import types

import jax
import numpy as np

from gemma_mtp_jax.model.flops import model_flops_per_token, vision_flops_per_image
from gemma_mtp_jax import cli
from gemma_mtp_jax import sharding
from gemma_mtp_jax.data import batch_layout
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.training import config as train_config
from gemma_mtp_jax.training import step as step_lib

# name -> (jax topology string, HBM bytes per chip, peak bf16 FLOP/s per chip).
# v5e-N counts chips; v4/v5p-N count TensorCores (2 per chip), as Cloud TPU names them.
TOPOLOGIES = {
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
    raise config_lib.ConfigError(f"unknown --topology {name!r}{config_lib.closest(name, TOPOLOGIES)}"
                                 f"; known: {', '.join(TOPOLOGIES)}")
  topo = topologies.get_topology_desc(topology_name=TOPOLOGIES[name][0], platform="tpu")
  return topo.devices


@dataclasses.dataclass
class Plan:
  config: str
  topology: str
  mesh: dict
  batch: int
  grad_accum_steps: int
  seq: int
  mode: str
  images_per_row: int  # image slots per row in the compiled batch (0: text only)
  image_soft_tokens: int  # soft tokens per image slot
  vision: str  # the vision tower in the step: "none" (no images), "frozen" or "trained"
  state_gib: float  # params + optimizer state on one chip, from their shardings
  argument_gib: float
  output_gib: float
  temp_gib: float
  alias_gib: float
  total_gib: float
  peak_gib: float  # XLA's own peak of live buffers on one chip (0 where the backend reports none)
  hbm_gib: float
  fits: bool
  compiled_flops_per_chip: float  # XLA's count: a loop body (scanned layers, chunks) counts once
  model_flops_per_token: float
  model_flops_per_step: float
  mfu_at_step_time: float
  step_time_s: float
  compile_s: float


def image_slots(base_cfg: config_lib.ModelConfig, images_per_row: int,
                soft_tokens: int) -> tuple[int, int, int] | None:
  """(i, p, c) of a batch's image slots: `images_per_row` images of up to `soft_tokens` soft tokens
  each (p = soft_tokens * pooling_kernel_size**2 patches of c = 3 * patch_size**2 values); None
  for none. ConfigError if the base has no vision tower."""
  if not images_per_row:
    return None
  if base_cfg.vision is None:
    raise train_config.ConfigError("--images_per_row: the config's base has no vision tower "
                                   "(model.vision is None)")
  v = base_cfg.vision
  return images_per_row, soft_tokens * v.patches_per_soft_token, v.channels


def abstract_batch(rows: int, seq_len: int, slots: tuple[int, int, int] | None,
                   batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The step's batch as abstract arrays: the training batch's layout (`data.batch_layout`), every
  array split over rows by `batch_sharding`."""
  return {name: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sharding)
          for name, s in batch_layout.batch_layout(rows, seq_len, slots).items()}


def plan(cfg, topology: str, step_time: float = 1.0, images_per_row: int = 0,
         image_soft_tokens: int = 280) -> Plan:
  """Compiles the trainer's step for `cfg` (a preset ConfigDict, overrides applied) on `topology`;
  with `images_per_row`, every row also carries that many images of `image_soft_tokens`."""
  base_cfg, dcfg, tcfg = train_config.validate_config(cfg)
  slots = image_slots(base_cfg, images_per_row, image_soft_tokens)
  devices = topology_devices(topology)
  # The trainer's own checks: the mesh divides the chips, the batch splits over them.
  mesh, rules = step_lib.run_mesh(cfg.mesh, tcfg, devices)
  batch, seq, accum = tcfg.batch_size, tcfg.seq_len, tcfg.grad_accum_steps
  progs = step_lib.programs(base_cfg, dcfg, tcfg, mesh, rules)
  _, buffers_abs = step_lib.split_vars(progs.abstract_vars)
  state_abs = progs.abstract_state()
  batch_abs = abstract_batch(batch, seq, slots, progs.batch_sh)
  state_bytes = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                    for x in jax.tree.leaves(state_abs))
  t0 = time.time()
  gib = 2.0 ** 30
  hbm, peak = TOPOLOGIES[topology][1], TOPOLOGIES[topology][2]
  try:
    with sharding.use_mesh(mesh, rules):
      compiled = progs.step.lower(state_abs, buffers_abs, batch_abs).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program whose temporaries alone exceed HBM; report that.
    need = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or need is None:
      raise
    temps = int(float(need.group(1)) * gib)
    mem = types.SimpleNamespace(argument_size_in_bytes=state_bytes, output_size_in_bytes=0,
                                temp_size_in_bytes=temps, alias_size_in_bytes=0,
                                peak_memory_in_bytes=0)
    cost = {}
  compile_s = time.time() - t0
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
  mode = "drafter_only" if tcfg.freeze_base else "joint"
  per_token = model_flops_per_token(base_cfg, dcfg, seq, tcfg.num_draft_steps, not tcfg.freeze_base)
  mflops = per_token * batch * seq
  vision = "none"
  if slots is not None:  # the tower's forward, and its backward when it trains
    vision = "frozen" if tcfg.freeze_vision or tcfg.freeze_base else "trained"
    mflops += ((3 if vision == "trained" else 1) * batch * slots[0]
               * vision_flops_per_image(base_cfg, slots[1]))
  return Plan(
      config=str(cfg.get("name", "?")), topology=topology,
      mesh={k: int(v) for k, v in mesh.shape.items() if v > 1}, batch=batch,
      grad_accum_steps=accum, seq=seq, mode=mode, images_per_row=images_per_row,
      image_soft_tokens=image_soft_tokens if images_per_row else 0, vision=vision, state_gib=state_bytes / gib, argument_gib=mem.argument_size_in_bytes / gib,
      output_gib=mem.output_size_in_bytes / gib, temp_gib=mem.temp_size_in_bytes / gib,
      alias_gib=mem.alias_size_in_bytes / gib, total_gib=total / gib,
      peak_gib=getattr(mem, "peak_memory_in_bytes", 0) / gib, hbm_gib=hbm / gib,
      fits=total <= hbm, compiled_flops_per_chip=float(cost.get("flops", 0.0)),
      model_flops_per_token=per_token, model_flops_per_step=mflops, mfu_at_step_time=mflops / (step_time * peak * len(devices)),
      step_time_s=step_time, compile_s=compile_s)


def describe(r: Plan) -> str:
  return "\n".join([
      f"{r.config} {r.mode} on {r.topology} mesh={r.mesh} batch={r.batch} "
      + (f"+ {r.images_per_row} image(s) of {r.image_soft_tokens} soft tokens per row, vision "
         f"{r.vision} " if r.images_per_row else "") +
      f"(grad_accum_steps={r.grad_accum_steps}) seq={r.seq}; compiled in {r.compile_s:.0f}s",
      f"  per chip: train state {r.state_gib:.2f} GiB; arguments {r.argument_gib:.2f} GiB + outputs {r.output_gib:.2f} + temps "
      f"{r.temp_gib:.2f} - aliased {r.alias_gib:.2f} = {r.total_gib:.2f} GiB of "
      f"{r.hbm_gib:.0f} GiB HBM -> {'fits' if r.fits else 'DOES NOT FIT'}"
      + (f" (XLA's peak of live buffers: {r.peak_gib:.2f} GiB)" if r.peak_gib else ""),
      f"  model FLOPs: {r.model_flops_per_token:.3e} per token, {r.model_flops_per_step:.3e} per "
      f"step; MFU at {r.step_time_s:g}s/step: {100 * r.mfu_at_step_time:.1f}% (XLA's own count: "
      f"{r.compiled_flops_per_chip:.3e} FLOPs per chip, loop bodies counted once)"])


def main() -> None:
  """`python -m gemma_mtp_jax.aot`: absl flags, like `gemma_mtp_jax.train` (defined here, not at
  import, so importing this module defines no flags)."""
  from absl import app, flags
  from ml_collections import config_flags

  def fail(error: BaseException) -> None:
    print(f"error: {train_config.explain_override_error(sys.argv, error)}", file=sys.stderr)
    sys.exit(2)

  try:
    config = config_flags.DEFINE_config_file(
        "config", None, "Preset file (configs/X.py); override fields with --config.a.b=value.",
        lock_config=True)
  except Exception as e:  # noqa: BLE001 (a bad --config.* override surfaces here)
    fail(e)
  topology = flags.DEFINE_enum("topology", None, list(TOPOLOGIES), "TPU slice to compile for.")
  step_time = flags.DEFINE_float("step_time", 1.0, "Seconds per step for the MFU line.")
  as_json = flags.DEFINE_bool("json", False, "Print the plan as one JSON object.")
  images_per_row = flags.DEFINE_integer(
      "images_per_row", 0, "Image slots per row (a base with a vision tower): the step encodes "
      "that many images per row with its tower.")
  image_soft_tokens = flags.DEFINE_integer(
      "image_soft_tokens", 280, "Soft tokens per image (the image processor's max_soft_tokens: "
      "70, 140, 280, 560 or 1120).")
  flags.mark_flags_as_required(["config", "topology"])

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001
      fail(e)

  def run(argv) -> int:
    del argv
    r = plan(config.value, topology.value, step_time.value, images_per_row.value,
             image_soft_tokens.value)
    print(json.dumps(dataclasses.asdict(r)) if as_json.value else describe(r))
    return cli.OK if r.fits else cli.NOT_FIT

  # Known errors: one `error:` line, exit 2; a bug: its traceback, exit 70 (never 1, which says
  # "does not fit").
  app.run(lambda argv: cli.exit_with(run, argv), flags_parser=parse)


if __name__ == "__main__":
  main()
