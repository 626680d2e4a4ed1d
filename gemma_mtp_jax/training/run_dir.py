"""The train workdir as the trainer guards it: checked before anything is written, locked while a
run uses it, rolled back if the run fails before it starts, and fingerprinted.

  check_workdir   before any write: --workdir is a directory (or absent) that holds a train run or
                  nothing the project did not write; a local `hf_base` / `hf_drafter` exists and
                  its config.json reads (fresh runs only: a resume does not read them)
  claim           the lock (`files.dir_lock`: one trainer per workdir; only process 0 of a
                  multi-host run takes it, the others write nothing there) and the rollback: a run
                  that fails before its loop starts leaves the workdir as it found it
  fingerprint     what a run was started with and cannot change on resume: the model and drafter
                  architecture (`ModelConfig` fields but the compute dtype, remat and attention
                  chunking, which change no stored tensor) and the keys that shape the token
                  stream or the saved state (`DATA_KEYS`, `TRAIN_KEYS`); WORKDIR/fingerprint.json
  check_resume    a resume whose fingerprint differs is refused naming each key (workdir vs
                  config) unless `train.allow_config_change`, which then rewrites pair.json,
                  config.json and the fingerprint (`adopt_config`); a checkpoint whose tensor
                  shapes differ from the config's is refused naming the tensors (`check_shapes`)
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from typing import Iterator

import jax
import orbax.checkpoint as ocp

from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.checkpoint import hf_read
from gemma_mtp_jax.checkpoint import pair as checkpoint
from gemma_mtp_jax.checkpoint import layout
from gemma_mtp_jax.checkpoint import trees
from gemma_mtp_jax.checkpoint import workdir as workdir_lib
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.training import distributed
from gemma_mtp_jax.training import config as train_config
from gemma_mtp_jax.utils import files

ConfigError = config_lib.ConfigError
FINGERPRINT_JSON = "fingerprint.json"
FINGERPRINT_FORMAT = "gemma_mtp_jax.fingerprint/1"
# Model fields a resume may change: numerics and compilation only (no stored tensor changes).
FREE_MODEL_FIELDS = ("dtype", "remat_policy", "attention_chunk_size")
# data.* keys that change the token stream (which rows, in which order, tokenized how).
DATA_KEYS = ("sources", "tokenizer", "tiny_vocab_size", "eval_fraction", "vision")
# train.* keys that change the token stream per step or the saved state's structure.
TRAIN_KEYS = ("seq_len", "batch_size", "seed", "freeze_base", "freeze_vision")
# Names the trainer writes in a workdir: a dir holding only these is the project's (or empty).
OWN_NAMES = (layout.PAIR_JSON, layout.TOKENIZER_DIR, layout.HF_EXTRA_DIR, layout.CHECKPOINTS_DIR,
             files.MARKER, FINGERPRINT_JSON, "config.json", "metrics.jsonl", "tensorboard",
             "plots", "hf")


# ------------------------------------------------------------------------------ before writing
def _is_run(workdir: str) -> bool:
  return (os.path.isfile(os.path.join(workdir, layout.PAIR_JSON))
          or files.read_marker(workdir) == "workdir")


def has_checkpoints(checkpoint_dir: str) -> bool | None:
  """Whether a local checkpoints dir holds a step (None: remote, not looked at)."""
  if "://" in checkpoint_dir:
    return None
  return os.path.isdir(checkpoint_dir) and any(n.isdigit() for n in os.listdir(checkpoint_dir))


def check_workdir(workdir: str, checkpoint_dir: str, cfg) -> None:
  """Refuses, before anything is written, a workdir that is not a directory, one that holds files
  the project did not write, and (fresh runs) a local `hf_base` / `hf_drafter` that is missing or
  whose config.json does not read."""
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} exists and is not a directory")
  if os.path.isdir(workdir) and not _is_run(workdir):
    foreign = sorted(n for n in os.listdir(workdir)
                     if n not in OWN_NAMES and not n.startswith(files.LOCK_NAME))
    if foreign:
      raise ConfigError(f"--workdir {workdir} holds files this project did not write "
                        f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) and no "
                        f"{layout.PAIR_JSON}: choose a new or empty directory")
  if has_checkpoints(checkpoint_dir) is not False:
    return  # a resume reads the checkpoint, not hf_base
  for key in ("hf_base", "hf_drafter"):
    path = str(cfg.get(key) or "")
    if not path:
      continue
    if not os.path.exists(path):
      if not files.is_hub_id(path):
        raise ConfigError(f"config key '{key}': no such directory: {path}")
    elif not os.path.isdir(path):
      raise ConfigError(f"config key '{key}': {path} is not a directory")
    else:
      hf_read.hf_model_type(path)  # a config.json that does not read is named now


class Claim:
  """What `claim` created, to undo if the run fails before its loop starts."""

  def __init__(self, workdir: str, checkpoint_dir: str):
    self.workdir, self.checkpoint_dir = workdir, checkpoint_dir
    self.new_workdir = not os.path.lexists(workdir)
    self.new_checkpoints = "://" not in checkpoint_dir and not os.path.lexists(checkpoint_dir)
    self.started = False

  def rollback(self) -> None:
    if self.started:
      return
    if self.new_workdir:
      shutil.rmtree(self.workdir, ignore_errors=True)
    elif self.new_checkpoints and os.path.isdir(self.checkpoint_dir):
      with contextlib.suppress(OSError):
        os.rmdir(self.checkpoint_dir)  # only if still empty


@contextlib.contextmanager
def claim(workdir: str, checkpoint_dir: str, is_main: bool) -> Iterator[Claim]:
  """Locks the workdir for the block (process 0 only; `files.LockedError` names the pid and host
  of a live holder) and, if the block raises before `Claim.started` is set, removes what the run
  created (a new workdir entirely, else a new, still empty checkpoints dir)."""
  c = Claim(workdir, checkpoint_dir)
  lock = files.dir_lock(workdir, "workdir") if is_main else contextlib.nullcontext()
  try:
    with lock:
      yield c
  except BaseException:
    if is_main:
      c.rollback()
    raise


# ------------------------------------------------------------------------------ the fingerprint
def _json(x):
  return json.loads(json.dumps(x, default=str))


def _model_part(d: dict) -> dict:
  """The fingerprinted fields of a ModelConfig dict; one recorded before a family field existed
  gets its family's value (`hf_config.with_family_fields`), so adding one refuses no resume."""
  d = hf_config.with_family_fields(d)
  return _json({k: v for k, v in d.items() if k not in FREE_MODEL_FIELDS})


