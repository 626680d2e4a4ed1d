"""The JAX-side on-disk formats of a (base, drafter) pair, and one loader for every source.

Pair dir (what `python -m gemma_mtp_jax.convert hf-to-jax` writes):
  pair.json    {"format": PAIR_FORMAT, "base": ModelConfig dict, "drafter": DrafterConfig dict or null,
                "dtype": stored float dtype of the base, "source": {"base", "drafter"},
                "hf_extra": {"base": ..., "drafter": ...}}  (see below)
  params/      orbax checkpoint of {"base": params, "drafter": variables} (loop layout `layer_{i}`)
  tokenizer/   the base's tokenizer, chat template and processor files, as HF ships them
  hf_extra/    safetensors of tensors carried through untouched (Gemma4ForConditionalGeneration's
               vision/audio towers and projectors), when the base has any

Train workdir (what the trainer writes; the same pair.json, tokenizer/ and hf_extra/):
  checkpoints/ an `ocp.CheckpointManager` (`open_manager`); each step holds items "params"
               ({"base", "drafter"}), "opt_state" and "meta" (JSON: step, data position, rng, ...)

`hf_extra[model]` keeps what the exporter needs to write HF dirs that equal the source bit for bit:
  config / generation_config: the source's JSON dicts (None if absent)
  prefix: where the text model's tensors live (`model.` causal LM, `model.language_model.` multimodal)
  tensors: name -> [dtype, shape] of every source tensor (the source dtypes, and the shard-layout check)
  layout: name -> shard file of the source; index_metadata: its index.json "metadata" (or None)
  extra: names of the carried-through tensors (base only)

`load_pair` reads any of: an HF model dir or hub id (converted in memory, streamed one tensor at a
time and placed onto the target sharding), a pair dir, or a train workdir (latest step or `step`).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.checkpoint import hf_base as convert_base
from gemma_mtp_jax.checkpoint import hf_assistant as convert_drafter
from gemma_mtp_jax.checkpoint import safetensors_io as io
from gemma_mtp_jax.checkpoint.hf_names import ConversionError

log = logging.getLogger("gemma_mtp_jax.convert")

PAIR_FORMAT = "gemma_mtp_jax.pair/1"
PAIR_JSON = "pair.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
HF_EXTRA_DIR = "hf_extra"
CHECKPOINTS_DIR = "checkpoints"
HF_MODEL_TYPES = ("gemma4", "gemma4_text", "gemma4_assistant")
DTYPES = ("bfloat16", "float32")
DEFAULT_NUM_ASSISTANT_TOKENS = 4
DEFAULT_ASSISTANT_SCHEDULE = "constant"
# Tensors HF keeps as buffers, not parameters: left out of the index's "total_parameters".
_BUFFER_SUFFIXES = ("layer_scalar", "token_ordering", "input_max", "input_min", "output_max",
                    "output_min")


@dataclasses.dataclass
class Pair:
  """A loaded (base, drafter) pair.

  params: {"base": Flax params, "drafter": drafter variables {"params", "buffers"} or None}, as
    jax.Arrays placed on `shardings` (default device otherwise).
  tokenizer_path: a dir with the base's tokenizer files, or None.
  meta: "kind" (hf | pair | workdir), "path", "step", "pair" (the pair.json dict), "train" (the
    workdir's "meta" item or None), "extra_dir" (safetensors dir holding carried-through tensors).
  """

  base_cfg: config_lib.ModelConfig
  drafter_cfg: config_lib.DrafterConfig | None
  params: dict
  tokenizer_path: str | None
  meta: dict


# ------------------------------------------------------------------------------ helpers
def _is_float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


def _dtype_name(dtypes) -> str | None:
  """"bfloat16" / "float32" if all float dtypes agree, "mixed(...)" otherwise, None if none."""
  names = sorted({np.dtype(d).name for d in dtypes if _is_float(d)})
  if not names:
    return None
  return names[0] if len(names) == 1 else f"mixed({','.join(names)})"


def _as_dtype(dtype: str | None):
  if dtype is None:
    return None
  if dtype not in DTYPES:
    raise ConversionError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  return np.dtype(jnp.dtype(dtype))


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _sharding_lookup(shardings) -> Callable[[tuple[str, ...]], Any]:
  """path -> Sharding or None, from None, one Sharding for all leaves, a callable, or a pytree
  shaped like {"base": params, "drafter": variables}."""
  if shardings is None:
    return lambda path: None
  if isinstance(shardings, jax.sharding.Sharding):
    return lambda path: shardings
  if callable(shardings):
    return shardings

  def lookup(path):
    node = shardings
    for k in path:
      if not isinstance(node, Mapping) or k not in node:
        raise ConversionError(f"shardings have no entry for param {'/'.join(path)}")
      node = node[k]
    return node
  return lookup


def _placer(shardings, root: str):
  lookup = _sharding_lookup(shardings)

  def place(path, x):
    s = lookup((root,) + tuple(path))
    return jax.device_put(x, s) if s is not None else jax.device_put(x)
  return place


def _place_tree(tree: dict, place, prefix=()) -> dict:
  """Places a numpy tree leaf by leaf, dropping each host copy once its device copy exists."""
  out = {}
  for k in list(tree):
    v = tree.pop(k)
    out[k] = _place_tree(v, place, prefix + (k,)) if isinstance(v, Mapping) else place(
        prefix + (k,), v)
  return out


class _Stream:
  """Reads tensors one at a time from a Reader; with `dtype`, casts float tensors (counted)."""

  def __init__(self, reader: io.Reader, dtype, label: str):
    self.reader, self.dtype, self.label = reader, dtype, label
    self.casts: collections.Counter = collections.Counter()

  def get(self, name: str) -> np.ndarray:
    x = self.reader.get(name)
    if self.dtype is not None and _is_float(x.dtype) and x.dtype != self.dtype:
      self.casts[(x.dtype.name, self.dtype.name)] += 1
      x = x.astype(self.dtype)
    return x

  def log(self) -> None:
    for (a, b), n in sorted(self.casts.items()):
      log.info("%s: cast %d tensors %s -> %s (dtype=%s requested)", self.label, n, a, b,
               self.dtype.name)
    if self.dtype is None:
      kept = collections.Counter(s.dtype.name for s in self.reader.specs.values())
      log.info("%s: kept stored dtypes %s", self.label, dict(kept))


def _with_param_dtype(cfg: config_lib.ModelConfig, tree) -> config_lib.ModelConfig:
  name = _dtype_name(x.dtype for x in jax.tree.leaves(tree))
  return cfg.replace(param_dtype=name) if name in DTYPES else cfg


def _same_model(a: config_lib.ModelConfig, b: config_lib.ModelConfig) -> bool:
  """Equal architectures (numerics and compilation settings aside)."""
  return a.architecture() == b.architecture()


# ------------------------------------------------------------------------------ HF sources
def hf_model_type(path: str) -> str | None:
  """The `model_type` of an HF model dir's config.json if it is a Gemma 4 one, else None."""
  p = os.path.join(path, io.CONFIG_NAME)
  if not os.path.isfile(p):
    return None
  mt = io.read_json(p).get("model_type")
  return mt if mt in HF_MODEL_TYPES else None


def _hf_info(reader: io.Reader, src_dir: str, hf_config: dict) -> dict:
  gen_path = os.path.join(src_dir, io.GENERATION_CONFIG_NAME)
  return dict(
      config=hf_config,
      generation_config=io.read_json(gen_path) if os.path.isfile(gen_path) else None,
      tensors={n: s.to_json() for n, s in reader.specs.items()},
      layout=dict(reader.weight_map),
      index_metadata=reader.index_metadata,
  )


def _read_hf_base(src_dir: str, dtype, shardings):
  """(ModelConfig, params, hf_extra info) of an HF Gemma 4 base dir, streamed and placed."""
  cfg_path = os.path.join(src_dir, io.CONFIG_NAME)
  hf_config = io.read_json(cfg_path)
  if hf_config.get("model_type") == "gemma4_assistant":
    raise ConversionError(f"{cfg_path}: this is an assistant (drafter) checkpoint; pass it as the "
                          "drafter (--drafter), with the base model as the base")
  try:
    cfg = config_lib.ModelConfig.from_hf_config(hf_config)
  except config_lib.ConfigError as e:
    raise ConversionError(f"{cfg_path}: {e}") from None
  with io.Reader(src_dir) as reader:
    stream = _Stream(reader, dtype, f"base {src_dir}")
    params, extra = convert_base.hf_to_params(cfg, stream.get, reader.keys(), where=reader.where(),
                                              place=_placer(shardings, "base"))
    stream.log()
    info = _hf_info(reader, src_dir, hf_config)
  info["prefix"] = convert_base.detect_prefix(info["tensors"])
  info["extra"] = sorted(extra)
  if extra:
    log.info("base: carrying %d non-text tensors (vision/audio) through untouched", len(extra))
  return _with_param_dtype(cfg, params), params, info


def _read_hf_drafter(src_dir: str, base_cfg: config_lib.ModelConfig, base_where: str, dtype,
                     shardings):
  """(DrafterConfig, variables, hf_extra info) of an HF assistant dir, checked against the base."""
  cfg_path = os.path.join(src_dir, io.CONFIG_NAME)
  hf_config = io.read_json(cfg_path)
  if hf_config.get("model_type") != "gemma4_assistant":
    raise ConversionError(f"{cfg_path}: model_type is {hf_config.get('model_type')!r}; the drafter "
                          "must be a 'gemma4_assistant' checkpoint")
  try:
    dcfg = config_lib.DrafterConfig.from_hf_config(hf_config)
  except config_lib.ConfigError as e:
    raise ConversionError(f"{cfg_path}: {e}") from None
  try:
    dcfg.check_fits(base_cfg)
  except config_lib.ConfigError as e:
    raise ConversionError(f"{cfg_path}: the drafter does not fit the base ({base_where}): {e}") from None
  with io.Reader(src_dir) as reader:
    stream = _Stream(reader, dtype, f"drafter {src_dir}")
    variables = convert_drafter.hf_to_variables(dcfg, stream.get, reader.keys(), where=reader.where())
    stream.log()
    info = _hf_info(reader, src_dir, hf_config)
  # The drafter is small next to the base: placed after conversion, leaf by leaf.
  variables = _place_tree(variables, _placer(shardings, "drafter"))
  dcfg = dcfg.replace(text=_with_param_dtype(dcfg.text, variables["params"]))
  return dcfg, variables, info


def _tokenizer_dir(src_dir: str) -> str | None:
  names = set(os.listdir(src_dir))
  if names & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}:
    return src_dir
  return None


