"""The joint trainer: fine-tune a Gemma 4 base and its assistant drafter together (or the drafter
alone on a frozen base), evaluate the greedy accepted length, and export the pair for HF.

`run(config, workdir)` is the whole job; `python -m gemma_mtp_jax.train` only parses flags. In order:

  config   `validate_config`: every section's keys against its schema (typos name the closest key)
  mesh     `sharding.make_mesh(config.mesh.axes)` + the logical rules; one CPU device is a 1x1 mesh
  data     `data.make_datasets`: the resumable mixture iterator and the fixed held-out batches
  params   random init sharded at creation (`sharding.sharded_init`), or `checkpoint.load_pair` of
           `hf_base` + `hf_drafter` (HF dirs or hub ids, converted in memory onto the shardings)
  resume   the latest step of WORKDIR/checkpoints if any: params, optimizer state, data position, RNG
  loop     one jitted train step (donated state, in/out shardings, compiled once) per optimizer
           update; metrics of step s are read while step s + 1 runs; checkpoints every
           `save_every` steps and at the end; SIGTERM/SIGINT finish the step, save and return
  eval     `gemma_mtp_jax.eval`: losses, per-step accuracy, the exact greedy accepted length
  export   WORKDIR/hf/{base,drafter} through `checkpoint.export_hf`, then optionally the HF assisted
           generation check (`train.hf_check`)

Optimizer: optax AdamW, linear warmup then cosine decay to `min_learning_rate_ratio` of the peak,
global-norm clipping, weight decay on matrices only (`decay_mask`), gradient accumulation inside the
step (`grad_accum_steps` micro-batches, one update). A frozen base is left out of the differentiated
and optimized tree (`joint.partition`), so it has no optimizer state and stays bit-identical.

Resume is exact: the step's inputs after a restart (params, optimizer state, the data iterator's
position, the step counter that drives the schedule) are what they were, the step is the same
compiled program, and the records past the restored step are dropped from metrics.jsonl, so N steps +
restart + N steps equals 2N straight (tests/test_trainer.py checks params and every logged loss).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import signal
import threading
import time
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from gemma_mtp_jax.checkpoint import pair as checkpoint
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.data import pipeline as data_lib
from gemma_mtp_jax.model import drafter as drafter_lib
from gemma_mtp_jax.training import evaluate as eval_lib
from gemma_mtp_jax.training import objective as joint
from gemma_mtp_jax.training import metrics as metrics_lib
from gemma_mtp_jax import presets
from gemma_mtp_jax import sharding
from gemma_mtp_jax.training import distributed
from gemma_mtp_jax.model import transformer


ConfigError = config_lib.ConfigError
HF_EXPORT_DIR = "hf"
DEFAULT_CONFIG = "tiny"  # the embedded default run: configs/tiny.py into runs/tiny


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message names the step and the checkpoint."""


# ------------------------------------------------------------------------------ config checks
_TOP_KEYS = ("name", "hf_base", "hf_drafter", "model", "drafter", "train", "data", "mesh")
_SOURCE_KEYS = ("name", "path", "weight", "schema", "split", "subset", "limit")


def _check_keys(where: str, keys, valid: Sequence[str]) -> None:
  for k in keys:
    if k not in valid:
      full = f"{where}.{k}" if where else k
      hint = config_lib._closest(k, valid) or f"; valid keys: {', '.join(sorted(valid))}"
      raise ConfigError(f"unknown config key '{full}'{hint}")


