"""The trainer's greedy eval measures the decoder users run: on the same prompts and the same pair,
the tokens per target forward (and the per-position acceptance, and the continuations) it reports
equal what `python -m gemma_mtp_jax.generate --json` reports, prompt by prompt, aggregated the same
way (sum of new tokens - 1 over the sum of target forwards)."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
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
    assert metrics[f"greedy/decode/alpha_{k}"] == pytest.approx(
        np.mean(rounds >= k) / np.mean(rounds >= k - 1), rel=1e-12)
  # Draft-length advice from those rates, with the c measured on this machine (no eval.cost_ratio).
  adv = evaluate.draft_length_advice([metrics[f"greedy/decode/rate_{k}"] for k in range(1, K + 1)],
                                     metrics["greedy/draft_len/measured/cost_ratio"])
  assert metrics["greedy/draft_len/best_k"] == adv["best_k"]
  assert metrics["greedy/draft_len/cost_ratio"] == evaluator.measured_cost_ratio >= 0
  assert "greedy/draft_len/config/best_k" not in metrics
  # The teacher-forced histogram scores the same continuations; its anchors include every round's.
  assert metrics["greedy/accept/anchors"] >= len(rounds)
  assert 1.0 <= metrics["greedy/accept/len_mean"] <= K + 1
  c = flops.flops_ratio(base_cfg, pair.drafter_cfg)
  assert metrics["flops_ratio"] == c
  assert metrics["greedy/expected_speedup"] == pytest.approx(
      metrics["greedy/tokens_per_round"] / (K * c + 1))


# ------------------------------------------------------------------------------ stop ids
def test_eval_stops_where_generate_stops(dirs, capsys, tmp_path, monkeypatch):
  """A base whose generation_config.json lists more eos ids than its config.json (as Google's
  releases do: [1, 106, 50] there, 1 in config.json): the trainer's eval stops on exactly the ids
  `generate` stops on by default, for an `hf_base` run before its workdir exists (read from the HF
  dir) and after (its pair.json's record), and `generate` on the converted pair dir agrees."""
  from gemma_mtp_jax.data import tokenizer as tokenizer_lib
  from gemma_mtp_jax.decoding import request
  from gemma_mtp_jax.training import loop

  hf = str(tmp_path / "base")
  shutil.copytree(dirs["base"], hf)
  gen_path = os.path.join(hf, "generation_config.json")
  with open(gen_path) as f:
    gen = json.load(f)
  with open(gen_path, "w") as f:
    json.dump(dict(gen, eos_token_id=[1, 106, 50]), f)
  with open(os.path.join(hf, "config.json")) as f:
    assert json.load(f)["eos_token_id"] in (1, [1])  # 50 and 106 come from the generation config
  tok = tokenizer_lib.load_tokenizer(hf)
  turn = tok.convert_tokens_to_ids(tokenizer_lib.TURN_CLOSE)
  want = sorted({1, 50, 106, turn})
  # The eval test's request (its compiled programs), default stops.
  argv = ("--drafter", dirs["drafter"], "--prompt-ids", ",".join(map(str, PROMPTS[0])),
          "--max-new-tokens", NUM_NEW, "--num-draft-tokens", K)
  assert _json(capsys, "--base", hf, *argv)["stop_ids"] == want
  pair_dir = checkpoint.hf_to_jax(hf, str(tmp_path / "pair"))
  assert _json(capsys, "--base", pair_dir, *argv)["stop_ids"] == want

  pair = checkpoint.load_pair(hf)
  cfg = ml_collections.ConfigDict({"hf_base": hf})
  fresh = str(tmp_path / "fresh_run")
  assert loop.eval_stop_ids(cfg, fresh, pair.base_cfg, tok) == want
  workdir = checkpoint.init_workdir(str(tmp_path / "run"), pair)
  moved = ml_collections.ConfigDict({"hf_base": str(tmp_path / "moved_away")})
  assert loop.eval_stop_ids(moved, workdir, pair.base_cfg, tok) == want  # the workdir's record
  # A hub id: its generation_config.json alone is fetched (here: served from the local copy).
  import huggingface_hub
  fetched = []
  monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                      lambda repo, name: fetched.append((repo, name)) or gen_path)
  hub = ml_collections.ConfigDict({"hf_base": "someorg/tiny-gemma"})
  assert loop.eval_stop_ids(hub, fresh, pair.base_cfg, tok) == want
  assert fetched == [("someorg/tiny-gemma", "generation_config.json")]
  # A random-init run: no generation config, the base's eos and the end of a turn.
  scratch = ml_collections.ConfigDict({"hf_base": ""})
  assert loop.eval_stop_ids(scratch, fresh, pair.base_cfg, tok) == sorted({1, turn})
  assert request.stop_ids_for(pair.base_cfg, tok) == sorted({1, turn})