def _pair_json(base_cfg, drafter_cfg, params, source, hf_extra) -> dict:
  return {
      "format": PAIR_FORMAT,
      "base": config_lib.model_config_to_dict(base_cfg),
      "drafter": config_lib.drafter_config_to_dict(drafter_cfg) if drafter_cfg else None,
      "dtype": _dtype_name(x.dtype for x in jax.tree.leaves(params["base"])),
      "source": source,
      "hf_extra": hf_extra,
  }


def _load_hf(base: str, drafter: str | None, dtype, shardings) -> Pair:
  base_dir, base_repo = io.resolve_model_dir(base)
  base_cfg, params, base_info = _read_hf_base(base_dir, dtype, shardings)
  dcfg, variables, d_info, d_src = None, None, None, None
  if drafter is not None:
    d_dir, d_repo = io.resolve_model_dir(drafter)
    dcfg, variables, d_info = _read_hf_drafter(d_dir, base_cfg,
                                               os.path.join(base_dir, io.CONFIG_NAME), dtype,
                                               shardings)
    d_src = d_repo or d_dir
  all_params = {"base": params, "drafter": variables}
  pair_json = _pair_json(base_cfg, dcfg, all_params, {"base": base_repo or base_dir,
                                                      "drafter": d_src},
                         {"base": base_info, "drafter": d_info})
  return Pair(base_cfg, dcfg, all_params, _tokenizer_dir(base_dir),
              dict(kind="hf", path=base_dir, step=None, pair=pair_json, train=None,
                   extra_dir=base_dir))


