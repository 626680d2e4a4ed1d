"""Drafter-objective ablation (issue #16): every registered `train.drafter_objective`.

  python -m benchmarks objective [--config tiny] [--steps N] [--finetune-steps N]
                                 [--finetune-lr LR] [--eval-prompts N] [--workdir DIR] [--json]

1. From scratch: the preset's run (configs/tiny.py by default: same data, seed and steps) once per
   objective registered in `training/objectives.py` ("aligned", "nemo_composite", ...). Each run
   is the trainer's own (`training.loop.run`, eval only at the end, the HF export and its check
   on): HF assisted generation's tokens per target forward on the held-out eval prompts
   (`training.export.hf_check`: transformers' `generate(assistant_model=...)` on the exported
   pair), the trainer's greedy accepted length (tokens per target forward of the shipped
   decoder) and its per-step draft accuracy (teacher-forced on the held-out batches; the eval
   always scores the task drafting meets, whatever objective trained the drafter).
2. Fine-tuning, NeMo's use case: from the inference-aligned ("aligned") run's exported pair
   (standing in for Google's released drafter: `hf_base` / `hf_drafter`), `--finetune-steps`
   more steps at lambda = 0.01 with each objective; how much of the starting HF acceptance each
   keeps.

`--steps 100 --finetune-steps 30 --eval-prompts 12` runs in a few minutes on a quiet 2-core CPU (the
HF check, torch assisted generation at batch 1, dominates a short run); the default is the preset's
full run (600 steps, 48 prompts). Every run writes under --workdir (removed and rewritten per run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time


def _args(argv):
  p = argparse.ArgumentParser(prog="benchmark objective", description=__doc__.splitlines()[0])
  p.add_argument("--config", default="tiny", help="preset name or configs/X.py")
  p.add_argument("--steps", type=int, default=0, help="steps from scratch (0: the preset's)")
  p.add_argument("--finetune-steps", type=int, default=-1,
                 help="fine-tuning steps (-1: as many as --steps; 0: skip part 2)")
  p.add_argument("--finetune-lr", type=float, default=0.0,
                 help="fine-tuning peak learning rate (0: the preset's / 10)")
  p.add_argument("--eval-prompts", type=int, default=0,
                 help="held-out prompts of the greedy eval and the HF check (0: the preset's)")
  p.add_argument("--workdir", default="/tmp/gemma_mtp_objective_bench")
  p.add_argument("--json", action="store_true", help="print the results as one JSON object too")
  return p.parse_args(argv)


def _run(cfg, workdir: str) -> dict:
  """One trainer run in a fresh `workdir`; its end-of-run figures."""
  from gemma_mtp_jax.training import loop

  if os.path.isdir(workdir):  # a leftover would be resumed, not rerun
    shutil.rmtree(workdir)
  t0 = time.time()
  out = loop.run(cfg, workdir)
  if out["status"] != "finished":  # a signal stops the trainer gracefully: stop here too
    raise SystemExit(f"benchmark objective: the run in {workdir} was {out['status']}; stopping")
  ev, hf = out["eval"], out["hf"] or {}
  k = cfg.train.num_draft_steps
  return {"hf_tokens_per_forward": hf.get("hf/tokens_per_round", float("nan")),
          "greedy_tokens_per_forward": ev.get("greedy/tokens_per_round", float("nan")),
          "draft_acc": [ev.get(f"drafter/acc_{j}", float("nan")) for j in range(1, k + 1)],
          "base_loss": ev.get("base/loss", float("nan")),
          "best_k": ev.get("greedy/draft_len/best_k"), "export": out["export"],
          "wall_s": time.time() - t0}


def _record(res: dict, workdir: str, name: str, r: dict) -> None:
  """Prints one run's row as soon as it is done and keeps WORKDIR/results.json current, so a
  long benchmark's finished runs are not lost if a later one fails."""
  print(_row(name, r), flush=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(res, f, indent=1)


def _config(a, objective: str, steps: int):
  from gemma_mtp_jax import presets

  cfg = presets.load_config(a.config)
  cfg.train.drafter_objective = objective
  if steps:
    cfg.train.num_steps = steps
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(steps // 10, 1))
  if a.eval_prompts:
    cfg.train.eval_prompts = a.eval_prompts
  cfg.train.eval_every = 0  # only the final eval: the figures compared
  cfg.train.save_every = cfg.train.num_steps
  cfg.train.export_hf = True
  cfg.train.hf_check = True
  return cfg


def _row(name: str, r: dict) -> str:
  acc = " ".join(f"{x:.3f}" for x in r["draft_acc"])
  return (f"  {name:<28} {r['hf_tokens_per_forward']:>8.3f} {r['greedy_tokens_per_forward']:>8.3f}"
          f"   [{acc}]   {r['base_loss']:.3f}")


def bench_objective(argv) -> dict:
  """Runs the ablation; prints the table (and JSON with --json); returns the results."""
  from gemma_mtp_jax.training import objectives

  a = _args(argv)
  res = {"config": a.config, "aligned": objectives.INFERENCE_ALIGNED, "scratch": {},
         "finetune": {}}
  for obj in objectives.names():
    cfg = _config(a, obj, a.steps)
    res["steps"] = cfg.train.num_steps
    res["scratch"][obj] = _run(cfg, os.path.join(a.workdir, f"scratch_{obj}"))
    _record(res, a.workdir, f"scratch {obj} ({res['steps']})", res["scratch"][obj])
  start = res["scratch"][res["aligned"]]
  ft_steps = res["steps"] if a.finetune_steps < 0 else a.finetune_steps
  if ft_steps and start["export"]:
    for obj in objectives.names():
      cfg = _config(a, obj, ft_steps)
      cfg.hf_base = os.path.join(start["export"], "base")
      cfg.hf_drafter = os.path.join(start["export"], "drafter")
      cfg.train.drafter_loss_weight = 0.01
      cfg.train.learning_rate = a.finetune_lr or cfg.train.learning_rate / 10
      cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(ft_steps // 10, 1))
      r = _run(cfg, os.path.join(a.workdir, f"finetune_{obj}"))
      r["kept"] = r["hf_tokens_per_forward"] / start["hf_tokens_per_forward"]
      res["finetune"][obj] = r
      res["finetune_steps"], res["finetune_lr"] = ft_steps, cfg.train.learning_rate
      _record(res, a.workdir, f"finetune {obj} (+{ft_steps})", r)
  # HF tokens per target forward of the inference-aligned objective over each other's.
  res["aligned_over_hf"] = {obj: start["hf_tokens_per_forward"] / r["hf_tokens_per_forward"]
                            for obj, r in res["scratch"].items() if obj != res["aligned"]}
  _print(res)
  if a.json:
    print(json.dumps(res))
  return res


def _print(res: dict) -> None:
  print(f"\ndrafter objective ablation (config {res['config']}): tokens per target forward "
        f"(HF assisted generation, the trainer's greedy decoder), teacher-forced draft accuracy "
        f"per step, base loss")
  print(f"  {'run':<28} {'HF':>8} {'greedy':>8}   draft acc per step   base loss")
  for obj, r in res["scratch"].items():
    print(_row(f"scratch {obj} ({res['steps']})", r))
  for obj, ratio in res["aligned_over_hf"].items():
    print(f"  {res['aligned']} / {obj} (HF, from scratch): {ratio:.2f}x")
  for obj, r in res["finetune"].items():
    print(_row(f"finetune {obj} (+{res['finetune_steps']})", r)
          + f"   keeps {100 * r['kept']:.0f}% of the start's HF acceptance")
