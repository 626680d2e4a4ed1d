"""The train step and everything compiled around it: the train state, the trainable/frozen split,
the initialisers, and `programs()`, which jits the step with its shardings and donation.

This is the one train step: the trainer (`loop.run`), the AOT plan (`gemma_mtp_jax.aot`), the
joint-step benchmark (`benchmarks/joint.py`) and the tests all run `programs(...).step`.

A frozen base is left out of the differentiated and optimized tree (`partition`), so it has no
gradient and no optimizer state and stays bit-identical. Gradient accumulation happens inside the
step (`grad_accum_steps` micro-batches, one update).

Layouts: the checkpoint layout of the variables is {"base", "drafter": {"params", "buffers"}}; the
train params are {"base", "drafter"} with the drafter's buffers (token_ordering) kept apart
(`split_vars` / `join_vars`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from gemma_mtp_jax import sharding
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import drafter as drafter_lib
from gemma_mtp_jax.model import transformer
from gemma_mtp_jax.training import objective
from gemma_mtp_jax.training import optimizer as optimizer_lib
from gemma_mtp_jax.training.config import TrainConfig

Array = jax.Array


# ------------------------------------------------------------------------------ state
@flax.struct.dataclass
class TrainState:
  step: Array  # optimizer steps done (drives the learning-rate schedule)
  params: Any  # {"base", "drafter"}, frozen leaves included
  opt_state: Any  # optimizer state of the trainable leaves only


def trainable_mask(params: Mapping, tcfg: TrainConfig):
  """Bool pytree like `params`: False on every base leaf when the base is frozen, and on the
  base's vision tower + projection (`params["base"]["vision"]`) unless `freeze_vision` is off."""
  base = {k: jax.tree.map(lambda _, train=(not tcfg.freeze_base and
                                           not (k == VISION and tcfg.freeze_vision)): train, v)
          for k, v in params["base"].items()}
  return {"base": base, "drafter": jax.tree.map(lambda _: True, params["drafter"])}


VISION = "vision"  # the base's vision submodule (model/vision.py VisionEncoder, in Transformer)


def partition(params, mask):
  """(trainable, frozen): two trees shaped like `params` with None where the other one holds the
  leaf. Differentiating and optimizing only `trainable` is what gives a frozen leaf no gradient and
  no optimizer state."""
  trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
  frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
  return trainable, frozen


def merge(trainable, frozen):
  """Inverse of `partition`."""
  return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen,
                      is_leaf=lambda x: x is None)


def trainable_params(params, tcfg: TrainConfig):
  """The trainable half of `partition`: what the optimizer state is built for."""
  return partition(params, trainable_mask(params, tcfg))[0]


# ------------------------------------------------------------------------------ the step
def reduce_micro(name: str, values_m: jax.Array) -> jax.Array:
  """One metric over the micro-batches of a step: the min of a `*_min`, the max of a `*_max`
  (the router's per-expert load), the mean of everything else."""
  if name.endswith("_min"):
    return jnp.min(values_m, axis=0)
  if name.endswith("_max"):
    return jnp.max(values_m, axis=0)
  return jnp.mean(values_m, axis=0)


