"""Hostile but realistic inputs and faults against convert and generate (issue #13, "Nothing lost").

Each test asserts the exit status, that no traceback reached stderr, that the one `error:` line
names the culprit (file, flag, tensor, step, row), and that every file that existed before still
exists unchanged. Tiny models only; the commands run in-process except where the real process's
stderr and exit status are the point.
"""

import contextlib
import errno
import glob
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

from gemma_mtp_jax import checkpoint
from gemma_mtp_jax import cli
from gemma_mtp_jax import convert
from gemma_mtp_jax import generate
from gemma_mtp_jax.checkpoint import safetensors_io as st_io
from gemma_mtp_jax.checkpoint import workdir as workdir_lib
from gemma_mtp_jax.data import sources
from gemma_mtp_jax.utils import files
from gemma_mtp_jax.utils.errors import UserError
from tests import hf_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 128
PROMPT = ("--prompt-ids", "2,17,60,9", "--max-new-tokens", "4", "--no-stop", "--json")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def src(tmp_path_factory):
  """An HF base dir (tiny k_eq_v model, no tokenizer), its pair dir, and a train workdir with
  steps 1 and 2 (step 2's embedding differs, so the step used is visible in the tokens)."""
  root = tmp_path_factory.mktemp("hostile")
  d = {k: str(root / k) for k in ("base", "pair", "wd")}
  model = hf_helpers.hf_causal_lm("k_eq_v", vocab_size=VOCAB, num_hidden_layers=2,
                                  layer_types=[hf_helpers.S, hf_helpers.F])
  model.save_pretrained(d["base"])
  checkpoint.hf_to_jax(d["base"], d["pair"])
  pair = checkpoint.load_pair(d["pair"])
  wd = checkpoint.init_workdir(d["wd"], pair)
  mgr = checkpoint.open_manager(wd)
  opt = {"mu": np.zeros(3, np.float32)}
  later = jax.tree.map(lambda x: x, pair.params)
  later["base"] = dict(later["base"], embedding=later["base"]["embedding"][::-1])
  mgr.save(1, args=checkpoint.save_args(pair.params, opt, {"step": 1}))
  mgr.save(2, args=checkpoint.save_args(later, opt, {"step": 2}))
  mgr.wait_until_finished()
  mgr.close()
  return d


def _hashes(*roots):
  """{path: sha256} of every file under the roots (a root may be a file)."""
  out = {}
  for root in roots:
    paths = [root] if os.path.isfile(root) else glob.glob(os.path.join(root, "**"), recursive=True)
    for p in paths:
      if os.path.isfile(p):
        with open(p, "rb") as f:
          out[p] = hashlib.sha256(f.read()).hexdigest()
  return out


