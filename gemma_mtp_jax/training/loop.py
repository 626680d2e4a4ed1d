"""The joint trainer: fine-tune a Gemma 4 base and its assistant drafter together (or the drafter
alone on a frozen base), evaluate the greedy accepted length, and export the pair for HF.

`run(config, workdir)` is the whole job; `python -m gemma_mtp_jax.train` only parses flags. Its
phases, each a function of the `_Run` that setup builds:

  setup    `config.validate_config` (every section's keys; typos name the closest key; the `train`
           section becomes a `TrainConfig`), `jax.distributed` if asked, the data
           (`data.make_datasets`: the resumable mixture iterator and the fixed held-out batches), the
           mesh + logical rules (one CPU device is a 1x1 mesh), the compiled programs
           (`step.programs`); the workdir checks and the run fingerprint (`run_dir`). Nothing is
           written before the workdir is locked (`run_dir.claim`); a run that fails before its
           loop removes the workdir (or empty checkpoints dir) it created; then the manager
  resume   the newest intact step of the checkpoints if any (`run_dir.restore_checkpoint`):
           params, optimizer state, data position, RNG;
           else random init sharded at creation, or `checkpoint.load_pair` of `hf_base` +
           `hf_drafter` (HF dirs or hub ids, converted in memory onto the shardings)
  loop     one jitted train step (`step.train_step`: donated state, in/out shardings, compiled
           once) per optimizer update; metrics of step s are read while step s + 1 runs;
           checkpoints every `save_every` steps and at the end; evals every `eval_every`;
           SIGTERM/SIGINT finish the step, save and return
  finish   the final eval (`evaluate.make_evaluator`: losses, per-step accuracy, the exact greedy
           accepted length), the export to WORKDIR/hf/{base,drafter} and optionally the HF assisted
           generation check (`export`), the summary record and plots

Resume is exact: the step's inputs after a restart (params, optimizer state, the data iterator's
position, the step counter that drives the schedule) are what they were, the step is the same
compiled program, and the records past the restored step are dropped from metrics.jsonl, so N steps +
restart + N steps equals 2N straight (tests/test_trainer.py checks params and every logged loss).
Multi-host: every process runs every phase; only process 0 prints and writes files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gemma_mtp_jax import sharding
from gemma_mtp_jax.checkpoint import pair as checkpoint
from gemma_mtp_jax.data import pipeline as data_lib
from gemma_mtp_jax.decoding import request
from gemma_mtp_jax.model import transformer
from gemma_mtp_jax.training import config as train_config
from gemma_mtp_jax.training import distributed
from gemma_mtp_jax.training import evaluate as eval_lib
from gemma_mtp_jax.training import export as export_lib
from gemma_mtp_jax.training import metrics as metrics_lib
from gemma_mtp_jax.training import run_dir
from gemma_mtp_jax.training import step as step_lib
from gemma_mtp_jax.utils import compiles
from gemma_mtp_jax.utils import files
from gemma_mtp_jax.utils.errors import UserError

ConfigError = train_config.ConfigError
DataError = data_lib.DataError


class TrainingError(UserError, RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message names the step and the checkpoint."""


# ------------------------------------------------------------------------------ run
@dataclasses.dataclass
class _Run:
  """What setup builds for one run and the later phases read; `resume` fills the second group."""
  cfg: ml_collections.ConfigDict
  base_cfg: Any
  dcfg: Any
  tcfg: train_config.TrainConfig
  workdir: str  # local: metrics, plots, the HF export (the checkpoints may be elsewhere)
  is_main: bool  # process 0: the one that prints and writes files
  say: Callable[[str], None]
  tokenizer: Any
  tokenizer_dir: str | None  # the files that travel with the model (tokenizer; processor for images)
  train_iter: Any
  eval_batches: list
  prompts: list
  prompt_images: list  # per prompt: its images (pixel_values_ipc, pixel_positions_ip2) or None
  stop_ids: list
  mesh: Any
  rules: Any
  progs: step_lib.Programs
  checkpoint_path: str  # where the manager keeps the steps (local or remote)
  checkpoint_dir: str | None  # train.checkpoint_dir as the manager takes it (None: WORKDIR/checkpoints)
  fingerprint: dict  # `run_dir.fingerprint` of this config
  config_change: list  # the keys that differ from the workdir's (allowed by train.allow_config_change)
  t_start: float
  manager: Any = None  # opened once the workdir is locked
  # --- set by resume
  start: int = 0  # the step the loop starts after
  rng: Any = None
  buffers: Any = None  # the drafter's buffers (token_ordering): not trained, saved with the params
  writer: Any = None
  evaluator: Any = None