def make_pair(base_cfg: config_lib.ModelConfig, drafter_cfg: config_lib.DrafterConfig | None,
              params: dict, tokenizer_path: str | None = None) -> Pair:
  """A Pair for params made in memory (e.g. a from-scratch init); exports generate HF configs.

  params: {"base": ..., "drafter": ... or None} with plain (unboxed) arrays, loop layout.
  """
  params = {"base": params["base"], "drafter": params.get("drafter")}
  pj = _pair_json(base_cfg, drafter_cfg, params, {"base": None, "drafter": None},
                  {"base": None, "drafter": None})
  return Pair(base_cfg, drafter_cfg, params, tokenizer_path,
              dict(kind="memory", path=None, step=None, pair=pj, train=None, extra_dir=None))


# ------------------------------------------------------------------------------ orbax
def save_params(path: str, params: dict) -> None:
  """Writes {"base": ..., "drafter": ...} (None entries dropped) as an orbax checkpoint.

  One zarr array per leaf rather than OCDBT: OCDBT's write path buffers data on the host (about
  0.3-0.5x a 400 MB model in `bench_convert`), the per-array layout writes straight through. Any
  orbax restore reads both layouts.
  """
  ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False))
  ckptr.save(os.path.abspath(path),
             args=ocp.args.StandardSave({k: v for k, v in params.items() if v is not None}))
  ckptr.close()