def _as_dict(x) -> dict:
  return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def validate_config(cfg: ml_collections.ConfigDict) -> tuple:
  """Checks every section's keys and the values the trainer needs; returns (base, drafter, joint)
  configs. A typo anywhere (`train.num_stpes`) raises ConfigError naming the key and the closest
  valid ones; model/drafter fields are checked by `presets.model_configs`."""
  _check_keys("", cfg.keys(), _TOP_KEYS)
  for section in ("train", "data", "mesh"):
    if cfg.get(section) is None:
      raise ConfigError(f"config has no '{section}' section (build presets with "
                        "presets.make_config)")
  train = _as_dict(cfg.train)
  _check_keys("train", train, list(presets.train_fields()))
  mesh = _as_dict(cfg.mesh)
  _check_keys("mesh", mesh, list(presets.mesh_fields()))
  _check_keys("mesh.axes", mesh["axes"], sharding.MESH_AXES)
  data = _as_dict(cfg.data)
  _check_keys("data", data, list(data_lib.default_data_config().keys()))
  for i, src in enumerate(data.get("sources") or ()):
    if isinstance(src, Mapping) or hasattr(src, "keys"):
      _check_keys(f"data.sources[{i}]", _as_dict(src), _SOURCE_KEYS)
  base_cfg, dcfg = presets.model_configs(cfg)
  if dcfg is None:
    raise ConfigError("config has no 'drafter': the joint trainer trains a (base, drafter) pair")
  jcfg = joint.JointConfig.from_train_config(cfg.train)
  t = cfg.train

  def need(cond, key, msg):
    if not cond:
      raise ConfigError(f"config key 'train.{key}': {msg}")
  for key in ("num_steps", "seq_len", "batch_size", "grad_accum_steps", "log_every",
              "save_every", "keep_checkpoints"):
    need(int(t[key]) >= 1, key, f"must be >= 1, got {t[key]}")
  need(int(t.batch_size) % int(t.grad_accum_steps) == 0, "grad_accum_steps",
       f"batch_size {t.batch_size} is not divisible by {t.grad_accum_steps} micro-batches")
  need(int(t.seq_len) > jcfg.num_draft_steps + 1, "seq_len",
       f"{t.seq_len} leaves no room for {jcfg.num_draft_steps} draft steps")
  need(float(t.learning_rate) >= 0, "learning_rate", "must be >= 0")
  need(0 <= float(t.min_learning_rate_ratio) <= 1, "min_learning_rate_ratio", "must be in [0, 1]")
  need(int(t.eval_every) >= 0, "eval_every", "must be >= 0 (0: only at the end)")
  need(t.export_dtype in ("", "bfloat16", "float32"), "export_dtype",
       f"must be '', 'bfloat16' or 'float32', got {t.export_dtype!r}")
  return base_cfg, dcfg, jcfg


def _flat_keys(cfg, prefix: str = "") -> list[str]:
  out = []
  for k in cfg.keys():
    v = cfg[k]
    path = f"{prefix}{k}"
    out.append(path)
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out += _flat_keys(v, path + ".")
  return out


def explain_override_error(argv: Sequence[str], error: BaseException) -> str:
  """One clear line for a bad `--config.a.b=value` flag (ml_collections raises a traceback).

  An unknown key is named with the closest valid keys; a known key with a bad value is named with
  the type it expects.
  """
  spec, overrides = None, []
  args = list(argv[1:])
  i = 0
  while i < len(args):
    a = args[i]
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(args):
      spec, i = args[i + 1], i + 1
    elif a.startswith("--config."):
      name, eq, value = a[len("--config."):].partition("=")
      if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
        value, i = args[i + 1], i + 1
      overrides.append((name, value))
    i += 1
  try:
    cfg = presets.load_config(spec or default_config_path())
  except Exception as e:  # the config file itself is the problem
    return f"cannot load config {spec!r}: {e}"
  valid = _flat_keys(cfg)
  for name, value in overrides:
    node, parts = cfg, name.split(".")
    for depth, part in enumerate(parts):
      keys = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
      if part not in keys:
        where = ".".join(parts[:depth])
        near = difflib.get_close_matches(name, valid, n=3, cutoff=0.6) or [
            f"{where + '.' if where else ''}{c}" for c in difflib.get_close_matches(part, keys, n=3)]
        hint = (f"; closest valid keys: {', '.join(near)}" if near else
                f"; valid keys under '{where or 'config'}': {', '.join(sorted(keys))}")
        return f"unknown config key '{name}'{hint}"
      node = node[part]
    if name in str(error) or len(overrides) == 1:
      field = cfg
      for part in parts[:-1]:
        field = field[part]
      want = type(field[parts[-1]]).__name__ if field[parts[-1]] is not None else "a value"
      return f"bad value {value!r} for config key '{name}' (expects {want}): {error}"
  return f"bad config override: {error}"


def default_config_path() -> str:
  """configs/tiny.py of the checkout (or the installed copy)."""
  for d in presets.CONFIG_DIRS:
    p = d / f"{DEFAULT_CONFIG}.py"
    if p.is_file():
      return str(p)
  return DEFAULT_CONFIG


