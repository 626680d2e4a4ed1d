"""The train workdir's checkpoints: an orbax CheckpointManager under WORKDIR/checkpoints.

Each saved step holds three items: "params" ({"base": params, "drafter": variables}, loop layout),
"opt_state" and "meta" (JSON: step, data position, rng, ...). The workdir's other files (pair.json,
tokenizer/, hf_extra/) are the pair dir's (`layout`), written once by `init_workdir`.

A step can be unreadable though orbax listed it (a file truncated or removed after the save, a
disk that lost data): `step_problem` applies orbax's own validation (its finalization check and
the `_CHECKPOINT_METADATA` it commits last) plus the items' metadata files, `latest_intact_step`
picks the newest step that passes it, and `restore_newest_intact` restores the newest step that
actually restores, falling back past bad ones with a warning naming each.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Callable, TypeVar

import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import step as ocp_step

from gemma_mtp_jax.checkpoint import layout
from gemma_mtp_jax.checkpoint import safetensors_io
from gemma_mtp_jax.checkpoint import trees
from gemma_mtp_jax.checkpoint.hf_names import ConversionError
from gemma_mtp_jax.utils import files

CHECKPOINTS_DIR = layout.CHECKPOINTS_DIR
# Orbax's step metadata, written when a step is committed; its item dirs' own metadata files.
STEP_METADATA = "_CHECKPOINT_METADATA"
_ITEM_METADATA = {"params": "_METADATA", "opt_state": "_METADATA", "meta": "metadata"}

log = logging.getLogger("gemma_mtp_jax.checkpoint")
T = TypeVar("T")


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


def _steps_dir(manager_or_dir) -> str:
  if isinstance(manager_or_dir, ocp.CheckpointManager):
    return str(manager_or_dir.directory)
  return os.path.join(os.path.abspath(manager_or_dir), CHECKPOINTS_DIR)


def _all_steps(manager_or_dir) -> list[int]:
  if isinstance(manager_or_dir, ocp.CheckpointManager):
    return sorted(manager_or_dir.all_steps())
  mgr = open_manager(manager_or_dir)
  try:
    return sorted(mgr.all_steps())
  finally:
    mgr.close()


def saved_step(workdir: str, step: int | None) -> int:
  """`step` if the workdir saved it, else the latest saved step when `step` is None; raises a
  ConversionError naming the saved steps otherwise."""
  steps = _all_steps(workdir)
  where = os.path.join(workdir, CHECKPOINTS_DIR)
  if not steps:
    raise ConversionError(f"{where}: no checkpoints saved yet")
  if step is None:
    return max(steps)
  if step not in steps:
    raise ConversionError(f"{where}: no step {step} (saved steps: {sorted(steps)})")
  return step


def step_problem(manager_or_dir, step: int) -> str | None:
  """Why a saved step cannot be restored, judged from its files without reading arrays (orbax's
  finalization check, its committed `_CHECKPOINT_METADATA`, each item's metadata file); None when
  it looks intact. `manager_or_dir`: a CheckpointManager or a train workdir."""
  d = os.path.join(_steps_dir(manager_or_dir), str(step))
  if "://" in d:  # remote storage: orbax's listing is the only check made here
    return None
  if not os.path.isdir(d):
    return f"{d} is missing"
  if not ocp_step.is_checkpoint_finalized(d):
    return f"{d} was never finalized by orbax"
  try:
    with open(os.path.join(d, STEP_METADATA), encoding="utf-8") as f:
      items = json.load(f).get("item_handlers") or {}
  except (OSError, ValueError, AttributeError) as e:
    return f"{os.path.join(d, STEP_METADATA)} is unreadable ({type(e).__name__})"
  for item in items:
    name = _ITEM_METADATA.get(item)
    p = os.path.join(d, item, name) if name else os.path.join(d, item)
    if not os.path.exists(p) or (os.path.isfile(p) and os.path.getsize(p) == 0):
      return f"{p} is missing or empty"
  return None


def latest_intact_step(manager_or_dir, step: int | None = None) -> int:
  """The newest saved step that `step_problem` finds intact (a warning names each newer step
  skipped); with `step`, that step if intact. Raises a ConversionError naming the bad step(s)."""
  where, steps = _candidates(manager_or_dir, step)
  bad = []
  for s in reversed(steps):
    problem = step_problem(manager_or_dir, s)
    if problem is None:
      _warn_skipped(where, bad, s)
      return s
    bad.append((s, problem))
  raise ConversionError(f"{where}: no intact checkpoint: " + "; ".join(
      f"step {s}: {p}" for s, p in bad))


def _candidates(manager_or_dir, step: int | None) -> tuple[str, list[int]]:
  """(steps dir, the steps to try, oldest first): all saved ones, or just `step`."""
  where = _steps_dir(manager_or_dir)
  steps = _all_steps(manager_or_dir)
  if step is not None:
    if step not in steps:
      raise ConversionError(f"{where}: no step {step} (saved steps: {steps})")
    steps = [step]
  if not steps:
    raise ConversionError(f"{where}: no checkpoints saved yet")
  return where, steps


def _warn_skipped(where: str, bad, used: int) -> None:
  for s, problem in bad:
    log.warning("checkpoint step %d in %s is unreadable (%s); using step %d instead", s, where,
                problem, used)


def restore_newest_intact(manager_or_dir, restore: Callable[[int], T],
                          step: int | None = None) -> tuple[int, T]:
  """(step, restore(step)) for the newest saved step that restores: steps are tried newest first,
  and one whose files are incomplete (`step_problem`) or whose `restore` raises (a truncated
  array file, non-finite weights, ...) is skipped with a warning naming it and why. With `step`
  only that step is tried. Raises one ConversionError naming every bad step when none restores.

  `manager_or_dir`: a CheckpointManager or a train workdir; `restore(step)` does the real work
  (e.g. `manager.restore(step, args=...)`), so this serves generate, convert and the trainer.
  """
  where, steps = _candidates(manager_or_dir, step)
  bad = []
  for s in reversed(steps):
    problem = step_problem(manager_or_dir, s)
    if problem is None:
      try:
        out = restore(s)
      except MemoryError:
        raise
      except Exception as e:  # noqa: BLE001 (orbax/TensorStore raise bare Exceptions)
        problem = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      else:
        _warn_skipped(where, bad, s)
        return s, out
    bad.append((s, problem))
  raise ConversionError(f"{where}: no intact checkpoint: " + "; ".join(
      f"step {s}: {p}" for s, p in bad))


def params_dir(workdir: str, step: int) -> str:
  """The orbax dir of a saved step's "params" item (restorable on its own)."""
  return os.path.join(workdir, CHECKPOINTS_DIR, str(step), "params")


def restore_step(mgr, step: int, params_target, opt_state_target):
  """(params, opt_state, meta) of one saved step, placed on the targets' shardings (abstract trees
  of ShapeDtypeStructs, as `manager.restore` takes them); the params are checked
  (`trees.check_tree`: dtypes, NaN/inf). Raises what orbax raises for an unreadable step, which
  `restore_newest_intact` turns into a fallback."""
  out = mgr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(params_target),
      opt_state=ocp.args.StandardRestore(opt_state_target),
      meta=ocp.args.JsonRestore()))
  params = dict(out["params"])
  trees.check_tree(params, os.path.join(_steps_dir(mgr), str(step), "params"))
  return params, out["opt_state"], out["meta"]


def restore_train_state(workdir: str, params_target, opt_state_target, step: int | None = None):
  """(step, params, opt_state, meta) of a train workdir's step: `step`, or the newest one that
  restores intact (`restore_newest_intact`: bad newer steps are skipped with a warning). The
  targets are abstract trees (ShapeDtypeStructs with shardings) as `manager.restore` takes them;
  the params are checked (`trees.check_tree`: dtypes, NaN/inf)."""
  mgr = open_manager(workdir)
  restore = functools.partial(restore_step, mgr, params_target=params_target,
                              opt_state_target=opt_state_target)
  try:
    step, (params, opt_state, meta) = restore_newest_intact(mgr, restore, step)
  finally:
    mgr.close()
  return step, params, opt_state, meta


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
    with files.atomic_dir(workdir, marker=layout.PAIR_JSON, kind="workdir") as tmp:
      layout.write_pair_files(tmp, pair, max_shard_size)
  os.makedirs(os.path.join(workdir, CHECKPOINTS_DIR), exist_ok=True)
  return workdir
