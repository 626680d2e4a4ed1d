"""Training records: `metrics.jsonl`, TensorBoard event files, and PNG plots at the end.

Every record is one JSON line `{"step": s, "kind": "train" | "eval" | "summary", <name>: value, ...}`
in WORKDIR/metrics.jsonl, and the same scalars go to TensorBoard (WORKDIR/tensorboard, tag
"<kind>/<name>"). A resumed run first drops the records past the step it resumed from (they belong
to steps it is about to redo) and tells TensorBoard to purge them too, so a run interrupted and
resumed leaves exactly the records of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"


def _plain(v: Any) -> Any:
  """JSON-able Python scalars (numpy / jax scalars included); non-finite floats stay as floats."""
  if hasattr(v, "item") and getattr(v, "size", 1) == 1:
    v = v.item()
  if isinstance(v, bool):
    return v
  if isinstance(v, (int, float, str)) or v is None:
    return v
  return float(v)


def read_records(workdir: str) -> list[dict]:
  """Every record of WORKDIR/metrics.jsonl, in order (a torn last line from a kill is skipped)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


class MetricWriter:
  """Appends records to metrics.jsonl and TensorBoard; a no-op on processes other than 0.

  Args:
    workdir: where metrics.jsonl and tensorboard/ live.
    resume_step: the step a resumed run restarts from; records with step > resume_step are dropped.
    enabled: False on non-zero processes (only process 0 writes).
  """

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILE)
    kept = [r for r in read_records(workdir) if r.get("step", 0) <= resume_step]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for r in kept:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, self.path)
    self._file = open(self.path, "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter
      # purge_step: TensorBoard hides events at or past it written by an interrupted earlier run.
      self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                               purge_step=resume_step + 1 if resume_step else None)
    except ImportError:  # TensorBoard files are a convenience; metrics.jsonl is the record
      self._tb = None

  def write(self, step: int, kind: str, metrics: Mapping[str, Any]) -> dict:
    """Writes one record; returns it (plain Python values)."""
    record = {"step": int(step), "kind": kind}
    record.update({k: _plain(v) for k, v in metrics.items()})
    if not self.enabled:
      return record
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f"{kind}/{k}", v, int(step))
    return record

  def flush(self) -> None:
    if self.enabled and self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


# ------------------------------------------------------------------------------ plots
def _series(records: Iterable[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
  xs, ys = [], []
  for r in records:
    v = r.get(key)
    if r.get("kind") == kind and isinstance(v, (int, float)) and math.isfinite(v):
      xs.append(r["step"])
      ys.append(v)
  return xs, ys


def _draft_steps(records: list[dict], prefix: str) -> list[int]:
  ks = set()
  for r in records:
    for k in r:
      if k.startswith(prefix) and k[len(prefix):].isdigit():
        ks.add(int(k[len(prefix):]))
  return sorted(ks)


def plot(workdir: str, records: list[dict] | None = None) -> list[str]:
  """Writes WORKDIR/plots/{losses,acceptance,accepted_length}.png; returns their paths."""
  import matplotlib
  matplotlib.use("Agg")  # files only: no display on a TPU VM or in CI
  import matplotlib.pyplot as plt

  records = read_records(workdir) if records is None else records
  out_dir = os.path.join(workdir, PLOTS_DIR)
  os.makedirs(out_dir, exist_ok=True)
  paths = []

  # Losses: train (solid) and eval (markers), base and each draft step.
  fig, ax = plt.subplots(figsize=(8, 5))
  for key, label in [("base/loss", "base")] + [
      (f"drafter/loss_{k}", f"draft step {k}") for k in _draft_steps(records, "drafter/loss_")]:
    line = None
    xs, ys = _series(records, "train", key)
    if xs:
      (line,) = ax.plot(xs, ys, label=f"train {label}", alpha=0.8)
    xs, ys = _series(records, "eval", key)
    if xs:
      ax.plot(xs, ys, "o--", label=f"eval {label}", color=line.get_color() if line else None)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats)")
  ax.set_title("losses")
  paths.append(_save(plt, fig, ax, os.path.join(out_dir, "losses.png")))

  # Per-step acceptance: P(accepted >= k) at the last eval, greedy continuations and data labels,
  # next to each draft step's top-1 accuracy.
  evals = [r for r in records if r.get("kind") == "eval"]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  if evals:
    last = evals[-1]
    for prefix, label in (("greedy/accept/rate_", "greedy: P(accepted >= k)"),
                          ("accept/rate_", "data: P(accepted >= k)"),
                          ("drafter/acc_", "data: top-1 accuracy of step k")):
      ks = _draft_steps([last], prefix)
      if ks:
        ax.plot(ks, [last[f"{prefix}{k}"] for k in ks], "o-", label=label)
    ax.set_title(f"per-step acceptance at step {last['step']}")
  ax.set_xlabel("draft step k")
  ax.set_ylim(0, 1)
  paths.append(_save(plt, fig, ax, os.path.join(out_dir, "acceptance.png")))

  # Accepted length (tokens per target forward) over training.
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for key, label in (("greedy/tokens_per_round", "greedy decode: tokens / target forward"),
                     ("greedy/accept/len_mean", "greedy: 1 + accepted, mean over anchors"),
                     ("accept/len_mean", "data labels: 1 + accepted, mean over anchors")):
    xs, ys = _series(records, "eval", key)
    if xs:
      ax.plot(xs, ys, "o-", label=label)
  hf = [r for r in records if r.get("kind") == "summary" and "hf/tokens_per_round" in r]
  if hf:
    ax.plot([hf[-1]["step"]], [hf[-1]["hf/tokens_per_round"]], "k*", markersize=12,
            label="HF assisted generation")
  ax.set_xlabel("step")
  ax.set_ylabel("tokens per target forward")
  ax.set_title("accepted length")
  paths.append(_save(plt, fig, ax, os.path.join(out_dir, "accepted_length.png")))
  return paths


def _save(plt, fig, ax, path: str) -> str:
  """Grid, legend, PNG at `path`; closes the figure and returns the path."""
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path