# ------------------------------------------------------------------------------ draft length
def test_per_position_rates_and_best_k_from_round_counts():
  """Synthetic per-round accepted counts (K = 3): the rates, alpha and the advice by hand."""
  from gemma_mtp_jax.decoding import speculative
  acc = speculative.acceptance_rates([0, 1, 1, 2, 3, 3, 3, 0], 3)
  assert acc["rate"] == pytest.approx([6 / 8, 4 / 8, 3 / 8])
  assert acc["alpha"] == pytest.approx([0.75, 0.5 / 0.75, 0.375 / 0.5])
  adv = evaluate.draft_length_advice(acc["rate"], 0.2)
  assert adv["expected_tokens"] == pytest.approx([1.0, 1.75, 2.25, 2.625])
  assert adv["speedup"] == pytest.approx([1.0, 1.75 / 1.2, 2.25 / 1.4, 2.625 / 1.6])
  assert adv["best_k"] == 3
  assert evaluate.draft_length_advice(acc["rate"], 0.5)["best_k"] == 1  # 1.75 / 1.5 = 1.167 best
  assert evaluate.draft_length_advice(acc["rate"], 1.0)["best_k"] == 0  # drafting never pays
  assert speculative.acceptance_rates([], 2) == {"rate": [0.0, 0.0], "alpha": [0.0, 0.0]}


@dataclasses.dataclass(frozen=True)
class FixedOracle:
  """Drafts the base's greedy continuation `aux["ref"]` with draft m + 1 corrupted: every round
  accepts exactly m (m = K: all)."""
  vocab: int
  m: int

  def __call__(self, aux, params, cfg, state, k, sampling, rng):
    idx_BA = state.num_out_B[:, None] + jnp.arange(k)  # ref[num_out - 1] is state.token_B
    d_BA = jnp.take_along_axis(aux["ref"], idx_BA, axis=1)
    return jnp.where(jnp.arange(k) == self.m, (d_BA + 1) % self.vocab, d_BA), None


def test_oracle_drafter_rates_and_best_k():
  """Through the decoder and the eval's aggregation: an oracle accepting exactly 2 of K = 3 drafts
  every round has rates [1, 1, 0], E(K') = 1, 2, 3, 3, and best K' = 2 at c = 0.1 and 0.6
  (3 / 1.2 = 2.5 > 3 / 1.3; 3 / 2.2 = 1.36 > 2 / 1.6 = 1.25) but 0 at c = 1.5."""
  from gemma_mtp_jax.decoding import speculative
  from tests.test_speculative import _configs, _prompts, _random_base
  base, _ = _configs()
  params = _random_base(base)
  prompts = _prompts(np.random.default_rng(0), base.vocab_size, [5, 9])
  n, k = 13, 3
  plain = speculative.decode_prompts(params, base, prompts, max_new_tokens=n + k + 1)
  ref = jnp.asarray(np.asarray(plain.tokens, np.int32))
  res = speculative.decode_prompts(params, base, prompts, max_new_tokens=n, num_draft_tokens=k,
                                   propose=FixedOracle(base.vocab_size, 2), aux={"ref": ref})
  assert [t for t in res.tokens] == [t[:n] for t in plain.tokens]
  m = evaluate.decode_metrics([(res, 2)], k)
  assert [m[f"eval/greedy/decode/rate_{j}"] for j in (1, 2, 3)] == [1.0, 1.0, 0.0]
  assert [m[f"eval/greedy/decode/alpha_{j}"] for j in (1, 2, 3)] == [1.0, 1.0, 0.0]
  rates = [1.0, 1.0, 0.0]
  adv = evaluate.advice_metrics(rates, measured=0.1, configured=0.6)
  p = "eval/greedy/draft_len/"
  assert [adv[p + f"expected_tokens_{j}"] for j in (1, 2, 3)] == [2.0, 3.0, 3.0]
  assert adv[p + "measured/best_k"] == 2 and adv[p + "config/best_k"] == 2
  assert adv[p + "best_k"] == 2 and adv[p + "cost_ratio"] == 0.6
  assert adv[p + "best_speedup"] == pytest.approx(3 / 2.2)
  assert adv[p + "config/speedup_3"] == pytest.approx(3 / 2.8)
  assert evaluate.advice_metrics(rates, measured=1.5)[p + "best_k"] == 0
  # The [eval] line names the best K' and the c it used.
  line = evaluate.draft_length_message({k[len("eval/"):]: v for k, v in {**m, **adv}.items()}, k)
  assert "best K' = 2 (1.36x)" in line and "c = 0.600 (eval.cost_ratio)" in line