# ------------------------------------------------------------------------------ optimizer
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer fields of the `train` section (hashable: compiled programs are cached on it)."""
  learning_rate: float
  warmup_steps: int
  num_steps: int
  min_learning_rate_ratio: float
  weight_decay: float
  adam_b1: float
  adam_b2: float
  adam_eps: float
  grad_clip_norm: float

  @classmethod
  def from_train(cls, t) -> "OptimizerConfig":
    return cls(**{f.name: (float if f.type == "float" else int)(t[f.name])
                  for f in dataclasses.fields(cls)})


def decay_mask(params):
  """Weight decay on matrices (kernels, embedding tables, centroids), not on norm scales, layer
  scalars or other vectors: decaying a norm scale towards 0 fights the normalization."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(opt) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup + cosine decay and global-norm clipping.

  `opt`: an OptimizerConfig or the `train` section itself.
  """
  if not isinstance(opt, OptimizerConfig):
    opt = OptimizerConfig.from_train(opt)
  peak = opt.learning_rate
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=opt.warmup_steps,
      decay_steps=max(opt.num_steps, opt.warmup_steps + 1),
      end_value=peak * opt.min_learning_rate_ratio)
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=opt.adam_b1, b2=opt.adam_b2, eps=opt.adam_eps,
                           weight_decay=opt.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule


# ------------------------------------------------------------------------------ train step
def train_step(state: joint.TrainState, buffers, batch, *, base_cfg, dcfg, jcfg,
               tx: optax.GradientTransformation, schedule, accum_steps: int = 1):
  """One optimizer update on the joint loss; the batch is split into `accum_steps` micro-batches
  whose gradients (and metrics) are averaged before the update.

  Returns (new state, metrics): the loss terms of `joint.loss_fn`, grad_norm, learning_rate.
  """
  trainable, frozen = joint.partition(state.params, joint.trainable_mask(state.params, jcfg))
  grad_fn = jax.value_and_grad(
      lambda tr, mb: joint.loss_fn(joint.merge(tr, frozen), buffers, mb, base_cfg, dcfg, jcfg),
      has_aux=True)
  if accum_steps == 1:
    (_, metrics), grads = grad_fn(trainable, batch)
  else:
    # Micro-batch m takes rows m, m + A, ...: with rows split over devices in contiguous blocks,
    # every micro-batch stays spread over all of them.
    def split(x):
      return jnp.swapaxes(x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]), 0, 1)
    micro = jax.tree.map(split, dict(batch))

    def body(carry, mb):
      (_, m), g = grad_fn(trainable, mb)
      return jax.tree.map(jnp.add, carry, (g, m)), None

    zeros = jax.eval_shape(grad_fn, trainable, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
    (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
    grads, metrics = jax.tree.map(lambda x: x / accum_steps, (grads, metrics))
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["learning_rate"] = schedule(state.step)
  return state.replace(step=state.step + 1, params=joint.merge(trainable, frozen),
                       opt_state=opt_state), metrics


# ------------------------------------------------------------------------------ params
def _split_vars(variables) -> tuple[dict, Any]:
  """Checkpoint layout {"base", "drafter": {"params", "buffers"}} -> (train params, buffers)."""
  d = variables["drafter"]
  return {"base": variables["base"], "drafter": d["params"]}, d.get("buffers")


def _join_vars(params, buffers) -> dict:
  d = {"params": params["drafter"]}
  if buffers is not None:
    d["buffers"] = buffers
  return {"base": params["base"], "drafter": d}


@functools.lru_cache(maxsize=16)
def _init_fn(base_cfg, dcfg, embedding_std: float = 0.0):
  """rng -> boxed variables in the checkpoint layout (the rng split of `joint.init_params`).

  embedding_std > 0 redraws the embedding tables with that std (the modules draw std 1: with a tied
  head that gives initial logits of std sqrt(D), far too large to train from scratch). Cached, so
  every run of the same configs traces the same function (and jax reuses its compilation).
  """
  def scale(tree, key):
    if embedding_std > 0 and key in tree:
      tree = dict(tree)
      tree[key] = tree[key].replace_boxed(tree[key].unbox() * embedding_std)
    return tree

  def init(rng):
    rb, rd = jax.random.split(rng)
    d = dict(drafter_lib.init_variables(dcfg, rd))
    d["params"] = scale(d["params"], "embedding")
    return {"base": scale(transformer.init_params(base_cfg, rb), "embedding"), "drafter": d}
  return init


def random_variables(base_cfg, dcfg, seed: int, embedding_std: float = 0.0, mesh=None,
                     rules=sharding.DEFAULT_RULES) -> dict:
  """The random init of a run: checkpoint layout, each param created on its sharding."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  variables, _ = sharding.sharded_init(_init_fn(base_cfg, dcfg, float(embedding_std)), mesh, rules,
                                       jax.random.PRNGKey(seed))
  return variables