def _abstract(tree_metadata, shardings, dtype):
  """ShapeDtypeStructs for a restore: saved shapes, `dtype` for float leaves, target shardings."""
  lookup = _sharding_lookup(shardings)
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  casts = collections.Counter()

  def leaf(path, m):
    dt = m.dtype
    if dtype is not None and _is_float(dt) and np.dtype(dt) != dtype:
      casts[(np.dtype(dt).name, dtype.name)] += 1
      dt = dtype
    return jax.ShapeDtypeStruct(m.shape, dt, sharding=lookup(_path_keys(path)) or default)

  out = jax.tree_util.tree_map_with_path(leaf, tree_metadata)
  for (a, b), n in sorted(casts.items()):
    log.info("restore: cast %d tensors %s -> %s (dtype=%s requested)", n, a, b, b)
  return out


def _restore_tree(params_dir: str, target=None, shardings=None, dtype=None) -> dict:
  ckptr = ocp.StandardCheckpointer()
  if target is None:
    md = ckptr.metadata(params_dir)
    md = getattr(md, "item_metadata", md)
    target = _abstract(getattr(md, "tree", md), shardings, dtype)
  out = ckptr.restore(params_dir, target)
  ckptr.close()
  return dict(out)


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


def _workdir_step(workdir: str, step: int | None) -> int:
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


def restore_train_state(workdir: str, params_target, opt_state_target, step: int | None = None):
  """(step, params, opt_state, meta) of a train workdir's step (latest by default); the targets
  are abstract trees (ShapeDtypeStructs with shardings) as `manager.restore` takes them."""
  step = _workdir_step(workdir, step)
  mgr = open_manager(workdir)
  out = mgr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(params_target),
      opt_state=ocp.args.StandardRestore(opt_state_target),
      meta=ocp.args.JsonRestore()))
  mgr.close()
  return step, dict(out["params"]), out["opt_state"], out["meta"]


def _restore_meta(workdir: str, step: int) -> dict | None:
  """The step's "meta" item, or None for a step saved without one."""
  if not os.path.isdir(os.path.join(workdir, CHECKPOINTS_DIR, str(step), "meta")):
    return None
  mgr = open_manager(workdir)
  try:
    return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    mgr.close()


def detect_kind(path: str) -> str:
  """"pair", "workdir" or "hf" for a local path; raises a clear error for anything else."""
  if not os.path.isdir(path):
    if os.path.isfile(path) and path.endswith(io.PICKLE_SUFFIXES):
      io.refuse_pickle(os.path.abspath(path))
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
  cfg = os.path.join(path, io.CONFIG_NAME)
  if os.path.isfile(cfg):
    raise ConversionError(f"{cfg}: model_type {io.read_json(cfg).get('model_type')!r} is not a "
                          f"Gemma 4 model ({', '.join(HF_MODEL_TYPES)})")
  raise ConversionError(f"{path}: neither an HF model dir (config.json) nor a pair dir / train "
                        f"workdir ({PAIR_JSON})")