@dataclasses.dataclass
class _LoopEnd:
  state: step_lib.TrainState
  status: str  # "finished" or "preempted"
  signum: int | None  # the signal that preempted the run (None: stop_after or finished)
  last_eval: dict
  train_time_s: float
  xla_compiles: int  # compilations from the first step to the final eval (`utils.compiles`)


def run(cfg: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None) -> dict:
  """Trains, evaluates and exports; returns a summary dict.

  `stop_after`: behave as if preempted once that step is done (tests and time-boxed jobs): save,
  return with status "preempted"; the next call resumes.
  The summary has "status" ("finished" or "preempted"), "step", "workdir", "export" (the HF dir or
  None), the last "eval" metrics, "hf" (the HF check, if run), "train_step_compiles",
  "wall_time_s", and (finished runs) "xla_compiles" and the greedy eval's "prompts" and "stop_ids".
  Raises ConfigError / DataError / TrainingError with messages that name the cause.
  """
  r = _setup(cfg, workdir)  # checks only: nothing is written before the workdir is locked
  try:
    with run_dir.claim(r.workdir, r.checkpoint_path, r.is_main) as claim:
      r.manager = checkpoint.open_manager(r.workdir, max_to_keep=r.tcfg.keep_checkpoints,
                                          directory=r.checkpoint_dir)
      with sharding.use_mesh(r.mesh, r.rules):
        try:
          state = _resume(r)
        except BaseException:
          r.manager.close()  # before the claim rolls back what this run created
          raise
        claim.started = True
        end = _loop(r, state, stop_after)
        return _finish(r, end)
  except files.LockedError as e:
    raise TrainingError(str(e)) from None