def _drafter_part(d: dict | None) -> dict | None:
  if d is None:
    return None
  return {**d, "text": _model_part(d["text"])}


def fingerprint(cfg, base_cfg, dcfg, tcfg: train_config.TrainConfig) -> dict:
  """The run's fingerprint (see the module docstring), JSON-ready."""
  data = train_config.as_dict(cfg.data)
  return _json({
      "format": FINGERPRINT_FORMAT,
      "model": _model_part(config_lib.model_config_to_dict(base_cfg)),
      "drafter": _drafter_part(config_lib.drafter_config_to_dict(dcfg)),
      "data": {k: data.get(k) for k in DATA_KEYS},
      "train": {k: getattr(tcfg, k) for k in TRAIN_KEYS}})


def _recorded(workdir: str) -> dict | None:
  """The workdir's fingerprint; for a workdir written before fingerprints, the model and drafter
  parts from its pair.json; None for a new workdir."""
  p = os.path.join(workdir, FINGERPRINT_JSON)
  if os.path.isfile(p):
    with open(p, encoding="utf-8") as f:
      j = json.load(f)
    if not isinstance(j, dict) or j.get("format") != FINGERPRINT_FORMAT:
      raise ConfigError(f"{p}: not a {FINGERPRINT_FORMAT} file")
    if isinstance(j.get("model"), dict):
      j["model"] = _model_part(j["model"])
    if isinstance(j.get("drafter"), dict) and isinstance(j["drafter"].get("text"), dict):
      j["drafter"] = _drafter_part(j["drafter"])
    return j
  if os.path.isfile(os.path.join(workdir, layout.PAIR_JSON)):
    pj = layout.read_pair_json(workdir)
    return {"model": _model_part(pj["base"]), "drafter": _drafter_part(pj.get("drafter"))}
  return None


def _flat(x, prefix: str) -> dict:
  if isinstance(x, dict):
    out = {}
    for k, v in x.items():
      out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  if isinstance(x, list) and x and all(isinstance(v, dict) for v in x):
    out = {f"{prefix}": len(x)} if prefix.endswith("sources") else {}
    for i, v in enumerate(x):
      out.update(_flat(v, f"{prefix}[{i}]"))
    return out
  return {prefix: x}


def differences(recorded: dict, current: dict) -> list[str]:
  """`key: old (workdir) vs new (config)` for every key of the recorded sections that differs."""
  out = []
  for section in ("model", "drafter", "data", "train"):
    if section not in recorded:
      continue
    old, new = _flat(recorded[section], section), _flat(current.get(section), section)
    for k in sorted(set(old) | set(new)):
      if old.get(k, "(absent)") != new.get(k, "(absent)"):
        out.append(f"{k}: {json.dumps(old.get(k, '(absent)'))} (workdir) vs "
                   f"{json.dumps(new.get(k, '(absent)'))} (config)")
  return out