def read_pair_json(path: str) -> dict:
  p = os.path.join(path, PAIR_JSON)
  j = io.read_json(p)
  if j.get("format") != PAIR_FORMAT:
    raise ConversionError(f"{p}: format is {j.get('format')!r}, expected {PAIR_FORMAT!r}")
  return j


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


def _load(path, drafter, step, dtype, shardings, target) -> Pair:
  np_dtype = _as_dtype(dtype)
  if not os.path.exists(path):  # a hub id (resolve_model_dir checks the form)
    if step is not None:
      raise ConversionError(f"{path}: --step only applies to a train workdir")
    return _load_hf(path, drafter, np_dtype, shardings)
  kind = detect_kind(path)
  if kind == "hf":
    if step is not None:
      raise ConversionError(f"{path}: --step only applies to a train workdir")
    return _load_hf(path, drafter, np_dtype, shardings)
  path = os.path.abspath(path)
  pj = read_pair_json(path)
  where = os.path.join(path, PAIR_JSON)
  try:
    base_cfg = config_lib.model_config_from_dict(pj["base"], "base")
    dcfg = config_lib.drafter_config_from_dict(pj["drafter"]) if pj.get("drafter") else None
  except (config_lib.ConfigError, TypeError) as e:
    raise ConversionError(f"{where}: {e}") from None
  if kind == "pair":
    if step is not None:
      raise ConversionError(f"{path}: --step only applies to a train workdir, this is a pair dir")
    params, train_meta = _restore_tree(os.path.join(path, PARAMS_DIR), target, shardings,
                                       np_dtype), None
  else:
    step = _workdir_step(path, step)
    step_dir = os.path.join(path, CHECKPOINTS_DIR, str(step), "params")
    params, train_meta = _restore_tree(step_dir, target, shardings, np_dtype), _restore_meta(path,
                                                                                           step)
  params.setdefault("drafter", None)
  if np_dtype is not None:
    base_cfg = _with_param_dtype(base_cfg, params["base"])
    if dcfg is not None:
      dcfg = dcfg.replace(text=_with_param_dtype(dcfg.text, params["drafter"]["params"]))
  tok = os.path.join(path, TOKENIZER_DIR)
  extra = os.path.join(path, HF_EXTRA_DIR)
  pair = Pair(base_cfg, dcfg, params, tok if os.path.isdir(tok) else None,
              dict(kind=kind, path=path, step=step, pair=pj, train=train_meta,
                   extra_dir=extra if os.path.isdir(extra) else None))
  if drafter is not None:  # swap in (or add) an HF drafter, checked against this base
    d_dir, d_repo = io.resolve_model_dir(drafter)
    dcfg, variables, d_info = _read_hf_drafter(d_dir, base_cfg, where, np_dtype, shardings)
    pair.drafter_cfg, pair.params["drafter"] = dcfg, variables
    pj = copy.deepcopy(pj)
    pj["drafter"] = config_lib.drafter_config_to_dict(dcfg)
    pj.setdefault("source", {})["drafter"] = d_repo or d_dir
    pj.setdefault("hf_extra", {})["drafter"] = d_info
    pair.meta["pair"] = pj
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


# ------------------------------------------------------------------------------ writing pair dirs
def write_pair_files(dst: str, pair: Pair, max_shard_size=io.DEFAULT_MAX_SHARD_SIZE) -> None:
  """pair.json, tokenizer/ and hf_extra/ of `pair` into dst (shared by pair dirs and workdirs)."""
  pj = pair.meta["pair"]
  pj = _pair_json(pair.base_cfg, pair.drafter_cfg, pair.params, pj.get("source"),
                  pj.get("hf_extra"))
  if pair.tokenizer_path:
    io.copy_files(pair.tokenizer_path, io.aux_files(pair.tokenizer_path),
                  os.path.join(dst, TOKENIZER_DIR))
  extra = ((pj.get("hf_extra") or {}).get("base") or {}).get("extra") or []
  if extra:
    out = os.path.join(dst, HF_EXTRA_DIR)
    os.makedirs(out)
    with io.Reader(pair.meta["extra_dir"]) as reader:
      io.write_safetensors(out, {n: reader.specs[n] for n in extra}, reader.get, max_shard_size)
  io.write_json(os.path.join(dst, PAIR_JSON), pj)  # last: its presence marks a complete dir


