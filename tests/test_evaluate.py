"""The trainer's greedy eval measures the decoder users run: on the same prompts and the same pair,
the tokens per target forward (and the per-position acceptance, and the continuations) it reports
equal what `python -m gemma_mtp_jax.generate --json` reports, prompt by prompt, aggregated the same
way (sum of new tokens - 1 over the sum of target forwards)."""

import os
import shutil

import jax
import numpy as np
import pytest

from gemma_mtp_jax.checkpoint import pair as checkpoint
from gemma_mtp_jax.model import flops
from gemma_mtp_jax.model import transformer
from gemma_mtp_jax.training import evaluate
from gemma_mtp_jax.training import objective as joint
from gemma_mtp_jax.training.config import TrainConfig
from tests.test_generate_cli import _assistant_kv_sharing, _json, dirs  # noqa: F401 (fixtures)

PROMPTS = [[2, 17, 60, 121, 9, 250], [5, 6, 7], [300, 12, 44, 90, 31, 8, 77, 3, 11], [40, 41],
           [99, 98, 97, 96, 95]]
K, NUM_NEW, STOP = 3, 16, [1, 7]


@pytest.fixture(scope="module")
def copy_pair(dirs, tmp_path_factory):
  """The converted pair with a drafter that proposes its input token again: the tiny random base's
  greedy continuations repeat tokens, so drafts are accepted often, not never (as with a random
  drafter). Its layers add nothing (o and down projections zero), the pre-projection passes the
  first D dims of the token's base embedding, the tied head is those dims of the base's table, and
  each centroid is the sum of its tokens' rows (the input token's cluster usually ranks top-k)."""
  pair = checkpoint.load_pair(dirs["pair"])
  variables = jax.tree.map(np.asarray, pair.params["drafter"])
  p = variables["params"]
  d = p["embedding"].shape[1]
  table_VD = np.asarray(pair.params["base"]["embedding"], np.float32)[:, :d]
  p["embedding"] = table_VD.astype(p["embedding"].dtype)
  p["pre_projection"] = np.zeros_like(p["pre_projection"])
  p["pre_projection"][:d] = np.eye(d)
  p["final_norm"]["scale"] = np.ones_like(p["final_norm"]["scale"])
  for name, layer in p.items():
    if name.startswith("layer_"):
      layer["attn"]["o"] = np.zeros_like(layer["attn"]["o"])
      layer["mlp"]["down"] = np.zeros_like(layer["mlp"]["down"])
      layer["layer_scalar"] = np.ones_like(layer["layer_scalar"])
  clusters_V = np.asarray(joint.token_clusters(variables["buffers"], pair.drafter_cfg))
  cent_DC = np.stack([table_VD[clusters_V == c].sum(0) for c in range(p["centroids"].shape[1])], 1)
  p["centroids"] = cent_DC.astype(p["centroids"].dtype)
  out = str(tmp_path_factory.mktemp("copy") / "pair")
  shutil.copytree(dirs["pair"], out, ignore=shutil.ignore_patterns(checkpoint.PARAMS_DIR))
  checkpoint.save_params(os.path.join(out, checkpoint.PARAMS_DIR),
                         {"base": pair.params["base"], "drafter": variables})
  return out


def _cli(path, capsys, prompt):
  return _json(capsys, "--base", path, "--prompt-ids", ",".join(map(str, prompt)),
               "--max-new-tokens", NUM_NEW, "--num-draft-tokens", K, "--stop-ids",
               ",".join(map(str, STOP)))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_eval_accepted_length_equals_generate_json(copy_pair, capsys, scan_layers):
  runs = [_cli(copy_pair, capsys, p) for p in PROMPTS]
  want = sum(len(r["tokens"]) - 1 for r in runs) / sum(r["target_forwards"] for r in runs)
  rounds = np.asarray([rd["accepted"] for r in runs for rd in r["rounds"]])

  # The pair as the trainer holds it: {"base", "drafter"} params, buffers apart, and (scan_layers)
  # the base in the stacked layout.
  pair = checkpoint.load_pair(copy_pair)
  base_cfg, base_params = pair.base_cfg, pair.params["base"]
  if scan_layers:
    base_cfg = base_cfg.replace(scan_layers=True)
    base_params = transformer.stack_layer_params(base_cfg, base_params)
  params = {"base": base_params, "drafter": pair.params["drafter"]["params"]}
  buffers = pair.params["drafter"].get("buffers")
  jcfg = TrainConfig(num_draft_steps=K)
  # 3 rows for 5 prompts: two decode batches, the second padded with a repeated prompt.
  evaluator = evaluate.make_evaluator(base_cfg, pair.drafter_cfg, jcfg, [], PROMPTS, STOP, NUM_NEW,
                                      None, rows=3, length=32)
  metrics, conts = evaluator(params, buffers)

  print(f"tokens per target forward: eval {metrics['greedy/tokens_per_round']:.4f}, "
        f"generate --json {want:.4f}")
  assert want > 1.0  # the drafter's drafts are accepted sometimes: the figure is not trivial
  assert metrics["greedy/tokens_per_round"] == pytest.approx(want, rel=1e-12)
  assert metrics["greedy/rounds"] == sum(r["target_forwards"] for r in runs)
  assert [c.tolist() for c in conts] == [r["tokens"] for r in runs]
  assert evaluator.last_continuations is conts
  for k in range(1, K + 1):
    assert metrics[f"greedy/decode/rate_{k}"] == pytest.approx(np.mean(rounds >= k), rel=1e-12)
  # The teacher-forced histogram scores the same continuations; its anchors include every round's.
  assert metrics["greedy/accept/anchors"] >= len(rounds)
  assert 1.0 <= metrics["greedy/accept/len_mean"] <= K + 1
  c = flops.flops_ratio(base_cfg, pair.drafter_cfg)
  assert metrics["flops_ratio"] == c
  assert metrics["greedy/expected_speedup"] == pytest.approx(
      metrics["greedy/tokens_per_round"] / (K * c + 1))