def _call(main, argv):
  """(exit status, stdout, stderr) of a CLI main run in-process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


def _refused(main, argv, *culprits, keep=()):
  """The command exits 2 with one `error:` line naming every culprit, no traceback, and every
  file under `keep` unchanged."""
  before = _hashes(*keep)
  code, out, err = _call(main, argv)
  assert code == 2, (code, err)
  assert "Traceback" not in err
  lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
  assert len(lines) == 1, err
  for c in culprits:
    assert str(c) in lines[0], (c, lines[0])
  assert _hashes(*keep) == before
  return lines[0]


def _copy(src_dir, dst):
  shutil.copytree(src_dir, dst)
  return str(dst)


# ------------------------------------------------------------------------------ 1. --overwrite
def test_output_that_is_or_holds_an_input_is_refused_whatever_the_flags(src, tmp_path):
  wd = _copy(src["wd"], tmp_path / "runs" / "wd")
  sibling = _copy(src["pair"], tmp_path / "runs" / "sibling")
  runs = str(tmp_path / "runs")
  for out in (wd, runs, os.path.join(wd, "hf")):  # is, contains, lies inside
    for flags in ((), ("--overwrite",)):
      _refused(convert.main, ["jax-to-hf", "--checkpoint", wd, "--out", out, *flags],
               out, "the input", wd, keep=[runs])
  base = _copy(src["base"], tmp_path / "hf_base")
  _refused(convert.main, ["hf-to-jax", "--base", base, "--out", base, "--overwrite"],
           base, "is the input", keep=[base])
  link = tmp_path / "link"
  os.symlink(base, link)  # the same dir under another name
  _refused(convert.main, ["hf-to-jax", "--base", base, "--out", link, "--overwrite"],
           "is the input", keep=[base])
  assert sorted(os.listdir(runs)) == ["sibling", "wd"] and os.path.isdir(sibling)


def test_overwrite_replaces_only_a_dir_this_project_wrote(src, tmp_path):
  user = tmp_path / "mine"
  user.mkdir()
  (user / "notes.txt").write_text("precious")
  _refused(convert.main, ["hf-to-jax", "--base", src["base"], "--out", user, "--overwrite"],
           user, "not written by this project", files.MARKER, keep=[str(user)])
  wd = _copy(src["wd"], tmp_path / "wd")
  _refused(convert.main, ["jax-to-hf", "--checkpoint", src["pair"], "--out", wd, "--overwrite"],
           wd, "train workdir", keep=[wd])
  # What the project wrote carries the marker, and is replaced.
  out = tmp_path / "hf"
  assert _call(convert.main, ["jax-to-hf", "--checkpoint", src["pair"], "--out", out])[0] == 0
  assert files.read_marker(str(out)) == "hf_export"
  assert files.read_marker(src["pair"]) == "pair" and files.read_marker(src["wd"]) == "workdir"
  code, _, err = _call(convert.main, ["jax-to-hf", "--checkpoint", src["pair"], "--out", out,
                                      "--overwrite"])
  assert code == 0, err


# ------------------------------------------------------------------------------ 2. OS errors
def test_full_disk_is_one_line_and_leaves_the_previous_output(src, tmp_path, monkeypatch):
  out = tmp_path / "hf"
  assert _call(convert.main, ["jax-to-hf", "--checkpoint", src["pair"], "--out", out])[0] == 0

  def full(tensors, path, metadata):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

  monkeypatch.setattr(st_io, "_write_shard", full)
  _refused(convert.main, ["jax-to-hf", "--checkpoint", src["pair"], "--out", out, "--overwrite"],
           "no space left on device", "model.safetensors", keep=[str(tmp_path)])
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temp dir left behind


def test_a_bug_keeps_its_traceback():
  def buggy(argv):
    raise RuntimeError("a bug")
  with pytest.raises(RuntimeError, match="a bug"):
    cli.run(buggy, [])
  code = ("from gemma_mtp_jax import cli\n"
          "def main(argv): raise RuntimeError('a bug')\n"
          "cli.exit_with(main)\n")
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
  assert res.returncode == cli.BUG and "Traceback" in res.stderr and "a bug" in res.stderr


def test_any_user_error_is_one_line_whatever_module_defines_it():
  # Defined here, in a module the boundary has never heard of: the type alone makes it a user error.
  class MyError(UserError):
    pass

  def main(argv):
    raise MyError("config key 'x.y' is bad:\n  use 3")

  _refused(lambda argv: cli.run(main, argv), [], "config key 'x.y' is bad: use 3")
  with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as exit_:
    cli.exit_with(main, [])
  assert exit_.value.code == cli.BAD_INPUT
  # A plain ValueError (the second base of most user errors) is still a bug.
  def buggy(argv):
    raise ValueError("a bug")
  with pytest.raises(ValueError, match="a bug"):
    cli.run(buggy, [])


def test_workdir_that_is_a_file_is_named(src, tmp_path):
  f = tmp_path / "wd"
  f.write_text("not a dir")
  _refused(generate.main, ["--base", f, *PROMPT], f, "not a directory", keep=[str(f)])


# ------------------------------------------------------------------------------ 3. missing paths
def test_missing_local_path_is_not_a_hub_id(src, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "runs").mkdir()

  def no_hub(*a, **k):
    raise AssertionError("sent to the hub")
  monkeypatch.setattr(st_io.huggingface_hub, "snapshot_download", no_hub)
  _refused(generate.main, ["--base", "runs/nothing", *PROMPT], "no such directory: runs/nothing")
  _refused(generate.main, ["--base", src["pair"], "--drafter", "./gone", *PROMPT],
           "no such directory: ./gone")
  _refused(convert.main, ["hf-to-jax", "--base", "runs/a/b", "--out", "o"], "runs/a/b")
  _refused(convert.main, ["jax-to-hf", "--checkpoint", "~nobody/x", "--out", "o"], "~nobody/x")
  assert not files.is_hub_id("runs/tiny") and not files.is_hub_id("a/b/c")
  assert not files.is_hub_id("/abs/x") and not files.is_hub_id("./x")
  assert files.is_hub_id("google/gemma-4-e2b-it")


def test_unreachable_hub_id_is_one_line(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)

  def offline(*a, **k):
    raise st_io.huggingface_hub.errors.LocalEntryNotFoundError("offline and not cached")
  monkeypatch.setattr(st_io.huggingface_hub, "snapshot_download", offline)
  _refused(generate.main, ["--base", "someorg/somemodel", *PROMPT], "someorg/somemodel",
           "Hub", "offline")


# ------------------------------------------------------------------------------ 4. values
def test_config_json_that_is_not_an_object_is_named(src, tmp_path):
  base = _copy(src["base"], tmp_path / "base")
  cfg = os.path.join(base, "config.json")
  with open(cfg, "w") as f:
    json.dump([1, 2], f)
  _refused(convert.main, ["hf-to-jax", "--base", base, "--out", tmp_path / "o"], cfg,
           "JSON object", keep=[base])
  _refused(generate.main, ["--base", base, *PROMPT], cfg, "JSON object", keep=[base])
  assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("edit, fragment", [
    (lambda x: x.astype(np.int32), "dtype int32"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x).astype(x.dtype),
     "non-finite"),
])
def test_bad_hf_tensor_values_are_named(src, tmp_path, edit, fragment):
  base = _copy(src["base"], tmp_path / "base")
  path = os.path.join(base, st_io.WEIGHTS_NAME)
  state = safetensors.numpy.load_file(path)
  name = "model.layers.1.mlp.up_proj.weight"
  state[name] = edit(state[name])
  safetensors.numpy.save_file(state, path, metadata={"format": "pt"})
  _refused(convert.main, ["hf-to-jax", "--base", base, "--out", tmp_path / "o"], name, fragment,
           path, keep=[base])
  _refused(generate.main, ["--base", base, *PROMPT], name, fragment, keep=[base])


def test_nan_weight_in_a_pair_dir_is_named(src, tmp_path):
  pair = checkpoint.load_pair(src["pair"])
  out = tmp_path / "pair"
  shutil.copytree(src["pair"], out, ignore=shutil.ignore_patterns("params"))
  params = jax.tree.map(np.asarray, pair.params)
  params["base"]["final_norm"]["scale"] = params["base"]["final_norm"]["scale"].copy()
  params["base"]["final_norm"]["scale"][0] = np.inf
  checkpoint.save_params(str(out / "params"), params)
  _refused(generate.main, ["--base", out, *PROMPT], "base/final_norm/scale", "non-finite",
           keep=[str(out)])


@pytest.mark.parametrize("argv, fragment", [
    (("--temperature", "nan"), "--temperature"),
    (("--temperature", "inf"), "--temperature"),
    (("--temperature", "-1"), "--temperature"),
    (("--top-p", "0"), "--top-p"),
    (("--top-p", "nan"), "--top-p"),
    (("--top-p", "1.5"), "--top-p"),
    (("--top-k", "-1"), "--top-k"),
    (("--max-new-tokens", "0"), "--max-new-tokens"),
    (("--step", "-1"), "--step"),
])
def test_sampling_flags_are_range_checked_before_loading(src, monkeypatch, argv, fragment):
  def no_load(*a, **k):
    raise AssertionError("weights were read")
  monkeypatch.setattr(checkpoint, "load_pair", no_load)
  _refused(generate.main, ["--base", src["pair"], "--prompt-ids", "2,3", *argv], fragment)


def test_num_assistant_tokens_below_1_is_refused(src, tmp_path):
  _refused(convert.main, ["jax-to-hf", "--checkpoint", src["pair"], "--out", tmp_path / "o",
                          "--num-assistant-tokens", "0"], "--num-assistant-tokens", ">= 1")
  with pytest.raises(checkpoint.ConversionError, match="num_assistant_tokens"):
    checkpoint.jax_to_hf(src["pair"], str(tmp_path / "o"), num_assistant_tokens=0)
  assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------------------------------ 5. bad latest step
def _truncate_latest(wd, step=2):
  data = [p for p in glob.glob(os.path.join(wd, "checkpoints", str(step), "params", "**"),
                               recursive=True) if os.path.isfile(p) and "/d/" in p]
  big = max(data, key=os.path.getsize)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)


def test_truncated_latest_step_falls_back_to_the_intact_one(src, tmp_path, caplog):
  wd = _copy(src["wd"], tmp_path / "wd")
  good = _call(generate.main, ["--base", wd, "--step", "1", *PROMPT])
  assert good[0] == 0, good[2]
  _truncate_latest(wd)
  before = _hashes(wd)
  code, out, err = _call(generate.main, ["--base", wd, *PROMPT])
  assert code == 0 and "Traceback" not in err, err
  assert json.loads(out)["tokens"] == json.loads(good[1])["tokens"]  # step 1's weights
  warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("step 2" in m and "using step 1" in m for m in warned), warned
  caplog.clear()
  hf = tmp_path / "hf"
  code, _, err = _call(convert.main, ["jax-to-hf", "--checkpoint", wd, "--out", hf])
  assert code == 0 and "Traceback" not in err, err
  assert "step 2" in err and "using step 1" in err
  _refused(convert.main, ["jax-to-hf", "--checkpoint", wd, "--step", "2", "--out", tmp_path / "x"],
           "step 2", keep=[wd])
  _truncate_latest(wd, step=1)
  _refused(generate.main, ["--base", wd, *PROMPT], "no intact checkpoint", "step 2", "step 1")
  assert _hashes(wd).keys() == before.keys()


def test_step_problem_uses_orbax_metadata(src, tmp_path):
  wd = _copy(src["wd"], tmp_path / "wd")
  assert workdir_lib.step_problem(wd, 2) is None
  assert workdir_lib.latest_intact_step(wd) == 2
  os.remove(os.path.join(wd, "checkpoints", "2", workdir_lib.STEP_METADATA))
  assert "2" in workdir_lib.step_problem(wd, 2)
  assert workdir_lib.latest_intact_step(wd) == 1
  with pytest.raises(checkpoint.ConversionError, match="step 2"):
    workdir_lib.latest_intact_step(wd, step=2)


# ------------------------------------------------------------------------------ 6. data rows
def test_non_utf8_and_bad_json_rows_are_named_file_line(tmp_path):
  p = tmp_path / "rows.jsonl"
  p.write_bytes(b'{"problem": "a", "solution": "b"}\n{"problem": "c\xff", "solution": "d"}\n')
  load = lambda argv: cli.run(
      lambda a: sources.load_source(str(p), cache_dir=str(tmp_path / "cache")), argv)
  _refused(load, [], f"{p}:2", "not UTF-8", keep=[str(p)])
  p.write_bytes(b'{"problem": "a", "solution": "b"}\n\n{"problem": \n')
  _refused(load, [], f"{p}:3", "invalid JSON", keep=[str(p)])


# ------------------------------------------------------------------------------ the real commands
def test_real_commands_print_one_line_and_exit_2(src, tmp_path):
  wd = src["wd"]
  before = _hashes(wd)
  runs = [
      [sys.executable, "-m", "gemma_mtp_jax.generate", "--base", src["pair"], "--prompt-ids",
       "2,3", "--temperature", "nan"],
      [sys.executable, os.path.join(REPO, "tools", "convert", "jax_to_hf.py"), "--checkpoint", wd,
       "--out", wd, "--overwrite"],
  ]
  for argv, culprit in zip(runs, ("--temperature", wd)):
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and culprit in errors[0], res.stderr
  assert _hashes(wd) == before


# ------------------------------------------------------------------------------ the trainer
# Tiny runs of the small pair of tests/test_trainer.py (one compiled step shared by most tests).
from gemma_mtp_jax.training import config as train_config  # noqa: E402
from gemma_mtp_jax.training import loop as trainer  # noqa: E402
from gemma_mtp_jax.training import run_dir  # noqa: E402
from tests import test_trainer  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return test_trainer.write_assets(str(tmp_path_factory.mktemp("hostile_assets")))


def _small(assets, **train):
  return test_trainer.small_config(assets, **dict(dict(num_steps=3, save_every=1, eval_prompts=0),
                                                  **train))


def _train(cfg, wd, stop_after=None):
  return lambda argv: trainer.run(cfg, str(wd), stop_after=stop_after) and None


def _tree(root):
  """{path: sha256} of the files and the set of dirs under root: nothing added, removed or changed."""
  dirs = {p for p in glob.glob(os.path.join(root, "**"), recursive=True) if os.path.isdir(p)}
  return _hashes(root), dirs


@pytest.mark.parametrize("case", ["missing_hf_base", "hf_config_is_a_list", "mesh", "file_workdir",
                                  "foreign_workdir", "read_only_workdir"])
def test_train_setup_errors_are_one_line_before_anything_is_written(assets, tmp_path, monkeypatch,
                                                                    case):
  cfg, wd = _small(assets), tmp_path / "run"
  culprits = []
  if case == "missing_hf_base":
    cfg.hf_base = str(tmp_path / "no_base")
    culprits = ["hf_base", "no_base", "no such directory"]
  elif case == "hf_config_is_a_list":
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("[1, 2]")
    cfg.hf_base = str(tmp_path / "base")
    culprits = [str(tmp_path / "base" / "config.json"), "JSON object"]
  elif case == "mesh":
    cfg.mesh.axes.fsdp = 3
    culprits = ["mesh.axes", "3 devices"]
  elif case == "file_workdir":
    wd.write_text("mine")
    culprits = [str(wd), "not a directory"]
  elif case == "foreign_workdir":
    wd.mkdir()
    (wd / "thesis.tex").write_text("precious")
    culprits = [str(wd), "thesis.tex", "did not write"]
  else:  # a read-only disk (the tests run as root, where chmod does not stop writes)
    real = files.tempfile.mkstemp

    def read_only(*a, dir=None, **k):
      if dir == str(wd):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)
      return real(*a, dir=dir, **k)
    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    culprits = [str(wd), "read-only file system"]
  before = _tree(str(tmp_path))
  _refused(lambda argv: cli.run(_train(cfg, wd), argv), [], *culprits)
  assert _tree(str(tmp_path)) == before  # not even the workdir or its lock was left


def test_train_cli_batch_not_divisible_by_devices_exits_2_at_once(assets, tmp_path):
  cfg = tmp_path / "small.py"
  cfg.write_text("import sys\n"
                 f"sys.path.insert(0, {REPO!r})\n"
                 "from tests.test_trainer import small_config\n\n"
                 "def get_config():\n"
                 f"  return small_config({dict(assets)!r})\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  before = _tree(str(tmp_path))
  res = subprocess.run([sys.executable, "-m", "gemma_mtp_jax.train", f"--config={cfg}",
                        f"--workdir={tmp_path / 'run'}", "--config.train.batch_size=3",
                        "--config.train.grad_accum_steps=1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 2, res.stderr[-3000:]
  assert "Traceback" not in res.stderr
  errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
  assert len(errors) == 1 and "train.batch_size" in errors[0] and "2 devices" in errors[0], errors
  assert _tree(str(tmp_path)) == before


@pytest.mark.parametrize("override, culprit", [
    ("--config.train.batch_size=3", "train.batch_size"),
    ("--config.mesh.axes.fsdp=3", "mesh.axes"),
])
def test_aot_config_errors_exit_2_not_the_does_not_fit_code(override, culprit):
  if importlib.util.find_spec("libtpu") is None:
    pytest.fail("the AOT path needs the `tpu` extra: pip install -e '.[tpu]' (libtpu)")
  res = subprocess.run([sys.executable, "-m", "gemma_mtp_jax.aot", "--config=configs/tiny.py",
                        "--topology=v5e-4", "--config.train.seq_len=32",
                        "--config.train.batch_size=4", override], cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 2, res.stderr[-3000:]
  assert "Traceback" not in res.stderr
  errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
  assert len(errors) == 1 and culprit in errors[0], res.stderr[-2000:]


@pytest.mark.parametrize("key, value, fragment", [
    ("warmup_steps", -1, ">= 0"), ("adam_b1", 1.0, "[0, 1)"), ("adam_b2", -0.1, "[0, 1)"),
    ("adam_eps", 0.0, "> 0"), ("learning_rate", float("nan"), "finite"),
    ("learning_rate", float("inf"), "finite"), ("weight_decay", -0.1, ">= 0"),
    ("grad_clip_norm", -1.0, ">= 0"), ("drafter_loss_weight", -0.5, ">= 0"),
    ("drafter_loss_weight", float("nan"), "finite"), ("z_loss_weight", float("nan"), "finite"),
    ("min_learning_rate_ratio", float("nan"), "[0, 1]"), ("step_weights", (1.0, float("nan")),
                                                          "finite"),
    ("drafter_logit_softcap", 0.0, "> 0"), ("init_embedding_std", -1.0, ">= 0"),
    ("eval_new_tokens", 0, ">= 1"), ("loss_chunk_size", -8, ">= 0"),
])
def test_every_numeric_train_knob_is_range_checked(key, value, fragment):
  extra = {"num_draft_steps": 2} if key == "step_weights" else {}
  with pytest.raises(train_config.ConfigError, match=rf"'train\.{key}'.*{re.escape(fragment)}"):
    train_config.TrainConfig(**{key: value}, **extra)


def test_bad_train_knob_through_the_boundary(assets, tmp_path):
  _refused(lambda argv: cli.run(_train(_small(assets, adam_b1=1.5), tmp_path / "run"), argv), [],
           "train.adam_b1", "[0, 1)")
  assert not os.path.exists(tmp_path / "run")


def _poison_adam(wd, step):
  """NaN Adam moments in checkpoint `step`: the next update makes the params NaN."""
  mgr = checkpoint.open_manager(str(wd))
  restored = mgr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(), opt_state=ocp.args.StandardRestore(),
      meta=ocp.args.JsonRestore()))
  opt = jax.tree.map(lambda x: np.full_like(x, np.nan) if x.ndim else x, restored["opt_state"])
  mgr.delete(step)
  mgr.save(step, args=checkpoint.save_args(dict(restored["params"]), opt, restored["meta"]))
  mgr.wait_until_finished()
  mgr.close()


def test_nan_stop_never_deletes_the_only_checkpoint_and_says_what_is_kept(assets, tmp_path):
  wd = tmp_path / "run"
  cfg = _small(assets, keep_checkpoints=1)
  assert cli.run(_train(cfg, wd, stop_after=1), []) == 0
  _poison_adam(wd, 1)  # step 2's params go NaN (checkpoint 2 replaces 1), step 3's loss is NaN
  err = _refused(lambda argv: cli.run(_train(cfg, wd), argv), [], "non-finite loss", "step 3",
                 "Kept: checkpoint step 2", "only checkpoint", "keep_checkpoints=1",
                 "not finite", "cannot resume")
  assert test_trainer.saved_steps(str(wd)) == [2], err
  # The message is the truth: the rerun refuses the kept step, naming it and the tensor.
  _refused(lambda argv: cli.run(_train(cfg, wd), argv), [], "step 2", "non-finite")
  assert test_trainer.saved_steps(str(wd)) == [2]


def test_resume_with_a_changed_config_is_refused_naming_the_keys(assets, tmp_path):
  wd = tmp_path / "run"
  assert cli.run(_train(_small(assets), wd, stop_after=1), []) == 0
  fp = json.load(open(wd / run_dir.FINGERPRINT_JSON))
  assert fp["model"]["sliding_window"] == 8 and fp["train"]["batch_size"] == 4
  before = _tree(str(wd))
  changed = _small(assets)
  changed.model.sliding_window = 16
  changed.data.sources[0]["weight"] = 0.5
  _refused(lambda argv: cli.run(_train(changed, wd), argv), [],
           "model.sliding_window: 8 (workdir) vs 16 (config)",
           "data.sources[0].weight: 0.8 (workdir) vs 0.5 (config)", "allow_config_change")
  wider = _small(assets)
  wider.model.hidden_dim = 96  # a shape change: the same one line naming the key
  _refused(lambda argv: cli.run(_train(wider, wd), argv), [],
           "model.hidden_dim: 64 (workdir) vs 96 (config)")
  wider.train.allow_config_change = True  # allowed, but shapes cannot change: names the tensor
  err = _refused(lambda argv: cli.run(_train(wider, wd), argv), [], "model.hidden_dim",
                 "does not fit the config", "(checkpoint) vs")
  assert re.search(r"mlp\S*: \([\d, ]*64[\d, ]*\) \(checkpoint\) vs \([\d, ]*96", err), err
  assert _tree(str(wd)) == before
  # Allowed on purpose: the workdir's files now all say sliding_window 16.
  changed.train.allow_config_change = True
  assert cli.run(_train(changed, wd, stop_after=2), []) == 0
  assert json.load(open(wd / "pair.json"))["base"]["sliding_window"] == 16
  assert json.load(open(wd / run_dir.FINGERPRINT_JSON))["model"]["sliding_window"] == 16
  assert json.load(open(wd / "config.json"))["model"]["sliding_window"] == 16
  changed.train.allow_config_change = False  # the new config is the workdir's now
  assert cli.run(_train(changed, wd, stop_after=3), []) == 0


def test_one_trainer_per_workdir(assets, tmp_path, caplog):
  wd = tmp_path / "run"
  wd.mkdir()
  lock = wd / files.LOCK_NAME
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    lock.write_text(json.dumps({"pid": live.pid, "host": __import__("socket").gethostname(),
                                "start": files._process_start(live.pid)}))
    before = _tree(str(tmp_path))
    _refused(lambda argv: cli.run(_train(_small(assets), wd, stop_after=1), argv), [],
             f"workdir {wd} is in use by pid {live.pid} on host")
    assert _tree(str(tmp_path)) == before
  finally:
    live.kill()
    live.wait()
  # The holder is gone: its stale lock is taken over with a warning, and released at the end.
  assert cli.run(_train(_small(assets), wd, stop_after=1), []) == 0
  assert any("stale lock" in r.getMessage() and str(live.pid) in r.getMessage()
             for r in caplog.records)
  assert not lock.exists() and test_trainer.saved_steps(str(wd)) == [1]
  # Released on an exception too.
  with files.dir_lock(str(wd)):
    with pytest.raises(files.LockedError, match=f"pid {os.getpid()}"):
      with files.dir_lock(str(wd)):
        pass
  assert not lock.exists()


def test_resume_skips_a_truncated_latest_step(assets, tmp_path, capsys):
  wd = tmp_path / "run"
  assert cli.run(_train(_small(assets), wd, stop_after=2), []) == 0
  _truncate_latest(str(wd), step=2)
  bad = _hashes(os.path.join(wd, "checkpoints", "2"))
  assert cli.run(_train(_small(assets), wd, stop_after=3), []) == 0
  out = capsys.readouterr()
  assert "Traceback" not in out.err and "resumed from step 1" in out.out, out
  assert "step(s) [2]" in out.out and "unreadable" in out.out
  aside = glob.glob(os.path.join(wd, "checkpoints", "2.unreadable-*"))
  assert len(aside) == 1  # kept, byte for byte, under another name
  assert sorted(h for h in _hashes(aside[0]).values()) == sorted(bad.values())
  assert test_trainer.saved_steps(str(wd)) == [1, 2, 3]
  assert [r["step"] for r in test_trainer._train_records(str(wd))] == [1, 2, 3]