def _setup(cfg: ml_collections.ConfigDict, workdir: str) -> _Run:
  """Config checks, processes, mesh, workdir checks, data and programs; writes nothing."""
  t_start = time.time()
  base_cfg, dcfg, tcfg = train_config.validate_config(cfg)
  distributed.initialize_distributed(cfg.mesh)
  # First: a mesh or batch that does not fit the devices is a config error, found in no time.
  mesh, rules = step_lib.run_mesh(cfg.mesh, tcfg, process_count=jax.process_count())
  if tcfg.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(tcfg.compilation_cache_dir))
  is_main = jax.process_index() == 0
  from tqdm import tqdm
  # tqdm.write prints above the progress bar instead of onto its line.
  say = (lambda msg: tqdm.write(msg)) if is_main else (lambda msg: None)
  remote = workdir
  workdir, checkpoint_dir = run_dir.split_workdir(workdir, tcfg.checkpoint_dir,
                                          str(cfg.get("name") or "run"))
  if workdir != remote:
    say(f"[train] --workdir {remote} is remote storage: checkpoints go to {checkpoint_dir} "
        f"(orbax), metrics, plots and the HF export to the local {workdir}")
  checkpoint_path = checkpoint_dir or os.path.join(workdir, checkpoint.CHECKPOINTS_DIR)
  run_dir.check_workdir(workdir, checkpoint_path, cfg)
  fingerprint = run_dir.fingerprint(cfg, base_cfg, dcfg, tcfg)
  config_change = run_dir.check_fingerprint(workdir, fingerprint, tcfg.allow_config_change)

  tokenizer = data_lib.tokenizer_from_config(cfg.data)
  if len(tokenizer) > base_cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is "
                      f"{base_cfg.vocab_size}")
  if base_cfg.vision is not None:
    data_lib.check_image_tokens(tokenizer, base_cfg.image_token_id, base_cfg.boi_token_id,
                                base_cfg.eoi_token_id)
  train_iter, eval_batches = data_lib.make_datasets(
      cfg.data, tokenizer, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size, seed=tcfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  prompts, prompt_images = eval_lib.prompts_from_batches(
      eval_batches, tcfg.eval_prompts, tcfg.eval_max_prompt_len, base_cfg.image_token_id)
  prompts, prompt_images = distributed.global_prompts(
      prompts, tcfg.eval_max_prompt_len, prompt_images, train_iter.image_slots)

  return _Run(cfg=cfg, base_cfg=base_cfg, dcfg=dcfg, tcfg=tcfg, workdir=workdir, is_main=is_main,
              say=say, tokenizer=tokenizer, train_iter=train_iter, eval_batches=eval_batches,
              tokenizer_dir=data_lib.tokenizer_files_dir(cfg.data, tokenizer),
              prompts=prompts, prompt_images=prompt_images,
              stop_ids=eval_stop_ids(cfg, workdir, base_cfg, tokenizer),
              mesh=mesh, rules=rules,
              progs=step_lib.programs(base_cfg, dcfg, tcfg, mesh, rules),
              checkpoint_path=checkpoint_path, checkpoint_dir=checkpoint_dir,
              fingerprint=fingerprint, config_change=config_change, t_start=t_start)


def _resume(r: _Run) -> step_lib.TrainState:
  """The train state to start from: the newest intact checkpoint's, else a fresh one (random init
  or the HF pair); then (everything that can fail having passed) writes the workdir's pair files,
  fingerprint and config.json, opens the metric writer, builds the evaluator and prints the run's
  "[train]" line."""
  cfg, tcfg = r.cfg, r.tcfg
  r.rng = jax.random.PRNGKey(tcfg.seed)
  opt_state = None
  if r.manager.all_steps():
    start, params, r.buffers, opt_state, meta = _restore(r)
    r.train_iter.set_state(meta["data"])
    r.rng = jnp.asarray(meta["rng"], jnp.uint32)
    source = f"resumed from step {start} of {r.manager.directory}"
    if r.is_main and not os.path.isfile(os.path.join(r.workdir, checkpoint.PAIR_JSON)):
      # A new machine resuming from a remote checkpoint_dir: the workdir's pair files (configs,
      # tokenizer, tensors carried through to the export) come from the run's source again.
      if cfg.hf_base:
        pair = checkpoint.load_pair(cfg.hf_base, drafter=cfg.hf_drafter or None,
                                    dtype=r.base_cfg.param_dtype)
      else:
        pair = run_dir.random_pair(r.base_cfg, r.dcfg, r.progs.abstract_vars, r.tokenizer_dir)
      checkpoint.init_workdir(r.workdir, pair)
  else:
    start = 0
    if cfg.hf_base:
      variables, pair = _hf_variables(cfg, r.base_cfg, r.dcfg, r.progs.var_sh)
      source = f"{cfg.hf_base} + {cfg.hf_drafter}"
    else:
      variables, _ = sharding.sharded_init(
          step_lib.init_fn(r.base_cfg, r.dcfg, tcfg.init_embedding_std), r.mesh, r.rules, r.rng)
      pair = run_dir.random_pair(r.base_cfg, r.dcfg, r.progs.abstract_vars, r.tokenizer_dir)
      source = "random init"
    if r.is_main:
      checkpoint.init_workdir(r.workdir, pair)
    params, r.buffers = step_lib.split_vars(variables)
  r.start = start
  state = r.progs.new_state(params, opt_state, start)
  if r.is_main:
    if r.config_change:
      r.say(f"[train] train.allow_config_change: continuing {r.workdir} with "
            f"{'; '.join(r.config_change)}; its pair.json, config.json and fingerprint are updated")
    run_dir.adopt_config(r.workdir, r.fingerprint, r.base_cfg, r.dcfg, cfg,
                         rewrite_pair=bool(r.config_change))
  rows = tcfg.batch_size // jax.process_count()
  r.evaluator = eval_lib.make_evaluator(r.base_cfg, r.dcfg, tcfg, r.eval_batches, r.prompts,
                                        r.stop_ids, tcfg.eval_new_tokens, r.progs.batch_sh, rows,
                                        tcfg.seq_len, train_config.eval_cost_ratio(r.cfg),
                                        prompt_images=r.prompt_images)
  r.writer = metrics_lib.MetricWriter(r.workdir, resume_step=start, enabled=r.is_main)
  _announce(r, source)
  return state


def _announce(r: _Run, source: str) -> None:
  tcfg, progs = r.tcfg, r.progs
  n_trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(progs.trainable_abs))
  n_total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(progs.params_abs))
  r.say(f"[train] {r.cfg.get('name', '?')}: {source}; {n_total:,} params ({n_trained:,} trained"
        f"{', base frozen' if tcfg.freeze_base else ''}); K={tcfg.num_draft_steps}, "
        f"lambda={tcfg.drafter_loss_weight}; {jax.device_count()} device(s), mesh "
        f"{dict(r.mesh.shape)}; steps {r.start} -> {tcfg.num_steps}, "
        f"{tcfg.batch_size * tcfg.seq_len} tokens/step; workdir {r.workdir} "
        f"(setup {time.time() - r.t_start:.0f}s)")