def init_workdir(workdir: str, pair: Pair, max_shard_size=io.DEFAULT_MAX_SHARD_SIZE) -> str:
  """Makes `workdir` a train workdir for `pair` (pair.json, tokenizer/, hf_extra/) unless it is one
  already (a resumed run keeps its files). Returns the absolute path."""
  from gemma_mtp_jax.data import tokenizer as tokenizer_lib  # atomic_dir: files moved in, marker last

  workdir = os.path.abspath(workdir)
  if not os.path.isfile(os.path.join(workdir, PAIR_JSON)):
    with tokenizer_lib.atomic_dir(workdir, PAIR_JSON) as tmp:
      write_pair_files(tmp, pair, max_shard_size)
  os.makedirs(os.path.join(workdir, CHECKPOINTS_DIR), exist_ok=True)
  return workdir


def hf_to_jax(base: str, out_dir: str, drafter: str | None = None, dtype: str | None = None,
              overwrite: bool = False, max_shard_size=io.DEFAULT_MAX_SHARD_SIZE) -> str:
  """Converts an HF base (+ assistant) into a pair dir at `out_dir`, atomically. Returns its path."""
  io.check_output(out_dir, overwrite)  # fail before any conversion work
  pair = load_pair(base, drafter=drafter, dtype=dtype)
  with io.atomic_output(out_dir, overwrite) as tmp:
    save_params(os.path.join(tmp, PARAMS_DIR), pair.params)
    write_pair_files(tmp, pair, max_shard_size)
  log.info("wrote %s", os.path.abspath(out_dir))
  return os.path.abspath(out_dir)


# ------------------------------------------------------------------------------ HF export
def _cast_for_export(tensors: dict, dtype, source_tensors: Mapping | None, label: str) -> dict:
  """Casts float tensors to `dtype` (logged); without it, warns where dtypes differ from the source."""
  if dtype is not None:
    casts = collections.Counter()
    for n, x in tensors.items():
      if _is_float(x.dtype) and x.dtype != dtype:
        casts[(x.dtype.name, dtype.name)] += 1
        tensors[n] = x.astype(dtype)
    for (a, b), n in sorted(casts.items()):
      log.info("%s: cast %d tensors %s -> %s (dtype=%s requested)", label, n, a, b, b)
    return tensors
  if source_tensors:
    changed = collections.Counter(
        (io.TensorSpec.from_json(source_tensors[n]).dtype.name, x.dtype.name)
        for n, x in tensors.items()
        if n in source_tensors and io.TensorSpec.from_json(source_tensors[n]).dtype != x.dtype)
    for (a, b), n in sorted(changed.items()):
      log.warning("%s: writing %d tensors as %s (as held in the checkpoint); the source stored %s "
                  "(pass --dtype %s to match it)", label, n, b, a, a)
  return tensors


def _layout(specs: Mapping[str, io.TensorSpec], info: Mapping, max_shard_size):
  """The source's shard layout when the same tensors (names, shapes, dtypes) are written and no
  shard size was asked for: the files then equal the source's byte for byte."""
  src = info.get("tensors") or {}
  if (max_shard_size is not None or not info.get("layout") or set(src) != set(specs)
      or any(io.TensorSpec.from_json(src[n]) != s for n, s in specs.items())):
    return None, None
  return info["layout"], (info.get("index_metadata") or {}).get("total_parameters")


def _count_parameters(specs: Mapping[str, io.TensorSpec]) -> int:
  return sum(int(np.prod(s.shape)) for n, s in specs.items() if not n.endswith(_BUFFER_SUFFIXES))


