"""`python -m gemma_mtp_jax.train`: the typed train config and its overrides, config errors, bad data,
and SIGTERM (preemption) + resume.

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
from gemma_mtp_jax.training import config as train_config
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
  msg = train_config.explain_override_error(["train", *argv], error)
  assert re.search(match, msg), msg


def test_typos_inside_a_config_file_name_the_closest_key():
  for section, typo, right in (("train", "num_stpes", "num_steps"),
                               ("data", "eval_fractoin", "eval_fraction"),
                               ("mesh", "axis", "axes")):
    cfg = presets.load_config("tiny")
    cfg[section][typo] = 1
    with pytest.raises(train_config.ConfigError, match=rf"'{section}\.{typo}'.*'{right}'"):
      train_config.validate_config(cfg)
  cfg = presets.load_config("tiny")
  cfg.trian = {}
  with pytest.raises(train_config.ConfigError, match=r"'trian'.*'train'"):
    train_config.validate_config(cfg)
  cfg = presets.load_config("tiny")
  cfg.data.sources = [dict(name="x", path="a.jsonl", wieght=1.0)]
  with pytest.raises(train_config.ConfigError, match=r"'data\.sources\[0\]\.wieght'.*'weight'"):
    train_config.validate_config(cfg)
  cfg = presets.load_config("tiny")
  cfg.train.batch_size, cfg.train.grad_accum_steps = 6, 4
  with pytest.raises(train_config.ConfigError, match="grad_accum_steps"):
    train_config.validate_config(cfg)


def test_every_preset_passes_validation():
  for name in ("tiny", "tiny_vision", "e2b", "e4b", "26b_a4b", "31b"):
    cfg = presets.load_config(name)
    train_config.validate_config(cfg)
    assert cfg.train.num_draft_steps == 4
    if not name.startswith("tiny"):  # the released pairs: the seed recipe's mix and weight
      assert cfg.train.drafter_loss_weight == 0.01
      assert [s["path"] for s in cfg.data.sources] == ["allenai/tulu-3-sft-mixture",
                                                       "ise-uiuc/Magicoder-OSS-Instruct-75K"]
      assert [s["weight"] for s in cfg.data.sources] == [0.8, 0.2]
      assert cfg.data.tokenizer == cfg.hf_base


# ------------------------------------------------------------------------------ the typed config
# A value for every TrainConfig field other than its default in configs/tiny.py, as it is typed on
# the command line, and the value the TrainConfig must then hold.
OVERRIDES = {
    "num_draft_steps": ("3", 3), "drafter_loss_weight": ("0.25", 0.25),
    "step_weights": ("(1.0,0.5,0.25,0.125)", (1.0, 0.5, 0.25, 0.125)),
    "draft_query_position": ("anchor", "anchor"),
    "drafter_objective": ("nemo_composite", "nemo_composite"), "freeze_base": ("True", True),
    "share_embedding_with_base": ("False", False), "drafter_grads_to_base": ("False", False),
    "dense_head": ("False", False), "centroid_loss_weight": ("0.5", 0.5),
    "drafter_logit_softcap": ("30.0", 30.0), "z_loss_weight": ("1e-4", 1e-4),
    "loss_chunk_size": ("64", 64), "seq_len": ("64", 64), "batch_size": ("16", 16),
    "grad_accum_steps": ("2", 2), "num_steps": ("7", 7), "learning_rate": ("2e-3", 2e-3),
    "warmup_steps": ("5", 5), "min_learning_rate_ratio": ("0.5", 0.5),
    "weight_decay": ("0.1", 0.1), "adam_b1": ("0.8", 0.8), "adam_b2": ("0.9", 0.9),
    "adam_eps": ("1e-6", 1e-6), "grad_clip_norm": ("0.5", 0.5), "seed": ("3", 3),
    "init_embedding_std": ("0.5", 0.5), "log_every": ("2", 2), "eval_every": ("0", 0),
    "save_every": ("9", 9), "keep_checkpoints": ("1", 1), "checkpoint_dir": ("gs://b/ck", "gs://b/ck"),
    "allow_config_change": ("True", True),
    "eval_prompts": ("4", 4), "eval_new_tokens": ("5", 5), "eval_max_prompt_len": ("33", 33),
    "export_hf": ("False", False), "export_dtype": ("bfloat16", "bfloat16"),
    "hf_check": ("False", False), "compilation_cache_dir": ("/tmp/cc", "/tmp/cc"),
    "router_aux_loss_weight": ("0.01", 0.01), "router_z_loss_weight": ("1e-3", 1e-3),
    "freeze_vision": ("False", False),
}
# The tiny preset's base as a routed-MoE model: what the router-loss keys need to be valid.
MOE_MODEL = ("model.enable_moe=True", "model.num_experts=4", "model.top_k_experts=2",
             "model.moe_hidden_dim=32")
PARTNERS = {"router_aux_loss_weight": MOE_MODEL, "router_z_loss_weight": MOE_MODEL}


def _overridden(*overrides: str):
  """The tiny preset with `--config.X=value` flags applied the way the train CLI applies them
  (ml_collections' config_flags on a fresh flag set)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["train", f"--config={train_config.default_config_path()}",
          *(f"--config.{o}" for o in overrides)]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                           sys_argv=argv)
  fv(argv)
  return holder.value


def test_every_train_field_round_trips_through_an_override():
  assert sorted(OVERRIDES) == sorted(train_config.field_names())
  tiny = train_config.TrainConfig.from_config(presets.load_config("tiny").train)
  for key, (text, want) in OVERRIDES.items():
    assert getattr(tiny, key) != want, key  # the override changes something
    cfg = _overridden(f"train.{key}={text}", *PARTNERS.get(key, ()))
    # Fields checked against others need a partner: K draft steps <-> K step weights.
    if key == "step_weights":
      assert cfg.train.num_draft_steps == 4
    _, _, tcfg = train_config.validate_config(cfg)
    got = getattr(tcfg, key)
    assert got == want and type(got) is type(want), (key, got)
    others = {k: getattr(tcfg, k) for k in OVERRIDES if k != key}
    assert others == {k: getattr(tiny, k) for k in others}, key


def test_train_values_are_checked_naming_the_key():
  for overrides, match in (
      (["train.step_weights=(1.0,0.5)"], r"'train\.step_weights'.*2 entries for 4"),
      (["train.draft_query_position=middle"], r"'train\.draft_query_position'"),
      (["train.batch_size=6", "train.grad_accum_steps=4"], r"'train\.grad_accum_steps'"),
      (["train.export_dtype=fp8"], r"'train\.export_dtype'"),
      (["train.router_z_loss_weight=0.1"], r"'train\.router_z_loss_weight'.*no MoE layer")):
    with pytest.raises(train_config.ConfigError, match=match):
      train_config.validate_config(_overridden(*overrides))
  with pytest.raises(train_config.ConfigError, match=r"'train\.lerning_rate'.*'learning_rate'"):
    train_config.train_fields(lerning_rate=1e-3)
  with pytest.raises(train_config.ConfigError, match=r"'train\.num_steps'.*expects int"):
    train_config.TrainConfig.from_config(dict(num_steps=2.5))


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