def _save(r: _Run, step: int, state: step_lib.TrainState) -> None:
  # The RNG is saved with the data position; nothing in the step draws from it (no dropout), so
  # the key only matters to code that adds randomness later.
  meta = {"step": step, "data": r.train_iter.get_state(), "rng": np.asarray(r.rng).tolist(),
          "tokens_per_step": r.tcfg.batch_size * r.tcfg.seq_len}
  r.manager.save(step, args=checkpoint.save_args(step_lib.join_vars(state.params, r.buffers),
                                                 state.opt_state, meta), force=True)


def _evaluate(r: _Run, step: int, state: step_lib.TrainState) -> dict:
  """Runs the evaluator, writes its record and prints the "[eval]" line."""
  t0 = time.time()
  m, conts = r.evaluator(state.params, r.buffers)
  m["eval_time_s"] = time.time() - t0
  r.writer.write(step, "eval", m)
  if conts and r.is_main:
    m["sample"] = r.tokenizer.decode(np.concatenate([r.prompts[0], conts[0]]))
  nan = float("nan")
  r.say(f"[eval] step {step}: base loss {_fmt(m.get('base/loss', nan))}, draft acc "
        f"{[round(m.get(f'drafter/acc_{k}', 0.0), 3) for k in range(1, r.tcfg.num_draft_steps + 1)]}"
        f"; accepted length: greedy decode {_fmt(m.get('greedy/tokens_per_round', nan))} tokens/"
        f"target forward (anchor mean {_fmt(m.get('greedy/accept/len_mean', 0.0))}), data labels "
        f"{_fmt(m.get('accept/len_mean', nan))}; expected speedup "
        f"{_fmt(m.get('greedy/expected_speedup', nan))} (c={m.get('flops_ratio', nan):.3f}); "
        f"{m['eval_time_s']:.0f}s")
  advice = eval_lib.draft_length_message(m, r.tcfg.num_draft_steps)
  if advice:
    r.say(advice)
  return m