def _write_weights(out: str, specs, get, info, max_shard_size) -> None:
  layout, total = _layout(specs, info, max_shard_size)
  io.write_safetensors(out, specs, get, max_shard_size or io.DEFAULT_MAX_SHARD_SIZE, layout,
                       total if total is not None else _count_parameters(specs))


def _fresh_config_json(hf_config) -> dict:
  """What `save_pretrained` writes for a transformers config object (its diff to the defaults)."""
  import json
  return json.loads(hf_config.to_json_string())


def _base_config_json(cfg: config_lib.ModelConfig, info: Mapping, dtype_name: str | None) -> dict:
  orig = info.get("config")
  if orig is not None and _same_model(config_lib.ModelConfig.from_hf_config(orig), cfg):
    out = copy.deepcopy(orig)
  else:
    import transformers
    text = _fresh_config_json(transformers.Gemma4TextConfig(**cfg.to_hf_config()))
    if orig is not None and orig.get("model_type") == "gemma4":
      out = copy.deepcopy(orig)
      text.pop("dtype", None)
      out["text_config"] = text
    else:
      out = dict(text, architectures=["Gemma4ForCausalLM"])
    log.info("base config.json generated from the JAX config (%s)",
             "no source config" if orig is None else "the architecture differs from the source's")
  if dtype_name in DTYPES and out.get("dtype") != dtype_name:
    if "dtype" in out:
      log.info("base config.json: dtype %s -> %s", out["dtype"], dtype_name)
    out["dtype"] = dtype_name
  return out


def _drafter_config_json(dcfg: config_lib.DrafterConfig, info: Mapping,
                         dtype_name: str | None) -> dict:
  orig = info.get("config")
  src = config_lib.DrafterConfig.from_hf_config(orig) if orig is not None else None
  if src is not None and _same_model(src.text, dcfg.text) and src.replace(text=dcfg.text) == dcfg:
    out = copy.deepcopy(orig)
  else:
    import transformers
    d = dcfg.to_hf_config()
    text = _fresh_config_json(transformers.Gemma4TextConfig(**d.pop("text_config")))
    out = _fresh_config_json(transformers.Gemma4AssistantConfig(text_config=text, **d))
    out["architectures"] = ["Gemma4AssistantForCausalLM"]
    log.info("drafter config.json generated from the JAX config")
  if dtype_name in DTYPES and out.get("dtype") != dtype_name:
    out["dtype"] = dtype_name
  return out


def _generation_config(cfg: config_lib.ModelConfig, orig: Mapping | None) -> dict:
  if orig is not None:
    return copy.deepcopy(dict(orig))
  eos = cfg.eos_token_id
  return {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(eos) if isinstance(eos, tuple)
          else eos, "pad_token_id": cfg.pad_token_id}


def _hf_extra(pair: Pair, model: str) -> dict:
  return ((pair.meta.get("pair") or {}).get("hf_extra") or {}).get(model) or {}


def _export_base(pair: Pair, out: str, max_shard_size, dtype) -> None:
  cfg, info = pair.base_cfg, _hf_extra(pair, "base")
  from gemma_mtp_jax.model import transformer  # the scan <-> loop layout helpers

  params = pair.params["base"]
  if any(k.startswith("scan_") for k in params):
    params = transformer.unstack_layer_params(cfg, params)
  tensors = convert_base.params_to_hf(cfg, params, info.get("prefix", convert_base.CAUSAL_PREFIX))
  tensors = _cast_for_export(tensors, dtype, info.get("tensors"), "base")
  dtype_name = _dtype_name(x.dtype for x in tensors.values())
  specs = {n: io.TensorSpec.of(x) for n, x in tensors.items()}
  extra = info.get("extra") or []
  reader = None
  if extra:
    if not pair.meta.get("extra_dir"):
      raise ConversionError(f"{pair.meta.get('path')}: pair.json lists {len(extra)} carried-through "
                            f"tensors (e.g. {extra[0]!r}) but there is no {HF_EXTRA_DIR}/")
    reader = io.Reader(pair.meta["extra_dir"])
    missing = [n for n in extra if n not in reader.specs]
    if missing:
      raise ConversionError(f"{reader.where()}: missing carried-through tensor {missing[0]!r}")
    specs.update({n: reader.specs[n] for n in extra})
  os.makedirs(out)
  # pop: each HF tensor is dropped once its shard is written.
  get = lambda n: tensors.pop(n) if n in tensors else reader.get(n)
  try:
    _write_weights(out, specs, get, info, max_shard_size)
  finally:
    if reader is not None:
      reader.close()
  io.write_json(os.path.join(out, io.CONFIG_NAME), _base_config_json(cfg, info, dtype_name))
  io.write_json(os.path.join(out, io.GENERATION_CONFIG_NAME),
                _generation_config(cfg, info.get("generation_config")))
  if pair.tokenizer_path:
    io.copy_files(pair.tokenizer_path, io.aux_files(pair.tokenizer_path), out)