def train_step(state: TrainState, buffers, batch, *, base_cfg: config_lib.ModelConfig,
               dcfg: config_lib.DrafterConfig, tcfg: TrainConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule):
  """One optimizer update on the joint loss; the batch is split into `tcfg.grad_accum_steps`
  micro-batches whose gradients (and metrics) are averaged before the update.

  Returns (new state, metrics): the loss terms of `objective.loss_fn`, grad_norm, learning_rate.
  """
  accum_steps = tcfg.grad_accum_steps
  trainable, frozen = partition(state.params, trainable_mask(state.params, tcfg))
  grad_fn = jax.value_and_grad(
      lambda tr, mb: objective.loss_fn(merge(tr, frozen), buffers, mb, base_cfg, dcfg, tcfg),
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
      return jax.tree.map(jnp.add, carry, g), m

    zeros = jax.eval_shape(grad_fn, trainable, jax.tree.map(lambda x: x[0], micro))[1]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    grads, metrics_m = jax.lax.scan(body, zeros, micro)
    grads = jax.tree.map(lambda x: x / accum_steps, grads)
    metrics = {k: reduce_micro(k, v) for k, v in metrics_m.items()}
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["learning_rate"] = schedule(state.step)
  return state.replace(step=state.step + 1, params=merge(trainable, frozen),
                       opt_state=opt_state), metrics


# ------------------------------------------------------------------------------ params
def split_vars(variables) -> tuple[dict, Any]:
  """Checkpoint layout {"base", "drafter": {"params", "buffers"}} -> (train params, buffers)."""
  d = variables["drafter"]
  return {"base": variables["base"], "drafter": d["params"]}, d.get("buffers")


def join_vars(params, buffers) -> dict:
  """Inverse of `split_vars`."""
  d = {"params": params["drafter"]}
  if buffers is not None:
    d["buffers"] = buffers
  return {"base": params["base"], "drafter": d}


@functools.lru_cache(maxsize=16)
def init_fn(base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig,
            embedding_std: float = 0.0):
  """rng -> boxed variables (logical axes) in the checkpoint layout.

  embedding_std > 0 redraws the embedding tables with that std (the modules draw std 1: with a tied
  head that gives initial logits of std sqrt(D), far too large to train from scratch). Cached, so
  every run of the same configs traces the same function (and jax reuses its compilation).
  """
  dcfg.check_fits(base_cfg)

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


@functools.lru_cache(maxsize=16)
def _plain_init(base_cfg, dcfg):
  return jax.jit(lambda rng: nn.unbox(init_fn(base_cfg, dcfg)(rng)))  # one compiled init


def init_params(base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig, rng: Array):
  """(params {"base", "drafter"} as plain arrays on the default device, drafter buffers or None):
  the modules' own init, unsharded (tests, benchmarks; a run uses `random_variables`)."""
  return split_vars(_plain_init(base_cfg, dcfg)(rng))


def random_variables(base_cfg, dcfg, seed: int, embedding_std: float = 0.0, mesh=None,
                     rules=sharding.DEFAULT_RULES) -> dict:
  """The random init of a run: checkpoint layout, each param created on its sharding."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  variables, _ = sharding.sharded_init(init_fn(base_cfg, dcfg, float(embedding_std)), mesh, rules,
                                       jax.random.PRNGKey(seed))
  return variables


# ------------------------------------------------------------------------------ shardings
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


def with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


# ------------------------------------------------------------------------------ programs
@dataclasses.dataclass(frozen=True)
class Programs:
  """What one (model, train config, mesh) combination compiles, with its shardings and abstract
  shapes. `programs()` caches it, so a second run in the same process (a resume, a test) compiles
  nothing again."""
  tcfg: TrainConfig  # the program key (`TrainConfig.program_key`)
  tx: optax.GradientTransformation
  schedule: Any
  var_sh: Any  # shardings of the checkpoint layout {"base", "drafter": {"params", "buffers"}}
  params_sh: Any
  buffers_sh: Any
  opt_sh: Any
  state_sh: TrainState
  batch_sh: Any
  abstract_vars: Any  # ShapeDtypeStructs (with shardings) of the checkpoint layout
  params_abs: Any
  trainable_abs: Any
  opt_abs: Any
  opt_init: Any  # jitted: trainable params -> optimizer state, on its shardings
  step: Any  # jitted train step: (state, buffers, batch) -> (state, metrics); state donated

  def new_state(self, params, opt_state=None, step: int = 0) -> TrainState:
    """The train state at `step` (a fresh optimizer state if `opt_state` is None), on the step's
    shardings: the step's output state is there, so placing its first input there too lets the
    step compile once (a no-op for params created or restored on them)."""
    params = jax.device_put(params, self.params_sh)
    if opt_state is None:
      opt_state = self.opt_init(trainable_params(params, self.tcfg))
    return jax.device_put(TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                                     opt_state=opt_state), self.state_sh)

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the train state: what `step.lower` takes."""
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=self.state_sh.step),
                      params=self.params_abs, opt_state=self.opt_abs)