def _path_str(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def opt_state_shardings(opt_abstract, params_shardings, mesh):
  """Shardings of the optimizer state: a leaf whose path ends with a param's path and has its
  shape (Adam's mu/nu) is sharded like that param; everything else (counts) is replicated."""
  by_path = {}
  for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
    by_path[_path_str(path)] = s

  def leaf(path, x):
    p = _path_str(path)
    for n in range(len(p), 0, -1):
      s = by_path.get(p[-n:])
      if s is not None:
        return s
    return sharding.replicated(mesh)
  return jax.tree_util.tree_map_with_path(leaf, opt_abstract)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


@dataclasses.dataclass(frozen=True)
class Programs:
  """What one (model, objective, optimizer, mesh) combination compiles, with its shardings and
  abstract shapes. `programs()` caches it, so a second run in the same process (a resume, a test)
  compiles nothing again."""
  tx: optax.GradientTransformation
  schedule: Any
  var_sh: Any  # shardings of the checkpoint layout {"base", "drafter": {"params", "buffers"}}
  params_sh: Any
  buffers_sh: Any
  opt_sh: Any
  state_sh: joint.TrainState
  batch_sh: Any
  abstract_vars: Any  # ShapeDtypeStructs (with shardings) of the checkpoint layout
  params_abs: Any
  trainable_abs: Any
  opt_abs: Any
  opt_init: Any  # jitted: trainable params -> optimizer state, on its shardings
  step: Any  # jitted train step: (state, buffers, batch) -> (state, metrics); state donated


@functools.lru_cache(maxsize=8)
def programs(base_cfg, dcfg, jcfg, opt: OptimizerConfig, accum_steps: int, embedding_std: float,
             mesh, rules, num_new: int) -> Programs:
  """Builds (but does not yet compile: jax compiles on first call) every program of a run."""
  tx, schedule = make_optimizer(opt)
  boxed = jax.eval_shape(_init_fn(base_cfg, dcfg, embedding_std), jax.random.PRNGKey(0))
  var_sh = nn.unbox(sharding.logical_shardings(boxed, mesh, rules))
  abstract_vars = _with_shardings(nn.unbox(boxed), var_sh)
  params_abs, _ = _split_vars(abstract_vars)
  params_sh, buffers_sh = _split_vars(var_sh)
  trainable_abs, _ = joint.partition(params_abs, joint.trainable_mask(params_abs, jcfg))
  trainable_sh, _ = joint.partition(params_sh, joint.trainable_mask(params_abs, jcfg))
  opt_abs = jax.eval_shape(tx.init, trainable_abs)
  opt_sh = opt_state_shardings(opt_abs, params_sh, mesh)
  state_sh = joint.TrainState(step=sharding.replicated(mesh), params=params_sh, opt_state=opt_sh)
  batch_sh = sharding.batch_sharding(mesh, rules)
  step = jax.jit(
      functools.partial(train_step, base_cfg=base_cfg, dcfg=dcfg, jcfg=jcfg, tx=tx,
                        schedule=schedule, accum_steps=accum_steps),
      in_shardings=(state_sh, buffers_sh, batch_sh),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  return Programs(
      tx=tx, schedule=schedule, var_sh=var_sh, params_sh=params_sh, buffers_sh=buffers_sh,
      opt_sh=opt_sh, state_sh=state_sh, batch_sh=batch_sh, abstract_vars=abstract_vars,
      params_abs=params_abs, trainable_abs=trainable_abs,
      opt_abs=_with_shardings(opt_abs, opt_sh),
      opt_init=jax.jit(tx.init, in_shardings=(trainable_sh,), out_shardings=opt_sh),
      step=step)


def _hf_variables(cfg, base_cfg, dcfg, var_shardings) -> tuple[dict, checkpoint.Pair]:
  """`hf_base` + `hf_drafter` converted onto the shardings, checked against the preset."""
  lookup = None if base_cfg.scan_layers else var_shardings  # loop layout only; stacked below
  pair = checkpoint.load_pair(cfg.hf_base, drafter=cfg.hf_drafter or None,
                              dtype=base_cfg.param_dtype, shardings=lookup)
  if pair.drafter_cfg is None:
    raise ConfigError("hf_drafter is not set: the joint trainer needs the assistant too")
  outer = lambda c: {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "text"}
  if outer(pair.drafter_cfg) != outer(dcfg):
    raise ConfigError(f"the checkpoint's drafter config differs from the preset's (checkpoint, "
                      f"preset): {outer(pair.drafter_cfg)} vs {outer(dcfg)}")
  for name, got, want in (("model", pair.base_cfg, base_cfg),
                          ("drafter.text", pair.drafter_cfg.text, dcfg.text)):
    got, want = got.architecture(), want.architecture()
    if got != want:
      diff = {f.name: (getattr(got, f.name), getattr(want, f.name))
              for f in dataclasses.fields(got) if getattr(got, f.name) != getattr(want, f.name)}
      raise ConfigError(f"the checkpoint's {name} config differs from the preset's "
                        f"(checkpoint, preset): {diff}")
  variables = pair.params
  if base_cfg.scan_layers:
    variables["base"] = transformer.stack_layer_params(base_cfg, variables["base"])
    variables = sharding.shard_like(variables, var_shardings)
  return variables, pair


def _random_pair(base_cfg, dcfg, abstract, tokenizer_path: str | None) -> checkpoint.Pair:
  """A Pair describing a random-init run, for the workdir's pair.json (no weights in it)."""
  params = {"base": abstract["base"], "drafter": abstract["drafter"]}
  return checkpoint.Pair(base_cfg, dcfg, params, tokenizer_path,
                         dict(kind="init", path=None, step=None, train=None, extra_dir=None,
                              pair={"source": {"base": "random init", "drafter": "random init"},
                                    "hf_extra": {}}))


# ------------------------------------------------------------------------------ signals
class _StopFlag:
  """SIGTERM / SIGINT set a flag the loop reads after each step (TPU preemption notices come as
  SIGTERM). A second SIGINT interrupts at once. Handlers are restored on exit."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def stop(self) -> bool:
    flag = self.signum is not None
    if jax.process_count() > 1:  # every process must stop at the same step, or the save hangs
      from jax.experimental import multihost_utils
      flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
    return flag


# ------------------------------------------------------------------------------ compile count
_COMPILES = [0]


def _count_compile(event: str, *args, **kwargs) -> None:
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


# ------------------------------------------------------------------------------ helpers
def split_workdir(workdir: str, checkpoint_dir: str, name: str) -> tuple[str, str | None]:
  """(local workdir, checkpoint dir or None for WORKDIR/checkpoints).

  A remote --workdir (gs://..., any "scheme://") keeps what orbax writes, the checkpoints, at
  WORKDIR/checkpoints (unless train.checkpoint_dir says otherwise); metrics, plots and the HF
  export are local files, written under runs/<name>."""
  if "://" not in workdir:
    return os.path.abspath(workdir), checkpoint_dir or None
  return (os.path.abspath(os.path.join("runs", name)),
          checkpoint_dir or f"{workdir.rstrip('/')}/{checkpoint.CHECKPOINTS_DIR}")


def _stop_ids(tokenizer) -> list[int]:
  """Tokens greedy decoding stops on: end of a model turn and end of text."""
  ids = [data_lib.control_ids(tokenizer)[data_lib.TURN_CLOSE]]
  if tokenizer.eos_token_id is not None:
    ids.append(int(tokenizer.eos_token_id))
  return ids


def _tokenizer_dir(tokenizer) -> str | None:
  path = getattr(tokenizer, "name_or_path", None)
  return path if path and os.path.isdir(path) else None


def _fmt(v: float) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def _restore(manager, step: int, progs: Programs):
  """(params, buffers, opt_state, meta) of checkpoint `step`, placed on the run's shardings."""
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(progs.abstract_vars),
      opt_state=ocp.args.StandardRestore(progs.opt_abs),
      meta=ocp.args.JsonRestore()))
  params, buffers = _split_vars(dict(restored["params"]))
  return params, buffers, restored["opt_state"], restored["meta"]


def _export_pair(workdir: str, base_cfg, dcfg, host_vars, step: int) -> checkpoint.Pair:
  """The trained pair with the workdir's pair.json / tokenizer / carried tensors, for export."""
  def sub(name):
    p = os.path.join(workdir, name)
    return p if os.path.isdir(p) else None
  return checkpoint.Pair(base_cfg, dcfg, host_vars, sub(checkpoint.TOKENIZER_DIR),
                         dict(kind="workdir", path=workdir, step=step, train=None,
                              pair=checkpoint.read_pair_json(workdir),
                              extra_dir=sub(checkpoint.HF_EXTRA_DIR)))


# ------------------------------------------------------------------------------ run
def run(cfg: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None) -> dict:
  """Trains, evaluates and exports; returns a summary dict.

  `stop_after`: behave as if preempted once that step is done (tests and time-boxed jobs): save,
  return with status "preempted"; the next call resumes.
  The summary has "status" ("finished" or "preempted"), "step", "workdir", "export" (the HF dir or
  None), the last "eval" metrics, "hf" (the HF check, if run), "train_step_compiles",
  "wall_time_s", and the greedy eval's "prompts" and "stop_ids".
  Raises ConfigError / DataError / TrainingError with messages that name the cause.
  """
  t_start = time.time()
  base_cfg, dcfg, jcfg = validate_config(cfg)
  t = cfg.train
  distributed.initialize_distributed(cfg.mesh)
  if t.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(t.compilation_cache_dir))
  is_main = jax.process_index() == 0
  from tqdm import tqdm
  # tqdm.write prints above the progress bar instead of onto its line.
  say = (lambda msg: tqdm.write(msg)) if is_main else (lambda msg: None)
  remote = workdir
  workdir, checkpoint_dir = split_workdir(workdir, str(t.checkpoint_dir or ""),
                                          str(cfg.get("name") or "run"))
  if workdir != remote:
    say(f"[train] --workdir {remote} is remote storage: checkpoints go to {checkpoint_dir} "
        f"(orbax), metrics, plots and the HF export to the local {workdir}")
  num_steps, k_steps = int(t.num_steps), jcfg.num_draft_steps

  # --- data
  tokenizer = data_lib.tokenizer_from_config(cfg.data)
  if len(tokenizer) > base_cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is "
                      f"{base_cfg.vocab_size}")
  train_iter, eval_batches = data_lib.make_datasets(
      cfg.data, tokenizer, seq_len=int(t.seq_len), batch_size=int(t.batch_size), seed=int(t.seed),
      process_index=jax.process_index(), process_count=jax.process_count())
  prompts = distributed.global_prompts(
      eval_lib.prompts_from_batches(eval_batches, int(t.eval_prompts), int(t.eval_max_prompt_len)),
      int(t.eval_max_prompt_len))

  # --- mesh, shardings, programs
  mesh = sharding.make_mesh(_as_dict(cfg.mesh.axes))
  rules = sharding.rules_from_config(cfg.mesh.rules)
  progs = programs(base_cfg, dcfg, jcfg, OptimizerConfig.from_train(t), int(t.grad_accum_steps),
                   float(t.init_embedding_std), mesh, rules, int(t.eval_new_tokens))
  flops_c = eval_lib.flops_ratio(base_cfg, dcfg)

  # --- the workdir: resume from its latest checkpoint, else initialise
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  manager = checkpoint.open_manager(workdir, max_to_keep=int(t.keep_checkpoints),
                                    directory=checkpoint_dir)
  start = manager.latest_step()
  rng = jax.random.PRNGKey(int(t.seed))
  with sharding.use_mesh(mesh, rules):
    if start is not None:
      params, buffers, opt_state, meta = _restore(manager, start, progs)
      train_iter.set_state(meta["data"])
      rng = jnp.asarray(meta["rng"], jnp.uint32)
      source = f"resumed from step {start} of {manager.directory}"
      if is_main and not os.path.isfile(os.path.join(workdir, checkpoint.PAIR_JSON)):
        # A new machine resuming from a remote checkpoint_dir: the workdir's pair files (configs,
        # tokenizer, tensors carried through to the export) come from the run's source again.
        if cfg.hf_base:
          pair = checkpoint.load_pair(cfg.hf_base, drafter=cfg.hf_drafter or None,
                                      dtype=base_cfg.param_dtype)
        else:
          pair = _random_pair(base_cfg, dcfg, progs.abstract_vars, _tokenizer_dir(tokenizer))
        checkpoint.init_workdir(workdir, pair)
    else:
      start = 0
      if cfg.hf_base:
        variables, pair = _hf_variables(cfg, base_cfg, dcfg, progs.var_sh)
        source = f"{cfg.hf_base} + {cfg.hf_drafter}"
      else:
        variables, _ = sharding.sharded_init(
            _init_fn(base_cfg, dcfg, float(t.init_embedding_std)), mesh, rules, rng)
        pair = _random_pair(base_cfg, dcfg, progs.abstract_vars, _tokenizer_dir(tokenizer))
        source = "random init"
      if is_main:
        checkpoint.init_workdir(workdir, pair)
      params, buffers = _split_vars(variables)
      opt_state = progs.opt_init(joint.partition(params, joint.trainable_mask(params, jcfg))[0])
    state = joint.TrainState(
        step=jax.device_put(jnp.asarray(start, jnp.int32), sharding.replicated(mesh)),
        params=params, opt_state=opt_state)
    if is_main:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    rows, length = int(t.batch_size) // jax.process_count(), int(t.seq_len)
    evaluator = eval_lib.make_evaluator(base_cfg, dcfg, jcfg, eval_batches, prompts,
                                        _stop_ids(tokenizer), int(t.eval_new_tokens),
                                        progs.batch_sh, rows, length)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start, enabled=is_main)
    tokens_per_step = int(t.batch_size) * int(t.seq_len)
    n_trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(progs.trainable_abs))
    n_total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(progs.params_abs))
    say(f"[train] {cfg.get('name', '?')}: {source}; {n_total:,} params ({n_trained:,} trained"
        f"{', base frozen' if jcfg.freeze_base else ''}); K={k_steps}, "
        f"lambda={jcfg.drafter_loss_weight}; {jax.device_count()} device(s), mesh "
        f"{dict(mesh.shape)}; steps {start} -> {num_steps}, {tokens_per_step} tokens/step; "
        f"workdir {workdir} (setup {time.time() - t_start:.0f}s)")

    def save(step: int, state) -> None:
      # The RNG is saved with the data position; nothing in the step draws from it (no dropout),
      # so the key only matters to code that adds randomness later.
      meta = {"step": step, "data": train_iter.get_state(), "rng": np.asarray(rng).tolist(),
              "tokens_per_step": tokens_per_step}
      manager.save(step, args=checkpoint.save_args(_join_vars(state.params, buffers),
                                                   state.opt_state, meta), force=True)

    def do_eval(step: int, state) -> dict:
      t0 = time.time()
      m, conts = evaluator(state.params, buffers)
      m["eval_time_s"] = time.time() - t0
      writer.write(step, "eval", m)
      if conts and is_main:
        m["sample"] = tokenizer.decode(np.concatenate([prompts[0], conts[0]]))
      say(f"[eval] step {step}: base loss {_fmt(m.get('base/loss', float('nan')))}, draft acc "
          f"{[round(m.get(f'drafter/acc_{k}', 0.0), 3) for k in range(1, k_steps + 1)]}; "
          f"accepted length: greedy decode {_fmt(m.get('greedy/tokens_per_round', float('nan')))}"
          f" tokens/target forward (anchor mean {_fmt(m.get('greedy/accept/len_mean', 0.0))}), "
          f"data labels {_fmt(m.get('accept/len_mean', float('nan')))}; expected speedup "
          f"{_fmt(m.get('greedy/expected_speedup', float('nan')))} (c={flops_c:.3f}); "
          f"{m['eval_time_s']:.0f}s")
      return m

    # --- the loop
    last_eval: dict = {}
    status = "finished"
    compiles_before = _COMPILES[0]
    t_loop = time.time()
    bar = tqdm(total=num_steps, initial=start, disable=not is_main, dynamic_ncols=True,
               unit="step", desc="train")
    timer = [time.time(), start]
    pending = None  # (step, metrics) of the step dispatched last: read while the next one runs

    def finish(item) -> None:
      step, m = item
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
        bad = "loss" if not math.isfinite(m["loss"]) else "grad_norm"
        # The params of checkpoint step - 1 produced this value: that one is not a good one.
        manager.wait_until_finished()
        if manager.latest_step() == step - 1 and step - 1 > start:
          manager.delete(step - 1)
        good = manager.latest_step()
        raise TrainingError(
            f"non-finite {bad} ({m[bad]}) at step {step}: training stopped. Last good checkpoint: "
            f"{'step ' + str(good) + ' in ' + str(manager.directory) if good is not None else 'none'}"
            "; lower train.learning_rate or raise train.warmup_steps, then rerun to resume from it")
      post = dict(loss=f"{m['loss']:.3f}", base=f"{m['base/loss']:.3f}",
                  d1=f"{m.get('drafter/acc_1', 0):.2f}")
      if step % int(t.log_every) == 0 or step == num_steps:
        now = time.time()
        m["tokens_per_s"] = tokens_per_step * (step - timer[1]) / max(now - timer[0], 1e-9)
        timer[0], timer[1] = now, step
        writer.write(step, "train", m)
        post["tok_s"] = f"{m['tokens_per_s']:.0f}"
      bar.set_postfix(post, refresh=False)

    with _StopFlag() as stop:
      try:
        for step in range(start + 1, num_steps + 1):
          batch = distributed.global_batch(next(train_iter), progs.batch_sh)
          state, m = progs.step(state, buffers, batch)
          if pending is not None:
            finish(pending)
          pending = (step, m)
          bar.update(1)
          preempt = stop.stop() or step == stop_after
          if step % int(t.save_every) == 0 or step == num_steps or preempt:
            finish(pending)
            pending = None
            save(step, state)
          if int(t.eval_every) and step % int(t.eval_every) == 0 and step != num_steps:
            if pending is not None:
              finish(pending)
              pending = None
            last_eval = do_eval(step, state)
            timer[0], timer[1] = time.time(), step
          if preempt:
            status = "preempted"
            break
        if pending is not None:
          finish(pending)
      finally:
        bar.close()
        manager.wait_until_finished()
    step = int(jax.device_get(state.step))
    compiles = progs.step._cache_size() if hasattr(progs.step, "_cache_size") else None
    train_time = time.time() - t_loop
    if status == "preempted":
      writer.close()
      manager.close()
      say(f"[train] stopped ({'signal ' + str(stop.signum) if stop.signum else 'stop_after'}) "
          f"after step {step}; checkpoint saved in {manager.directory}. Run the same command "
          "again to resume.")
      return dict(status=status, step=step, workdir=workdir, export=None, eval=last_eval,
                  hf=None, train_step_compiles=compiles, wall_time_s=time.time() - t_start)

    # --- final eval, export, HF check
    last_eval = do_eval(step, state)
    if last_eval.get("sample"):
      say(f"[eval] a held-out prompt and the base's greedy continuation:\n{last_eval['sample']}")
    summary = {"train_step_compiles": compiles, "xla_compiles": _COMPILES[0] - compiles_before,
               "train_loop_s": train_time}
    export_dir, hf = None, None
    if bool(t.export_hf):
      host_vars = distributed.to_host(_join_vars(state.params, buffers))
      if is_main:
        export_dir = checkpoint.export_hf(
            _export_pair(workdir, base_cfg, dcfg, host_vars, step),
            os.path.join(workdir, HF_EXPORT_DIR), overwrite=True, dtype=t.export_dtype or None,
            num_assistant_tokens=k_steps)
        _tokenizer_to_drafter(export_dir)
        say(f"[export] HF pair written: {export_dir}/base and {export_dir}/drafter")
        if bool(t.hf_check) and prompts:
          t0 = time.time()
          hf = hf_check(export_dir, prompts, int(t.eval_new_tokens), _stop_ids(tokenizer),
                        k_steps, last_eval.get("greedy/tokens_per_round"),
                        evaluator.last_continuations)
          if hf is not None:
            summary.update(hf)
            say(_hf_message(hf, time.time() - t0))
    summary["wall_time_s"] = time.time() - t_start
    writer.write(step, "summary", summary)
    writer.close()
    manager.close()
    if is_main:
      plots = metrics_lib.plot(workdir)
      say(f"[train] done in {summary['wall_time_s']:.0f}s (train loop {train_time:.0f}s): step "
          f"{step}, train step compiled {compiles} time(s); plots in {os.path.dirname(plots[0])}")
      if export_dir:
        say(f"[train] exported pair: {export_dir}")
  return dict(status=status, step=step, workdir=workdir, export=export_dir, eval=last_eval, hf=hf,
              train_step_compiles=compiles, wall_time_s=summary["wall_time_s"],
              xla_compiles=summary["xla_compiles"], prompts=prompts,
              stop_ids=_stop_ids(tokenizer))


