"""One loader for every source of a (base, drafter) pair, and the two conversions built on it.

`load_pair` reads an HF model dir or hub id (converted in memory, streamed one tensor at a time and
placed onto the target sharding), a pair dir, or a train workdir (latest step or `step`).
`hf_to_jax` writes a pair dir; `jax_to_hf` loads any source and exports it (`hf_export`).
The formats are described in the package docstring (`gemma_mtp_jax.checkpoint`).

The names callers reach as `checkpoint.<name>` (`from gemma_mtp_jax.checkpoint import pair as
checkpoint`) are importable from here too: the pair-dir layout (`layout`), the workdir's manager
(`workdir`) and `export_hf` (`hf_export`).
"""

from __future__ import annotations

import copy
import logging
import os

import orbax.checkpoint as ocp  # re-exported: callers build restore args as checkpoint.ocp.args

from gemma_mtp_jax.checkpoint import hf_export
from gemma_mtp_jax.checkpoint import hf_read
from gemma_mtp_jax.checkpoint import layout
from gemma_mtp_jax.checkpoint import safetensors_io
from gemma_mtp_jax.checkpoint import trees
from gemma_mtp_jax.checkpoint import workdir as workdir_lib
from gemma_mtp_jax.checkpoint.hf_export import export_hf
from gemma_mtp_jax.checkpoint.hf_names import ConversionError
from gemma_mtp_jax.checkpoint.hf_read import HF_MODEL_TYPES, hf_model_type
from gemma_mtp_jax.checkpoint.layout import (HF_EXTRA_DIR, PAIR_FORMAT, PAIR_JSON, PARAMS_DIR,
                                             TOKENIZER_DIR, Pair, make_pair, pair_configs,
                                             read_pair_json, save_params, write_pair_files)
from gemma_mtp_jax.checkpoint.trees import DTYPES
from gemma_mtp_jax.checkpoint.workdir import (CHECKPOINTS_DIR, init_workdir, latest_intact_step,
                                              open_manager, restore_newest_intact,
                                              restore_train_state, save_args, step_problem)
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.utils import files

__all__ = [
    "CHECKPOINTS_DIR", "DTYPES", "HF_EXTRA_DIR", "HF_MODEL_TYPES", "PAIR_FORMAT", "PAIR_JSON",
    "PARAMS_DIR", "TOKENIZER_DIR", "Pair", "detect_kind", "export_hf", "hf_model_type",
    "hf_to_jax", "init_workdir", "jax_to_hf", "latest_intact_step", "load_pair", "make_pair",
    "open_manager", "pair_configs", "read_pair_json", "restore_newest_intact", "restore_params",
    "restore_train_state", "save_args", "save_params", "step_problem", "write_pair_files", "ocp",
]

log = logging.getLogger("gemma_mtp_jax.convert")


def detect_kind(path: str) -> str:
  """"pair", "workdir" or "hf" for a local path; raises a clear error for anything else."""
  if not os.path.isdir(path):
    if os.path.isfile(path) and path.endswith(safetensors_io.PICKLE_SUFFIXES):
      safetensors_io.refuse_pickle(os.path.abspath(path))
    raise ConversionError(f"{path}: not a directory (expected an HF model dir, a pair dir or a "
                          "train workdir)")
  if os.path.isfile(os.path.join(path, PAIR_JSON)):
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
      return "pair"
    if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
      return "workdir"
    raise ConversionError(f"{path}: has {PAIR_JSON} but neither {PARAMS_DIR}/ nor "
                          f"{CHECKPOINTS_DIR}/")
  if hf_model_type(path):
    return "hf"
  cfg = os.path.join(path, safetensors_io.CONFIG_NAME)
  if os.path.isfile(cfg):
    raise ConversionError(f"{cfg}: model_type "
                          f"{safetensors_io.read_json(cfg).get('model_type')!r} is not a Gemma 4 "
                          f"model ({', '.join(HF_MODEL_TYPES)})")
  raise ConversionError(f"{path}: neither an HF model dir (config.json) nor a pair dir / train "
                        f"workdir ({PAIR_JSON})")


def _swap_drafter(pair: Pair, drafter: str, where: str, np_dtype, shardings) -> None:
  """Puts an HF drafter (checked against the pair's base) into a loaded pair, in place."""
  d_dir, d_repo = safetensors_io.resolve_model_dir(drafter)
  dcfg, variables, d_info = hf_read.read_drafter(d_dir, pair.base_cfg, where, np_dtype, shardings)
  pair.drafter_cfg, pair.params["drafter"] = dcfg, variables
  pj = copy.deepcopy(pair.meta["pair"])
  pj["drafter"] = config_lib.drafter_config_to_dict(dcfg)
  pj.setdefault("source", {})["drafter"] = d_repo or d_dir
  pj.setdefault("hf_extra", {})["drafter"] = d_info
  pair.meta["pair"] = pj