def _export_drafter(pair: Pair, out: str, max_shard_size, dtype, num_assistant_tokens,
                    assistant_schedule) -> None:
  dcfg, info = pair.drafter_cfg, _hf_extra(pair, "drafter")
  tensors = convert_drafter.variables_to_hf(dcfg, pair.params["drafter"])
  tensors = _cast_for_export(tensors, dtype, info.get("tensors"), "drafter")
  dtype_name = _dtype_name(x.dtype for x in tensors.values())
  specs = {n: io.TensorSpec.of(x) for n, x in tensors.items()}
  os.makedirs(out)
  _write_weights(out, specs, tensors.pop, info, max_shard_size)
  io.write_json(os.path.join(out, io.CONFIG_NAME), _drafter_config_json(dcfg, info, dtype_name))
  gen = _generation_config(dcfg.text, info.get("generation_config"))
  # generate(assistant_model=...) reads these from the assistant's generation config.
  for key, flag, default in (("num_assistant_tokens", num_assistant_tokens,
                              DEFAULT_NUM_ASSISTANT_TOKENS),
                             ("num_assistant_tokens_schedule", assistant_schedule,
                              DEFAULT_ASSISTANT_SCHEDULE)):
    value = flag if flag is not None else gen.get(key) or default
    if gen.get(key) != value:
      log.info("drafter generation_config.json: %s = %r", key, value)
    gen[key] = value
  io.write_json(os.path.join(out, io.GENERATION_CONFIG_NAME), gen)


def export_hf(pair: Pair, out_dir: str, overwrite: bool = False, max_shard_size=None,
              dtype: str | None = None, num_assistant_tokens: int | None = None,
              assistant_schedule: str | None = None) -> str:
  """Writes `out_dir/base/` and `out_dir/drafter/` (if the pair has one) as HF model dirs, atomically.

  Args:
    max_shard_size: e.g. "5GB"; None keeps the source's shard layout when the tensors are unchanged
      (then the files equal the source's), else transformers' default "5GB".
    dtype: cast float tensors to "bfloat16"/"float32" (logged); None writes them as held.
    num_assistant_tokens / assistant_schedule: the drafter's generation_config values (None: the
      source's, else 4 / "constant").
  """
  np_dtype = _as_dtype(dtype)
  io.check_output(out_dir, overwrite)
  with io.atomic_output(out_dir, overwrite) as tmp:
    _export_base(pair, os.path.join(tmp, "base"), max_shard_size, np_dtype)
    if pair.drafter_cfg is not None:
      _export_drafter(pair, os.path.join(tmp, "drafter"), max_shard_size, np_dtype,
                      num_assistant_tokens, assistant_schedule)
  log.info("wrote %s", os.path.abspath(out_dir))
  return os.path.abspath(out_dir)


def jax_to_hf(checkpoint: str, out_dir: str, step: int | None = None, drafter: str | None = None,
              overwrite: bool = False, max_shard_size=None, dtype: str | None = None,
              num_assistant_tokens: int | None = None, assistant_schedule: str | None = None) -> str:
  """Exports a pair dir, a train workdir (latest step or `step`) or an HF dir to HF dirs."""
  io.check_output(out_dir, overwrite)  # fail before any restore work
  pair = load_pair(checkpoint, drafter=drafter, step=step)
  return export_hf(pair, out_dir, overwrite, max_shard_size, dtype, num_assistant_tokens,
                   assistant_schedule)