def check_fingerprint(workdir: str, current: dict, allow: bool) -> list[str]:
  """The differing keys (empty if none or a new workdir); raises ConfigError naming them unless
  `allow` (train.allow_config_change)."""
  recorded = _recorded(workdir)
  diff = differences(recorded, current) if recorded is not None else []
  if diff and not allow:
    raise ConfigError(
        f"workdir {workdir} was started with another config ({len(diff)} key(s) differ): "
        f"{'; '.join(diff)}. Resuming would mix two runs: use a new --workdir, or pass "
        "--config.train.allow_config_change=True to continue with the new values (the workdir's "
        "pair.json, config.json and fingerprint are then rewritten)")
  return diff


def adopt_config(workdir: str, current: dict, base_cfg, dcfg, cfg, rewrite_pair: bool) -> None:
  """Writes the run's fingerprint and config.json, and with `rewrite_pair` (an allowed config
  change) pair.json's configs: the workdir then describes what the run now trains, as its export
  will."""
  pj_path = os.path.join(workdir, layout.PAIR_JSON)
  if rewrite_pair and os.path.isfile(pj_path):
    pj = layout.read_pair_json(workdir)
    new = dict(pj, base=config_lib.model_config_to_dict(base_cfg),
               drafter=config_lib.drafter_config_to_dict(dcfg))
    if _json(new) != _json(pj):
      _write(pj_path, lambda p: files.write_json(p, new))
  _write(os.path.join(workdir, FINGERPRINT_JSON), lambda p: files.write_json(p, current))
  _write(os.path.join(workdir, "config.json"),
         lambda p: open(p, "w").write(cfg.to_json_best_effort(indent=2)))


def _write(path: str, write) -> None:
  """Writes through a temp file renamed over `path`: a crash leaves the old or the new file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


# ------------------------------------------------------------------------------ shapes
def _shapes_of_metadata(tree, prefix=()) -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_shapes_of_metadata(v, prefix + (str(k),)))
    return out
  if isinstance(tree, (list, tuple)):
    out = {}
    for i, v in enumerate(tree):
      out.update(_shapes_of_metadata(v, prefix + (str(i),)))
    return out
  shape = getattr(tree, "shape", None)
  return {} if shape is None else {"/".join(prefix): tuple(shape)}


def check_shapes(manager, step: int, abstract_vars, opt_abs, diff: list[str]) -> None:
  """Refuses a checkpoint whose params (by name) or optimizer state (leaf count and shapes) do not
  match the config's, naming the tensors and the differing config keys, if known: a changed shape
  cannot resume, whatever train.allow_config_change says."""
  try:
    md = manager.item_metadata(step)
    saved = _shapes_of_metadata(getattr(md["params"], "tree", md["params"]))
    saved_opt = _shapes_of_metadata(getattr(md["opt_state"], "tree", md["opt_state"]))
  except Exception:  # noqa: BLE001 (unreadable metadata: the restore names the bad step)
    return
  want = {"/".join(trees.path_keys(p)): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(abstract_vars)}
  bad = [f"{k}: {saved.get(k, '(absent)')} (checkpoint) vs {want.get(k, '(absent)')} (config)"
         for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
  want_opt = sorted(tuple(x.shape) for x in jax.tree.leaves(opt_abs))
  if not bad and sorted(saved_opt.values()) != want_opt:
    bad = [f"optimizer state: {len(saved_opt)} tensors (checkpoint) vs {len(want_opt)} (config)"]
  if bad:
    keys = f" (changed config keys: {'; '.join(diff)})" if diff else ""
    raise ConfigError(
        f"checkpoint step {step} in {manager.directory} does not fit the config{keys}: "
        f"{'; '.join(bad[:4])}{'; ...' if len(bad) > 4 else ''}. A change of tensor shapes "
        "cannot resume (train.allow_config_change allows only same-shape changes): use a new "
        "--workdir")


# ------------------------------------------------------------------------------ checkpoints
def restore_checkpoint(mgr, abstract_vars, opt_abs, config_change: list, is_main: bool, say):
  """(step, variables, opt_state, meta) of the newest checkpoint that restores intact
  (`workdir.restore_newest_intact`: a truncated or half-written newer step is skipped with a
  warning naming it, and set aside as STEP.unreadable-TIME so the run can save that step again),
  placed on the targets' shardings, params checked (dtypes, NaN/inf). A checkpoint whose shapes
  differ from the config's is refused first (`check_shapes`)."""
  newest = max(mgr.all_steps())
  check_shapes(mgr, newest, abstract_vars, opt_abs, config_change)

  restore = functools.partial(workdir_lib.restore_step, mgr, params_target=abstract_vars,
                              opt_state_target=opt_abs)
  step, (variables, opt_state, meta) = workdir_lib.restore_newest_intact(mgr, restore)
  if step != newest:
    say(f"[train] checkpoint step(s) {[s for s in mgr.all_steps() if s > step]} in "
        f"{mgr.directory} are unreadable (see the warning); resuming from step {step}")
    _set_aside(mgr, step, is_main)
  return step, variables, opt_state, meta


