"""`python -m gemma_mtp_jax.train`: config errors, bad data, and SIGTERM (preemption) + resume.

The subprocess tests run the real entry point on the small pair of tests/test_trainer.py (its
config builder, loaded from a config file as a user's own preset would be). The two SIGTERM runs
share jax's persistent compilation cache, so the resumed run does not compile again.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from gemma_mtp_jax import presets
from gemma_mtp_jax.training import loop as trainer
from tests import test_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return test_trainer.write_assets(str(tmp_path_factory.mktemp("cli_assets")))


def _config_file(tmp_path, assets, **train) -> str:
  """A preset file (what --config takes) building the small test config."""
  path = tmp_path / "small.py"
  path.write_text(
      "import sys\n"
      f"sys.path.insert(0, {REPO!r})\n"
      "from tests.test_trainer import small_config\n\n"
      "def get_config():\n"
      f"  return small_config({dict(assets)!r}, **{dict(train)!r})\n")
  return str(path)


def _env(tmp_path) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _train(*args, env, timeout=300):
  return subprocess.run([sys.executable, "-m", "gemma_mtp_jax.train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------ config errors
def test_unknown_override_is_one_line_naming_the_closest_key(tmp_path):
  out = _train("--config.train.num_stpes=3", f"--workdir={tmp_path}", env=_env(tmp_path))
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  err = out.stderr.strip().splitlines()[-1]
  assert "unknown config key 'train.num_stpes'" in err and "train.num_steps" in err


@pytest.mark.parametrize("argv, match", [
    (["--config.train.num_stpes=3"], r"unknown config key 'train.num_stpes'.*train\.num_steps"),
    (["--config.trian.num_steps=3"], r"unknown config key 'trian.num_steps'.*train\.num_steps"),
    (["--config.train.learning_rat", "0.1"], r"'train.learning_rat'.*train\.learning_rate"),
    (["--config.mesh.axes.fsdb=2"], r"'mesh.axes.fsdb'.*mesh\.axes\.fsdp"),
    (["--config.train.num_steps=abc"], r"bad value 'abc' for config key 'train.num_steps' "
                                       r"\(expects int\)"),
])
def test_override_errors_name_the_key(argv, match):
  import re
  error = ValueError("invalid literal for int() with base 10: 'abc'")
  msg = trainer.explain_override_error(["train", *argv], error)
  assert re.search(match, msg), msg


def test_typos_inside_a_config_file_name_the_closest_key():
  for section, typo, right in (("train", "num_stpes", "num_steps"),
                               ("data", "eval_fractoin", "eval_fraction"),
                               ("mesh", "axis", "axes")):
    cfg = presets.load_config("tiny")
    cfg[section][typo] = 1
    with pytest.raises(trainer.ConfigError, match=rf"'{section}\.{typo}'.*'{right}'"):
      trainer.validate_config(cfg)
  cfg = presets.load_config("tiny")
  cfg.trian = {}
  with pytest.raises(trainer.ConfigError, match=r"'trian'.*'train'"):
    trainer.validate_config(cfg)
  cfg = presets.load_config("tiny")
  cfg.data.sources = [dict(name="x", path="a.jsonl", wieght=1.0)]
  with pytest.raises(trainer.ConfigError, match=r"'data\.sources\[0\]\.wieght'.*'weight'"):
    trainer.validate_config(cfg)
  cfg = presets.load_config("tiny")
  cfg.train.batch_size, cfg.train.grad_accum_steps = 6, 4
  with pytest.raises(trainer.ConfigError, match="grad_accum_steps"):
    trainer.validate_config(cfg)


def test_every_preset_passes_validation():
  for name in ("tiny", "e2b", "e4b", "26b_a4b", "31b"):
    cfg = presets.load_config(name)
    trainer.validate_config(cfg)
    assert cfg.train.num_draft_steps == 4
    if name != "tiny":  # the released pairs: the seed recipe's mix and weight
      assert cfg.train.drafter_loss_weight == 0.01
      assert [s["path"] for s in cfg.data.sources] == ["allenai/tulu-3-sft-mixture",
                                                       "ise-uiuc/Magicoder-OSS-Instruct-75K"]
      assert [s["weight"] for s in cfg.data.sources] == [0.8, 0.2]
      assert cfg.data.tokenizer == cfg.hf_base


def test_missing_data_file_exits_2_naming_it(tmp_path, assets):
  missing = dict(assets, chat=str(tmp_path / "nowhere.jsonl"))
  cfg = _config_file(tmp_path, missing)
  out = _train(f"--config={cfg}", f"--workdir={tmp_path / 'run'}", env=_env(tmp_path))
  assert out.returncode == 2, out.stderr[-2000:]
  err = out.stderr.strip().splitlines()[-1]
  assert err.startswith("error:") and "nowhere.jsonl" in err and "not found" in err


# ------------------------------------------------------------------------------ preemption
def _wait_for_step(workdir, step, proc, timeout=240):
  path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"trainer exited early: {proc.communicate()}")
    if os.path.exists(path):
      with open(path) as f:
        steps = [int(line.split('"step": ')[1].split(",")[0]) for line in f if '"train"' in line]
      if steps and steps[-1] >= step:
        return steps[-1]
    time.sleep(0.2)
  raise AssertionError(f"no train step {step} logged in {timeout}s")


def test_sigterm_finishes_the_step_saves_exits_0_and_the_next_run_resumes(tmp_path, assets):
  # Long enough that only the signal ends it; no periodic save, so the checkpoint is the signal's.
  cfg = _config_file(tmp_path, assets, num_steps=100_000, save_every=100_000, eval_prompts=0,
                     log_every=1)
  workdir = str(tmp_path / "run")
  env = _env(tmp_path)
  args = [sys.executable, "-m", "gemma_mtp_jax.train", f"--config={cfg}", f"--workdir={workdir}"]
  first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  _wait_for_step(workdir, 2, first)
  first.send_signal(signal.SIGTERM)
  stdout, stderr = first.communicate(timeout=120)
  assert first.returncode == 0, stderr[-2000:]
  assert "stopped (signal 15)" in stdout and "Run the same command again to resume" in stdout
  saved = test_trainer.saved_steps(workdir)
  assert len(saved) == 1 and saved[0] >= 2

  second = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  _wait_for_step(workdir, saved[0] + 1, second)
  second.send_signal(signal.SIGINT)  # Ctrl-C behaves the same
  stdout, stderr = second.communicate(timeout=120)
  assert second.returncode == 0, stderr[-2000:]
  assert f"resumed from step {saved[0]}" in stdout
  steps = [r["step"] for r in test_trainer._train_records(workdir)]
  assert steps == list(range(1, steps[-1] + 1))  # no step lost, none logged twice
  assert test_trainer.saved_steps(workdir)[-1] == steps[-1] > saved[0]