def _load_saved(path: str, kind: str, step, np_dtype, shardings, target) -> Pair:
  """The Pair of a pair dir (kind "pair") or a train workdir step (kind "workdir")."""
  path = os.path.abspath(path)
  pj = read_pair_json(path)
  try:
    base_cfg, dcfg = pair_configs(pj)
  except (config_lib.ConfigError, TypeError) as e:
    raise ConversionError(f"{os.path.join(path, PAIR_JSON)}: {e}") from None
  if kind == "pair":
    if step is not None:
      raise ConversionError(f"{path}: --step only applies to a train workdir, this is a pair dir")
    params_path = os.path.join(path, PARAMS_DIR)
    params = layout.restore_params_dir(params_path, target, shardings, np_dtype)
    trees.check_tree(params, params_path)
    train_meta = None
  else:
    def restore(s):
      where = workdir_lib.params_dir(path, s)
      params = layout.restore_params_dir(where, target, shardings, np_dtype)
      trees.check_tree(params, where)
      return params, workdir_lib.restore_meta(path, s)
    step, (params, train_meta) = workdir_lib.restore_newest_intact(path, restore, step)
  params.setdefault("drafter", None)
  if np_dtype is not None:
    base_cfg = trees.with_param_dtype(base_cfg, params["base"])
    if dcfg is not None:
      dcfg = dcfg.replace(text=trees.with_param_dtype(dcfg.text, params["drafter"]["params"]))
  tok = os.path.join(path, TOKENIZER_DIR)
  extra = os.path.join(path, HF_EXTRA_DIR)
  return Pair(base_cfg, dcfg, params, tok if os.path.isdir(tok) else None,
              dict(kind=kind, path=path, step=step, pair=pj, train=train_meta,
                   extra_dir=extra if os.path.isdir(extra) else None))


def _check_source(path: str | None, flag: str) -> None:
  """Refuses a missing local path up front (before any loading): only a hub id may not exist."""
  if path is not None and not os.path.exists(path) and not files.is_hub_id(path):
    raise ConversionError(f"no such directory: {path} ({flag})")


def _load(path, drafter, step, dtype, shardings, target) -> Pair:
  np_dtype = trees.as_dtype(dtype)
  _check_source(path, "base")
  _check_source(drafter, "drafter")
  # A path that does not exist here is a hub id (checked just above).
  kind = detect_kind(path) if os.path.exists(path) else "hf"
  if kind == "hf":
    if step is not None:
      raise ConversionError(f"{path}: --step only applies to a train workdir")
    return hf_read.load_hf(path, drafter, np_dtype, shardings)
  pair = _load_saved(path, kind, step, np_dtype, shardings, target)
  if drafter is not None:  # swap in (or add) an HF drafter, checked against this base
    _swap_drafter(pair, drafter, os.path.join(pair.meta["path"], PAIR_JSON), np_dtype, shardings)
  return pair


def load_pair(path_or_repo: str, drafter: str | None = None, step: int | None = None,
              dtype: str | None = None, shardings=None) -> Pair:
  """The one loader the trainer, the decoder and jax-to-hf use.

  Args:
    path_or_repo: an HF Gemma 4 model dir or hub id (converted in memory: tensors streamed one at
      a time and placed onto `shardings` as they are converted), a pair dir, or a train workdir.
    drafter: an HF assistant dir or hub id; with an HF base it is converted beside it, with a pair
      dir / workdir it replaces the stored drafter. Checked against the base (`check_fits`).
    step: workdir step (default: latest).
    dtype: "bfloat16" / "float32" to cast float params to (logged); None keeps stored dtypes.
    shardings: None (default device), one Sharding, a callable path -> Sharding, or a pytree shaped
      like {"base": params, "drafter": variables} (loop layout).
  """
  return _load(path_or_repo, drafter, step, dtype, shardings, None)


def restore_params(path: str, step: int | None = None, target=None, shardings=None,
                   dtype: str | None = None) -> dict:
  """{"base": params, "drafter": variables or None} from a pair dir, a train workdir (latest step
  or `step`) or an HF dir (converted in memory).

  Args:
    target: abstract tree to restore into (ShapeDtypeStructs with shardings); default: the saved
      shapes, `dtype` for float leaves (logged), placed by `shardings`.
    shardings: None (default device), one Sharding, a callable path -> Sharding, or a pytree.
  """
  return _load(path, None, step, dtype, shardings, target).params


def _local(*paths) -> list[str]:
  return [p for p in paths if p is not None and os.path.exists(p)]


def hf_to_jax(base: str, out_dir: str, drafter: str | None = None, dtype: str | None = None,
              overwrite: bool = False,
              max_shard_size=safetensors_io.DEFAULT_MAX_SHARD_SIZE) -> str:
  """Converts an HF base (+ assistant) into a pair dir at `out_dir`, atomically. Returns its path.

  Refused before any work: an `out_dir` that is, contains or lies inside an input, and an
  existing one unless `overwrite` and it is a dir this project wrote (`layout.check_output`)."""
  layout.check_output(out_dir, overwrite, _local(base, drafter))
  pair = load_pair(base, drafter=drafter, dtype=dtype)
  with files.atomic_dir(out_dir, replace=overwrite, kind="pair") as tmp:
    save_params(os.path.join(tmp, PARAMS_DIR), pair.params)
    write_pair_files(tmp, pair, max_shard_size)
  log.info("wrote %s", os.path.abspath(out_dir))
  return os.path.abspath(out_dir)


def jax_to_hf(checkpoint: str, out_dir: str, step: int | None = None, drafter: str | None = None,
              overwrite: bool = False, max_shard_size=None, dtype: str | None = None,
              num_assistant_tokens: int | None = None, assistant_schedule: str | None = None) -> str:
  """Exports a pair dir, a train workdir (`step`, else the newest intact step) or an HF dir to HF
  dirs, with the same output checks as `hf_to_jax`."""
  inputs = _local(checkpoint, drafter)
  layout.check_output(out_dir, overwrite, inputs)  # fail before any restore work
  hf_export.check_num_assistant_tokens(num_assistant_tokens)
  pair = load_pair(checkpoint, drafter=drafter, step=step)
  return export_hf(pair, out_dir, overwrite, max_shard_size, dtype, num_assistant_tokens,
                   assistant_schedule, inputs=inputs)