def test_measured_cost_ratio_is_a_nonnegative_number():
  from tests.test_speculative import _configs, _random_base, _random_drafter
  base, dcfg = _configs()
  pair = dict(base_params=_random_base(base), base_cfg=base, drafter_vars=_random_drafter(dcfg),
              drafter_cfg=dcfg)
  c = evaluate.measure_cost_ratio(pair, [3, 4, 5, 6], 2, 8)
  assert np.isfinite(c) and c >= 0


def test_eval_section_cost_ratio_config():
  """`eval.cost_ratio` is in every preset (0: measured), validated, and a typo names the key."""
  from gemma_mtp_jax import presets
  from gemma_mtp_jax.model.config import ConfigError
  from gemma_mtp_jax.training import config as train_config
  cfg = presets.load_config("tiny")
  assert cfg.eval.cost_ratio == 0.0
  train_config.validate_config(cfg)
  cfg.eval.cost_ratio = 0.25  # as --config.eval.cost_ratio=0.25 sets it
  train_config.validate_config(cfg)
  assert train_config.eval_cost_ratio(cfg) == 0.25
  cfg.eval.cost_ratio = -1.0
  with pytest.raises(ConfigError, match="eval.cost_ratio"):
    train_config.validate_config(cfg)
  bad = presets.load_config("tiny")
  bad.eval = {"cost_ratoi": 0.1}
  with pytest.raises(ConfigError, match="unknown config key 'eval.cost_ratoi'.*cost_ratio"):
    train_config.validate_config(bad)
  msg = train_config.explain_override_error(
      ["train", "--config.eval.cost_ratoi=0.1"], KeyError("cost_ratoi"))
  assert "eval.cost_ratio" in msg
  # Configs written before the section (a resumed workdir's config.json) mean "measured".
  old = presets.load_config("tiny")
  del old["eval"]
  assert train_config.eval_cost_ratio(old) == 0.0


def test_held_out_prompts_carry_their_images():
  """A packed row with two documents: the first holds image block 0 in its prompt, the second
  image block 1 in its prompt; each prompt gets exactly its own slot (pixels and positions), a
  text-only row gets None, and the greedy rows put a prompt's images back in its row's slots."""
  img = 9
  tokens = np.array([[2, 5, img, img, 6, 7, 8, 2, 5, img, img, img, 6, 7, 8, 0],
                     [2, 7, 7, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], np.int32)
  seg = np.array([[1] * 7 + [2] * 8 + [0], [1] * 5 + [0] * 11], np.int32)
  lm = np.zeros_like(tokens, bool)
  lm[0, [6, 14]] = True  # the model turn's first token of each document
  lm[1, 3] = True
  pv = np.zeros((2, 3, 8, 12), np.float32)
  pos = np.full((2, 3, 8, 2), -1, np.int32)
  pv[0, 0], pos[0, 0, :4] = 1.0, 0  # slot 0: 4 real patches
  pv[0, 1], pos[0, 1, :8] = 2.0, 0  # slot 1: 8 real patches
  batch = dict(tokens=tokens, segment_ids=seg, loss_mask=lm, pixel_values=pv, pixel_positions=pos)
  prompts, images = evaluate.prompts_from_batches([batch], 8, 16, image_token_id=img)
  assert [p.tolist() for p in prompts] == [[2, 5, img, img, 6, 7], [2, 5, img, img, img, 6, 7],
                                           [2, 7, 7]]
  assert images[2] is None
  (pv0, pos0), (pv1, pos1) = images[0], images[1]
  assert pv0.shape == (1, 8, 12) and float(pv0.max()) == 1.0 and (pos0[0, :4] == 0).all()
  assert pv1.shape == (1, 8, 12) and float(pv1.min()) == 2.0
  g = evaluate.build_greedy_batch(prompts, [np.array([8]), np.array([8]), np.array([8])], 16,
                                  images, slots=(3, 8, 12))
  assert g.batch["pixel_values"].shape == (3, 3, 8, 12)
  assert float(g.batch["pixel_values"][1, 0].min()) == 2.0 and not g.batch["pixel_values"][2].any()
  assert (g.batch["pixel_positions"][0, 1:] == -1).all()
  # Text-only batches: no images asked, none returned.
  text = {k: v for k, v in batch.items() if not k.startswith("pixel")}
  assert evaluate.prompts_from_batches([text], 8, 16, image_token_id=img)[1] == [None] * 3