def programs(base_cfg: config_lib.ModelConfig, dcfg: config_lib.DrafterConfig, tcfg: TrainConfig,
             mesh, rules=sharding.DEFAULT_RULES) -> Programs:
  """Builds (but does not yet compile: jax compiles on first call) every program of a run; cached
  on the fields of `tcfg` that change a program."""
  return _programs(base_cfg, dcfg, tcfg.program_key(), mesh, rules)


@functools.lru_cache(maxsize=8)
def _programs(base_cfg, dcfg, tcfg: TrainConfig, mesh, rules) -> Programs:
  tx, schedule = optimizer_lib.make_optimizer(tcfg)
  boxed = jax.eval_shape(init_fn(base_cfg, dcfg, tcfg.init_embedding_std), jax.random.PRNGKey(0))
  var_sh = nn.unbox(sharding.logical_shardings(boxed, mesh, rules))
  abstract_vars = with_shardings(nn.unbox(boxed), var_sh)
  params_abs, _ = split_vars(abstract_vars)
  params_sh, buffers_sh = split_vars(var_sh)
  mask = trainable_mask(params_abs, tcfg)
  trainable_abs, _ = partition(params_abs, mask)
  trainable_sh, _ = partition(params_sh, mask)
  opt_abs = jax.eval_shape(tx.init, trainable_abs)
  opt_sh = opt_state_shardings(opt_abs, params_sh, mesh)
  state_sh = TrainState(step=sharding.replicated(mesh), params=params_sh, opt_state=opt_sh)
  batch_sh = sharding.batch_sharding(mesh, rules)
  step = jax.jit(
      functools.partial(train_step, base_cfg=base_cfg, dcfg=dcfg, tcfg=tcfg, tx=tx,
                        schedule=schedule),
      in_shardings=(state_sh, buffers_sh, batch_sh),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  return Programs(
      tcfg=tcfg, tx=tx, schedule=schedule, var_sh=var_sh, params_sh=params_sh,
      buffers_sh=buffers_sh, opt_sh=opt_sh, state_sh=state_sh, batch_sh=batch_sh,
      abstract_vars=abstract_vars, params_abs=params_abs, trainable_abs=trainable_abs,
      opt_abs=with_shardings(opt_abs, opt_sh),
      opt_init=jax.jit(tx.init, in_shardings=(trainable_sh,), out_shardings=opt_sh), step=step)


# ------------------------------------------------------------------------------ the mesh
def clear_program_caches() -> None:
  """Forgets the cached init functions and programs (and so their compiled executables, once jax's
  own caches are cleared too: `jax.clear_caches()`); the next run builds them anew."""
  for cached in (init_fn, _plain_init, _programs):
    cached.cache_clear()


def run_mesh(mesh_cfg, tcfg: TrainConfig, devices=None, process_count: int = 1):
  """(mesh, rules) of a run's `mesh` section over `devices` (default: all), after checking, before
  anything is compiled or written, that the mesh divides the devices and that the global batch
  splits evenly over the devices and processes that share it. ConfigError names the key."""
  devices = list(devices if devices is not None else jax.devices())
  axes = {k: v for k, v in (mesh_cfg.axes.to_dict() if hasattr(mesh_cfg.axes, "to_dict")
                            else dict(mesh_cfg.axes)).items()}
  try:
    mesh = sharding.make_mesh(axes, devices)
  except sharding.ShardingError as e:
    raise config_lib.ConfigError(f"config key 'mesh.axes' {axes}: {e}") from None
  rules = sharding.rules_from_config(mesh_cfg.rules)
  spec = sharding.batch_sharding(mesh, rules).spec
  names = [a for part in spec[:1] if part is not None
           for a in ((part,) if isinstance(part, str) else part)]
  shards = 1
  for a in names:
    shards *= int(mesh.shape[a])
  if tcfg.batch_size % shards:
    raise config_lib.ConfigError(
        f"config key 'train.batch_size': {tcfg.batch_size} rows do not split over the {shards} "
        f"devices of mesh axes {names} (mesh {dict(mesh.shape)}, {len(devices)} devices); use a "
        f"multiple of {shards}")
  if tcfg.batch_size % process_count:
    raise config_lib.ConfigError(
        f"config key 'train.batch_size': {tcfg.batch_size} rows do not split over "
        f"{process_count} processes; use a multiple of {process_count}")
  return mesh, rules