def _hf_message(hf: dict, seconds: float) -> str:
  msg = (f"[hf check] HF assisted generation (transformers {_hf_version()}): "
         f"{hf['hf/tokens_per_round']:.3f} tokens per target forward")
  if "trainer/tokens_per_round" in hf:
    msg += (f" vs {hf['trainer/tokens_per_round']:.3f} reported by the trainer "
            f"({100 * hf['hf/relative_diff']:+.1f}%, within 10%: {hf['hf/within_10pct']})")
  if "hf_fixed/tokens_per_round" in hf:
    msg += (f"; with the stale-K/V fix (hf_torch.hf_stale_kv_fix): "
            f"{hf['hf_fixed/tokens_per_round']:.3f} ({100 * hf['hf_fixed/relative_diff']:+.1f}%)")
  if hf.get("hf/same_as_trainer") is not None:
    msg += (f"; HF's output == the trainer's JAX greedy continuation for "
            f"{100 * hf['hf/same_as_trainer']:.0f}% of prompts")
  return msg + f"; {seconds:.0f}s"


def _tokenizer_to_drafter(export_dir: str) -> None:
  """The base's tokenizer files beside the drafter too, so each HF dir loads on its own."""
  from gemma_mtp_jax.checkpoint import safetensors_io as convert_io
  base, drafter = os.path.join(export_dir, "base"), os.path.join(export_dir, "drafter")
  if os.path.isdir(drafter):
    names = [n for n in convert_io.aux_files(base) if "token" in n or n.endswith(".jinja")]
    convert_io.copy_files(base, names, drafter)