def _set_aside(mgr, step: int, is_main: bool) -> None:
  """Renames the unreadable steps after `step` to STEP.unreadable (kept, not deleted; orbax no
  longer lists them), so that the resumed run can save those steps again."""
  directory = str(mgr.directory)
  if is_main and "://" not in directory:
    for s in sorted(mgr.all_steps()):
      if s > step:
        os.rename(os.path.join(directory, str(s)),
                  os.path.join(directory, f"{s}.unreadable-{int(time.time())}"))
  distributed.barrier("set_aside")
  mgr.reload()


def _params_problem(manager, step: int, abstract_vars) -> str | None:
  """Why checkpoint `step`'s params would be refused on resume (non-finite, wrong dtype), or None."""
  try:
    out = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_vars)))
    trees.check_tree(dict(out["params"]), f"step {step}")
  except Exception as e:  # noqa: BLE001 (any reason the resume would refuse it)
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
  return None


def keep_good_checkpoint(manager, step: int, start: int, keep_checkpoints: int,
                         abstract_vars) -> str:
  """After a non-finite value at `step` of a run that started after step `start`: deletes
  checkpoint step - 1 (its params produced the value) only if an older one is left and it is not
  the one the run resumed from (so the last checkpoint a rerun could resume from is never
  dropped); returns the truth about what is kept and what a rerun does."""
  manager.wait_until_finished()
  steps = sorted(manager.all_steps())
  fix = "lower train.learning_rate or raise train.warmup_steps"
  if steps and steps[-1] == step - 1 and step - 1 > start and len(steps) > 1:
    manager.delete(step - 1)
    steps = steps[:-1]
  where = manager.directory
  if not steps:
    return f"No checkpoint was saved: a rerun starts from scratch; {fix} first"
  if steps[-1] == step - 1:
    why = ("the step this run resumed from" if step - 1 == start else
           f"the only checkpoint (train.keep_checkpoints={keep_checkpoints} removed older "
           "ones)")
    kept = f"Kept: checkpoint step {step - 1} in {where}, {why}, although its params gave this value"
    problem = _params_problem(manager, step - 1, abstract_vars)
    if problem:
      return (f"{kept}; its params are not finite ({problem}), so a rerun cannot resume from it "
              "and refuses it: start over in a new --workdir")
    return f"{kept}; a rerun resumes from it, so {fix} first, or start over in a new --workdir"
  return (f"Last good checkpoint: step {steps[-1]} in {where} (kept; a rerun resumes from it); "
          f"{fix}, then rerun to resume from it")


def random_pair(base_cfg, dcfg, abstract, tokenizer_path: str | None) -> checkpoint.Pair:
  """A Pair describing a random-init run, for the workdir's pair.json (no weights in it)."""
  params = {"base": abstract["base"], "drafter": abstract["drafter"]}
  return checkpoint.Pair(base_cfg, dcfg, params, tokenizer_path,
                         dict(kind="init", path=None, step=None, train=None, extra_dir=None,
                              pair={"source": {"base": "random init", "drafter": "random init"},
                                    "hf_extra": {}}))


def split_workdir(workdir: str, checkpoint_dir: str, name: str) -> tuple[str, str | None]:
  """(local workdir, checkpoint dir or None for WORKDIR/checkpoints).

  A remote --workdir (gs://..., any "scheme://") keeps what orbax writes, the checkpoints, at
  WORKDIR/checkpoints (unless train.checkpoint_dir says otherwise); metrics, plots and the HF
  export are local files, written under runs/<name>."""
  if "://" not in workdir:
    return os.path.abspath(workdir), checkpoint_dir or None
  return (os.path.abspath(os.path.join("runs", name)),
          checkpoint_dir or f"{workdir.rstrip('/')}/{checkpoint.CHECKPOINTS_DIR}")
