"""Processes and devices: `jax.distributed` start-up, moving host data onto (and off) the mesh, and
the stop signal every process agrees on.

One process per host; each holds its own rows of a global batch (`global_batch`) and reads whole
trees back with `to_host`. Single-process runs take the same paths (they are no-ops there).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Mapping

import jax
import numpy as np

from gemma_mtp_jax.model import config as config_lib

ConfigError = config_lib.ConfigError


def initialize_distributed(mesh_cfg) -> None:
  """`jax.distributed.initialize` when the config asks for it (`mesh.initialize_distributed`, or a
  `mesh.coordinator_address`), before anything touches a device. On TPU VMs every argument is
  auto-detected; elsewhere they come from the config. CPU processes (JAX_PLATFORMS=cpu, the
  multi-process tests) exchange their collectives over gloo."""
  address = str(mesh_cfg.get("coordinator_address") or "")
  if not (mesh_cfg.get("initialize_distributed") or address):
    return
  if jax.distributed.is_initialized():
    return
  num, pid = int(mesh_cfg.get("num_processes") or 0), int(mesh_cfg.get("process_id", -1))
  if address and (num < 1 or not 0 <= pid < num):
    raise ConfigError(f"mesh.coordinator_address is set: mesh.num_processes ({num}) must be >= 1 "
                      f"and mesh.process_id ({pid}) in [0, num_processes)")
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(address or None, num or None, pid if pid >= 0 else None)


def global_batch(batch: Mapping[str, np.ndarray], shard) -> dict:
  """This process's rows -> global arrays on the mesh (the batch axis split by the rules)."""
  return {k: jax.make_array_from_process_local_data(shard, np.asarray(v)) for k, v in batch.items()}


def to_host(tree):
  """Numpy copy of a (possibly multi-host sharded) tree."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def barrier(name: str) -> None:
  """Every process waits here for the others (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def global_prompts(prompts: list[np.ndarray], max_len: int, images: list | None = None,
                   slots: tuple[int, int, int] | None = None) -> tuple[list[np.ndarray], list]:
  """The same prompts (and their images: per prompt (pixel_values_ipc, pixel_positions_ip2) or
  None) on every process (each process packed different held-out rows). `slots`: the data's image
  slots (i, p, c), the same on every process; None for text-only data."""
  images = list(images) if images is not None else [None] * len(prompts)
  if jax.process_count() == 1:
    return prompts, images
  from jax.experimental import multihost_utils
  arr = np.zeros((len(prompts), max_len), np.int32)
  lens = np.asarray([len(p) for p in prompts], np.int32)
  for i, p in enumerate(prompts):
    arr[i, :len(p)] = p
  arr = multihost_utils.process_allgather(arr)
  lens = multihost_utils.process_allgather(lens)
  out = [a[:n] for a, n in zip(arr.reshape(-1, max_len), lens.reshape(-1))]
  if slots is None:
    return out, [None] * len(out)
  # Each prompt's images padded to the row's i slots (positions -1: empty), gathered, cut back.
  i, p, c = slots
  pv = np.zeros((len(images), i, p, c), np.float32)
  pos = np.full((len(images), i, p, 2), -1, np.int32)
  for j, x in enumerate(images):
    if x is not None:
      pv[j, :len(x[0])], pos[j, :len(x[1])] = x
  pv = multihost_utils.process_allgather(pv).reshape(-1, i, p, c)
  pos = multihost_utils.process_allgather(pos).reshape(-1, i, p, 2)
  used = (pos[..., 0] >= 0).any(-1)  # [n, i]
  return out, [(v[u], q[u]) if u.any() else None for v, q, u in zip(pv, pos, used)]


class StopFlag:
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
    """Whether a signal came, on any process."""
    flag = self.signum is not None
    if jax.process_count() > 1:  # every process must stop at the same step, or the save hangs
      from jax.experimental import multihost_utils
      flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
    return flag