def _hf_version() -> str:
  import transformers
  return transformers.__version__


def hf_check(export_dir: str, prompts, num_new: int, stop_ids, num_steps: int,
             reported: float | None, reference=None) -> dict | None:
  """HF assisted generation's tokens per target forward with the exported pair, next to what the
  trainer reported (`hf_torch.hf_acceptance`); None (with a message) if torch is not installed.

  If transformers as installed is more than 10% off, generation runs again with
  `hf_torch.hf_stale_kv_fix` (transformers 5.23 hands the drafter stale K/V after a partial
  acceptance), which tells a drafting difference from an export or numerics problem.
  `reference`: the trainer's greedy continuations, compared with HF's outputs."""
  try:
    import torch  # noqa: F401
  except ImportError:
    print("[hf check] skipped: torch is not installed (pip install -e '.[test]')")
    return None
  from gemma_mtp_jax import hf_torch

  dirs = os.path.join(export_dir, "base"), os.path.join(export_dir, "drafter")
  hf = hf_torch.hf_acceptance(*dirs, prompts, num_new, stop_ids, num_steps, reference=reference)
  names = ["hf"]
  if reported and abs(hf["hf/tokens_per_round"] / reported - 1.0) > 0.10:
    hf.update(hf_torch.hf_acceptance(*dirs, prompts, num_new, stop_ids, num_steps,
                                     reference=reference, fix_stale_kv=True))
    names.append("hf_fixed")
  if reported:
    hf["trainer/tokens_per_round"] = float(reported)
    for name in names:
      hf[f"{name}/relative_diff"] = hf[f"{name}/tokens_per_round"] / reported - 1.0
      hf[f"{name}/within_10pct"] = abs(hf[f"{name}/relative_diff"]) <= 0.10
  return hf
