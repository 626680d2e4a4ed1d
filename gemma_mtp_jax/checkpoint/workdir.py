"""The train workdir's checkpoints: an orbax CheckpointManager under WORKDIR/checkpoints.

Each saved step holds three items: "params" ({"base": params, "drafter": variables}, loop layout),
"opt_state" and "meta" (JSON: step, data position, rng, ...). The workdir's other files (pair.json,
tokenizer/, hf_extra/) are the pair dir's (`layout`), written once by `init_workdir`.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from gemma_mtp_jax.checkpoint import layout
from gemma_mtp_jax.checkpoint import safetensors_io
from gemma_mtp_jax.checkpoint.hf_names import ConversionError
from gemma_mtp_jax.utils import files

CHECKPOINTS_DIR = "checkpoints"


def open_manager(workdir: str, max_to_keep: int | None = None, save_interval_steps: int = 1,
                 directory: str | None = None, **options) -> ocp.CheckpointManager:
  """The train workdir's CheckpointManager (`WORKDIR/checkpoints`, or `directory`: any path orbax
  takes, gs://... included), items params/opt_state/meta.

  Save with `manager.save(step, args=save_args(params, opt_state, meta))`; `options` go to
  `ocp.CheckpointManagerOptions` (e.g. enable_async_checkpointing).
  """
  if not directory:
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
  elif "://" not in directory:
    directory = os.path.abspath(os.path.expanduser(directory))
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           save_interval_steps=save_interval_steps, create=True,
                                           **options),
      item_handlers={"params": ocp.StandardCheckpointHandler(),
                     "opt_state": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


def save_args(params: dict, opt_state, meta: dict) -> ocp.args.Composite:
  """The `args` of `manager.save` for one training step (meta: JSON-serialisable)."""
  return ocp.args.Composite(
      params=ocp.args.StandardSave({k: v for k, v in params.items() if v is not None}),
      opt_state=ocp.args.StandardSave(opt_state),
      meta=ocp.args.JsonSave(meta))


def saved_step(workdir: str, step: int | None) -> int:
  """`step` if the workdir saved it, else the latest saved step when `step` is None; raises a
  ConversionError naming the saved steps otherwise."""
  mgr = open_manager(workdir)
  steps = mgr.all_steps()
  mgr.close()
  where = os.path.join(workdir, CHECKPOINTS_DIR)
  if not steps:
    raise ConversionError(f"{where}: no checkpoints saved yet")
  if step is None:
    return max(steps)
  if step not in steps:
    raise ConversionError(f"{where}: no step {step} (saved steps: {sorted(steps)})")
  return step


def params_dir(workdir: str, step: int) -> str:
  """The orbax dir of a saved step's "params" item (restorable on its own)."""
  return os.path.join(workdir, CHECKPOINTS_DIR, str(step), "params")


def restore_train_state(workdir: str, params_target, opt_state_target, step: int | None = None):
  """(step, params, opt_state, meta) of a train workdir's step (latest by default); the targets
  are abstract trees (ShapeDtypeStructs with shardings) as `manager.restore` takes them."""
  step = saved_step(workdir, step)
  mgr = open_manager(workdir)
  out = mgr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(params_target),
      opt_state=ocp.args.StandardRestore(opt_state_target),
      meta=ocp.args.JsonRestore()))
  mgr.close()
  return step, dict(out["params"]), out["opt_state"], out["meta"]


def restore_meta(workdir: str, step: int) -> dict | None:
  """The step's "meta" item, or None for a step saved without one."""
  if not os.path.isdir(os.path.join(workdir, CHECKPOINTS_DIR, str(step), "meta")):
    return None
  mgr = open_manager(workdir)
  try:
    return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    mgr.close()


def init_workdir(workdir: str, pair: layout.Pair,
                 max_shard_size=safetensors_io.DEFAULT_MAX_SHARD_SIZE) -> str:
  """Makes `workdir` a train workdir for `pair` (pair.json, tokenizer/, hf_extra/) unless it is one
  already (a resumed run keeps its files). Returns the absolute path.

  The files are moved in with pair.json last, so a workdir that has pair.json is complete, and
  what is already there (e.g. the manager's checkpoints/) stays.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isfile(os.path.join(workdir, layout.PAIR_JSON)):
    with files.atomic_dir(workdir, marker=layout.PAIR_JSON) as tmp:
      layout.write_pair_files(tmp, pair, max_shard_size)
  os.makedirs(os.path.join(workdir, CHECKPOINTS_DIR), exist_ok=True)
  return workdir
