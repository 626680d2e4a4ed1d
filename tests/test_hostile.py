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
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
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
