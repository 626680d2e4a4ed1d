"""Runs that span meshes and processes equal the plain 8-device run.

* mesh change: a checkpoint saved by a run on fsdp=8 resumes on fsdp=4 x tensor=2 (orbax restores
  it onto the new shardings) and continues as the straight fsdp=8 run does;
* multi-host: two local processes (4 fake CPU devices each, gloo collectives, coordinator on
  localhost) train with each process loading only its rows of every batch; their losses equal the
  single-process 8-device run's, only process 0 writes metrics, and the checkpoint they write
  together restores.
Each run is a subprocess: the device count is fixed when JAX first initialises.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gemma_mtp_jax.training import metrics
from tests import test_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4

SCRIPT = textwrap.dedent(r"""
  import json, sys
  import jax
  jax.config.update("jax_disable_most_optimizations", True)  # equivalence, not speed
  from gemma_mtp_jax.training import loop as trainer
  from tests.test_trainer import small_config

  assets, runs, mesh, extra = (json.loads(a) for a in sys.argv[1:5])
  cfg = small_config(assets, batch_size=8, num_steps=%d, save_every=100, eval_prompts=0)
  cfg.mesh.axes.update(mesh)
  cfg.mesh.update(extra)
  for workdir, stop_after in runs:  # one process, one compilation, several runs
    out = trainer.run(cfg, workdir, stop_after=stop_after)
    print("RESULT" + json.dumps(dict(status=out["status"], step=out["step"],
                                     processes=jax.process_count(), devices=jax.device_count())))
""" % STEPS)


def _launch(assets, runs, mesh, extra=None, devices=8):
  """runs: [(workdir, stop_after or None), ...], trained one after the other in one process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  args = [sys.executable, "-c", SCRIPT, json.dumps(assets),
          json.dumps([(str(w), s) for w, s in runs]), json.dumps(mesh), json.dumps(extra or {})]
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _results(proc, timeout=600):
  stdout, stderr = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, stderr[-3000:]
  return [json.loads(l[6:]) for l in stdout.splitlines() if l.startswith("RESULT")]


def _losses(workdir):
  records = [r for r in metrics.read_records(str(workdir)) if r["kind"] == "train"]
  assert len({r["step"] for r in records}) == len(records), "a step was logged twice"
  return {r["step"]: r["loss"] for r in records}


def _assert_close(got, want):
  assert sorted(got) == sorted(want), (got, want)
  for step in want:  # float32 reductions are split differently over meshes and processes
    np.testing.assert_allclose(got[step], want[step], rtol=2e-5, err_msg=f"step {step}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return test_trainer.write_assets(str(tmp_path_factory.mktemp("multihost_assets")))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
  """The straight single-process run on 8 devices, fsdp=8; and, in the same process, a second
  run on that mesh stopped after step 2 (for the mesh-change test)."""
  root = tmp_path_factory.mktemp("reference")
  straight, r1 = _results(_launch(assets, [(root / "run", None), (root / "half", 2)],
                                  {"fsdp": 8}))
  assert straight == dict(status="finished", step=STEPS, processes=1, devices=8)
  assert r1["status"] == "preempted" and r1["step"] == 2
  losses = _losses(root / "run")
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert losses[STEPS] < losses[1]  # it trains
  return root, losses


def test_checkpoint_restores_onto_another_mesh(assets, reference, tmp_path):
  root, ref_losses = reference
  ref_dir, workdir = root / "run", tmp_path / "run"
  shutil.copytree(root / "half", workdir)  # fsdp=8's checkpoint of step 2
  [second] = _results(_launch(assets, [(workdir, None)], {"fsdp": 4, "tensor": 2}))
  assert second["status"] == "finished" and second["step"] == STEPS
  _assert_close(_losses(workdir), ref_losses)
  _assert_params_close(test_trainer._saved(str(workdir), STEPS),
                       test_trainer._saved(str(ref_dir), STEPS))


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_params_close(a, b):
  # Adam divides by sqrt(v): a gradient entry near zero that differs in its last bits moves its
  # param by up to the learning rate (1e-2). Allow 1% of one step; a wrong restore moves far more.
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(assets, reference, tmp_path):
  root, ref_losses = reference
  ref_dir, workdir = root / "run", tmp_path / "run"
  address = f"127.0.0.1:{_free_port()}"
  procs = [_launch(assets, [(workdir, None)], {"fsdp": -1},
                   dict(coordinator_address=address, num_processes=2, process_id=i), devices=4)
           for i in range(2)]
  results = [r for p in procs for r in _results(p)]
  assert len(results) == 2
  for r in results:
    assert r == dict(status="finished", step=STEPS, processes=2, devices=8)
  _assert_close(_losses(workdir), ref_losses)  # one writer: every step logged once
  _assert_params_close(test_trainer._saved(str(workdir), STEPS),
                       test_trainer._saved(str(ref_dir), STEPS))