class _StepLog:
  """Reads the metrics of the step dispatched last while the next one runs (`push`), or now
  (`flush`: before a save or an eval); stops the run on a non-finite loss; writes every
  `log_every`-th record and the progress bar's figures."""

  def __init__(self, r: _Run, bar):
    self.r, self.bar = r, bar
    self.pending = None  # (step, metrics on the device)
    self.reset_timer(r.start)

  def reset_timer(self, step: int) -> None:
    """tokens/s counts from here (after an eval, which is not training time)."""
    self.timer = (time.time(), step)

  def push(self, step: int, metrics) -> None:
    self.flush()
    self.pending = (step, metrics)

  def flush(self) -> None:
    if self.pending is not None:
      self._record(*self.pending)
      self.pending = None

  def _record(self, step: int, metrics) -> None:
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
      self._stop_non_finite(step, m)
    post = dict(loss=f"{m['loss']:.3f}", base=f"{m['base/loss']:.3f}",
                d1=f"{m.get('drafter/acc_1', 0):.2f}")
    if "router/expert_tokens_max" in m:  # MoE: the least / most loaded expert's (token, expert) pairs
      post["experts"] = f"{m['router/expert_tokens_min']:.0f}-{m['router/expert_tokens_max']:.0f}"
    tcfg = self.r.tcfg
    if step % tcfg.log_every == 0 or step == tcfg.num_steps:
      now = time.time()
      m["tokens_per_s"] = (tcfg.batch_size * tcfg.seq_len * (step - self.timer[1])
                           / max(now - self.timer[0], 1e-9))
      self.timer = (now, step)
      self.r.writer.write(step, "train", m)
      post["tok_s"] = f"{m['tokens_per_s']:.0f}"
    self.bar.set_postfix(post, refresh=False)

  def _stop_non_finite(self, step: int, m: dict) -> None:
    bad = "loss" if not math.isfinite(m["loss"]) else "grad_norm"
    raise TrainingError(f"non-finite {bad} ({m[bad]}) at step {step}: training stopped. "
                        + run_dir.keep_good_checkpoint(
                            self.r.manager, step, self.r.start, self.r.tcfg.keep_checkpoints,
                            self.r.progs.abstract_vars))


def _loop(r: _Run, state: step_lib.TrainState, stop_after: int | None) -> _LoopEnd:
  """Steps `start + 1 .. num_steps`, saving and evaluating on schedule; a signal or `stop_after`
  ends it early with a checkpoint of the last step."""
  from tqdm import tqdm
  tcfg = r.tcfg
  last_eval, status = {}, "finished"
  compiles_at_start, t_loop = compiles.total(), time.time()
  bar = tqdm(total=tcfg.num_steps, initial=r.start, disable=not r.is_main, dynamic_ncols=True,
             unit="step", desc="train")
  log = _StepLog(r, bar)
  with distributed.StopFlag() as stop:
    try:
      for step in range(r.start + 1, tcfg.num_steps + 1):
        batch = distributed.global_batch(next(r.train_iter), r.progs.batch_sh)
        state, metrics = r.progs.step(state, r.buffers, batch)
        log.push(step, metrics)
        bar.update(1)
        preempt = stop.stop() or step == stop_after
        if step % tcfg.save_every == 0 or step == tcfg.num_steps or preempt:
          log.flush()
          _save(r, step, state)
        if tcfg.eval_every and step % tcfg.eval_every == 0 and step != tcfg.num_steps:
          log.flush()
          last_eval = _evaluate(r, step, state)
          log.reset_timer(step)
        if preempt:
          status = "preempted"
          break
      log.flush()
    finally:
      bar.close()
      r.manager.wait_until_finished()
  train_time = time.time() - t_loop
  if status == "finished":  # the final eval is the loop's last program
    last_eval = _evaluate(r, int(jax.device_get(state.step)), state)
  return _LoopEnd(state=state, status=status, signum=stop.signum, last_eval=last_eval,
                  train_time_s=train_time, xla_compiles=compiles.total() - compiles_at_start)


def _finish(r: _Run, end: _LoopEnd) -> dict:
  """The summary of a preempted run, or the export, HF check, summary record and plots of a
  finished one."""
  step = int(jax.device_get(end.state.step))
  # jit's own count of the step's executables: per function (utils.compiles counts the process),
  # and 1 on a resume in the same process too, where the cached program compiles nothing.
  step_compiles = r.progs.step._cache_size()
  if end.status == "preempted":
    r.writer.close()
    r.manager.close()
    r.say(f"[train] stopped ({'signal ' + str(end.signum) if end.signum else 'stop_after'}) "
          f"after step {step}; checkpoint saved in {r.manager.directory}. Run the same command "
          "again to resume.")
    return dict(status=end.status, step=step, workdir=r.workdir, export=None, eval=end.last_eval,
                hf=None, train_step_compiles=step_compiles, wall_time_s=time.time() - r.t_start)

  if end.last_eval.get("sample"):
    r.say(f"[eval] a held-out prompt and the base's greedy continuation:\n"
          f"{end.last_eval['sample']}")
  summary = {"train_step_compiles": step_compiles, "xla_compiles": end.xla_compiles,
             "train_loop_s": end.train_time_s}
  export_dir, hf = _export(r, end, step)
  if hf is not None:
    summary.update(hf)
  summary["wall_time_s"] = time.time() - r.t_start
  r.writer.write(step, "summary", summary)
  r.writer.close()
  r.manager.close()
  if r.is_main:
    plots = metrics_lib.plot(r.workdir)
    r.say(f"[train] done in {summary['wall_time_s']:.0f}s (train loop {end.train_time_s:.0f}s): "
          f"step {step}, train step compiled {step_compiles} time(s); plots in "
          f"{os.path.dirname(plots[0])}")
    if export_dir:
      r.say(f"[train] exported pair: {export_dir}")
  return dict(status=end.status, step=step, workdir=r.workdir, export=export_dir,
              eval=end.last_eval, hf=hf, train_step_compiles=step_compiles,
              wall_time_s=summary["wall_time_s"], xla_compiles=end.xla_compiles,
              prompts=r.prompts, stop_ids=r.stop_ids)


def _export(r: _Run, end: _LoopEnd, step: int) -> tuple[str | None, dict | None]:
  """(WORKDIR/hf or None, the HF check or None): every process gathers, process 0 writes."""
  tcfg = r.tcfg
  if not tcfg.export_hf:
    return None, None
  host_vars = distributed.to_host(step_lib.join_vars(end.state.params, r.buffers))
  if not r.is_main:
    return None, None
  export_dir = export_lib.export_pair(r.workdir, r.base_cfg, r.dcfg, host_vars, step,
                                      tcfg.export_dtype or None, tcfg.num_draft_steps)
  r.say(f"[export] HF pair written: {export_dir}/base and {export_dir}/drafter")
  hf = None
  if tcfg.hf_check and r.prompts:
    t0 = time.time()
    hf = export_lib.hf_check(export_dir, r.prompts, tcfg.eval_new_tokens, r.stop_ids,
                             tcfg.num_draft_steps, end.last_eval.get("greedy/tokens_per_round"),
                             r.evaluator.last_continuations, images=r.prompt_images)
    if hf is not None:
      r.say(export_lib.hf_message(hf, time.time() - t0))
  return export_dir, hf


# ------------------------------------------------------------------------------ params sources
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


def eval_stop_ids(cfg: ml_collections.ConfigDict, workdir: str, base_cfg,
                  tokenizer) -> list[int]:
  """The tokens the greedy eval stops on: those `generate --base WORKDIR` stops on by default
  (`request.stop_ids_for`): the base's eos ids, the generation config of the run's source (as the
  workdir's pair.json recorded it; before it exists, `hf_base`'s; none for a random init) and the
  tokenizer's `<turn|>`."""
  recorded = os.path.isfile(os.path.join(workdir, checkpoint.PAIR_JSON))
  source = workdir if recorded else (cfg.hf_base or None)
  gen = request.generation_config(source) if source else None
  return request.stop_ids_for(base_cfg, tokenizer, gen)


def _fmt(v: float) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def _restore(r: _Run):
  """(step, params, buffers, opt_state, meta) of the newest checkpoint that restores intact."""
  step, variables, opt_state, meta = run_dir.restore_checkpoint(
      r.manager, r.progs.abstract_vars, r.progs.opt_abs, r.config_change, r.is_main, r.say)
  params, buffers = step_lib.split_vars(variables)
  return step, params, buffers, opt_state, meta
