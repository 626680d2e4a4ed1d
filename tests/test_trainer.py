"""The joint trainer (`gemma_mtp_jax.training.loop`): resume, preemption, frozen base, failures, export.

Everything runs on a pair far smaller than the tiny preset (2-layer base of width 32, 2-layer
drafter) with the tiny preset's schema, on small local jsonl files and a 384-token tokenizer trained
on them, so each run is seconds. The specs pinned here:
  * N steps + restart + N steps == 2N straight: params, optimizer state and every logged loss,
    bit for bit; the train step compiles once per run;
  * a pair loaded from HF dirs (the real presets' path) trains; drafter-only mode leaves its base
    bit-identical and gives it no optimizer state;
  * a non-finite loss stops the run naming the step and keeps the last good checkpoint;
  * gradient accumulation equals one big batch;
  * a missing or empty data file is one clear error naming it;
  * the export loads in HF and assisted generation with it accepts what the trainer predicted.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.checkpoint import pair as checkpoint
from gemma_mtp_jax.model import config as mc
from gemma_mtp_jax.data import pipeline as data
from gemma_mtp_jax.training import evaluate as eval_lib
from gemma_mtp_jax.training import metrics
from gemma_mtp_jax import presets
from gemma_mtp_jax import sharding
from gemma_mtp_jax.data import tokenizer as tokenizer_lib
from gemma_mtp_jax.training import config as train_config
from gemma_mtp_jax.training import export
from gemma_mtp_jax.training import loop as trainer
from gemma_mtp_jax.training import optimizer
from gemma_mtp_jax.training import run_dir
from gemma_mtp_jax.training import step as step_lib

VOCAB = 384  # 264 special / byte pieces + merges; divisible by the drafter's 16 centroids
S, F = mc.SLIDING, mc.FULL


# ------------------------------------------------------------------------------ fixtures
def write_assets(root: str) -> dict:
  """chat.jsonl (messages), code.jsonl (problem/solution) and a tokenizer trained on them."""
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  words = "add sub value key list item total count name table index shard step".split()
  chats, code = [], []
  for i in range(160):
    a, b = (int(x) for x in rng.integers(0, 50, 2))
    w = rng.choice(words, 3)
    messages = [dict(role="user", content=f"What is {a} plus {b} for the {w[0]} {w[1]}?"),
                dict(role="assistant", content=f"The {w[0]} {w[1]} is {a} plus {b}, so {a + b}.")]
    if i % 4 == 0:
      messages.insert(0, dict(role="system", content="Answer with the sum."))
    chats.append(dict(messages=messages))
  for i in range(80):
    w = rng.choice(words, 2)
    code.append(dict(problem=f"Write {w[0]}_{w[1]}(x) returning x + {i}.",
                     solution=f"def {w[0]}_{w[1]}(x):\n    return x + {i}\n"))
  paths = {}
  for name, rows in (("chat", chats), ("code", code)):
    paths[name] = os.path.join(root, f"{name}.jsonl")
    with open(paths[name], "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  texts = list(data.corpus_texts(paths.values()))
  paths["tokenizer"] = os.path.join(root, "tok")
  tokenizer_lib.build_tiny_tokenizer(texts, paths["tokenizer"], vocab_size=VOCAB)
  return paths


def small_config(assets: dict, **train):
  """The tiny preset's schema with a much smaller pair and these data files."""
  cfg = presets.load_config("tiny")
  cfg.model.update(dict(vocab_size=VOCAB, embed_dim=32, num_layers=3, num_heads=2, num_kv_heads=1,
                        head_dim=16, global_head_dim=16, hidden_dim=64, layer_types=(S, F, F),
                        sliding_window=8, ple_dim=4, ple_vocab_size=VOCAB, num_kv_shared_layers=1,
                        max_position_embeddings=256))
  cfg.drafter.text.update(dict(vocab_size=VOCAB, embed_dim=16, num_layers=2, num_heads=2,
                               num_kv_heads=1, head_dim=16, global_head_dim=16, hidden_dim=32,
                               layer_types=(S, F), sliding_window=8, num_kv_shared_layers=2,
                               max_position_embeddings=256))
  cfg.drafter.update(dict(backbone_hidden_size=32, num_centroids=16,
                          centroid_intermediate_top_k=4))
  cfg.data.sources = [dict(name="chat", path=assets["chat"], weight=0.8, schema="messages"),
                      dict(name="code", path=assets["code"], weight=0.2, schema="problem_solution")]
  cfg.data.tokenizer = assets["tokenizer"]
  cfg.data.eval_fraction = 0.1
  cfg.data.eval_max_batches = 1
  cfg.train.update(dict(seq_len=48, batch_size=4, num_steps=4, learning_rate=1e-2, warmup_steps=1,
                        log_every=1, eval_every=0, save_every=2, keep_checkpoints=5,
                        eval_prompts=2, eval_new_tokens=6, eval_max_prompt_len=40,
                        export_hf=False, hf_check=False))
  cfg.train.update(train)
  return cfg


def family_config(assets: dict, family: str, **train):
  """`small_config` of a transformers family: for the 12B's, a base without PLE or KV sharing, and
  both configs get the family's fields."""
  cfg = small_config(assets, **train)
  if family == hf_config.UNIFIED:
    fields = dict(hf_family=family, **hf_config.family_fields(family))
    cfg.model.update(dict(ple_dim=0, ple_vocab_size=0, num_kv_shared_layers=0, **fields))
    cfg.drafter.text.update(fields)
  return cfg


def export_random_pair(cfg, tokenizer: str, out: str) -> dict:
  """A random pair of `cfg` exported as HF dirs: what `hf_base` / `hf_drafter` name in real presets."""
  base_cfg, dcfg, _ = train_config.validate_config(cfg)
  variables = jax.device_get(step_lib.random_variables(base_cfg, dcfg, 7, 0.02))
  pair = run_dir.random_pair(base_cfg, dcfg, variables, tokenizer)
  pair.params = variables
  checkpoint.export_hf(pair, out)
  return {"base": os.path.join(out, "base"), "drafter": os.path.join(out, "drafter")}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return write_assets(str(tmp_path_factory.mktemp("trainer_assets")))


def _train_records(workdir):
  """Logged train metrics without the wall-clock ones."""
  return [{k: v for k, v in r.items() if k != "tokens_per_s"}
          for r in metrics.read_records(workdir) if r["kind"] == "train"]


def _saved(workdir, step=None):
  return checkpoint.load_pair(workdir, step=step).params


def _assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


# ------------------------------------------------------------------------------ resume
# Most tests share one config (one compiled train step in this process): save_every, eval and
# export settings, stop_after and the data files do not change the compiled program.
def test_resume_is_bit_identical(assets, tmp_path):
  cfg = small_config(assets, save_every=3, eval_prompts=0)
  straight = trainer.run(cfg, str(tmp_path / "straight"))
  assert straight["status"] == "finished" and straight["step"] == 4
  assert straight["train_step_compiles"] == 1

  first = trainer.run(cfg, str(tmp_path / "resumed"), stop_after=2)
  assert first["status"] == "preempted" and first["step"] == 2
  assert saved_steps(str(tmp_path / "resumed")) == [2]
  second = trainer.run(cfg, str(tmp_path / "resumed"))
  assert second["status"] == "finished" and second["step"] == 4
  assert second["train_step_compiles"] == 1

  _assert_trees_equal(_saved(str(tmp_path / "straight")), _saved(str(tmp_path / "resumed")))
  _assert_trees_equal(_opt_state(str(tmp_path / "straight"), 4),
                      _opt_state(str(tmp_path / "resumed"), 4))
  a, b = _train_records(str(tmp_path / "straight")), _train_records(str(tmp_path / "resumed"))
  assert [r["step"] for r in a] == [1, 2, 3, 4]
  assert a == b  # every logged loss, bit for bit (JSON floats round-trip float32 exactly)
  ea = [r for r in metrics.read_records(str(tmp_path / "straight")) if r["kind"] == "eval"]
  eb = [r for r in metrics.read_records(str(tmp_path / "resumed")) if r["kind"] == "eval"]
  assert ea[-1]["base/loss"] == eb[-1]["base/loss"]

  # A rerun of a finished run trains nothing and logs no train step twice.
  again = trainer.run(cfg, str(tmp_path / "resumed"))
  assert again["status"] == "finished" and again["step"] == 4
  assert [r["step"] for r in _train_records(str(tmp_path / "resumed"))] == [1, 2, 3, 4]


def test_checkpoint_dir_outlives_the_workdir(assets, tmp_path):
  """train.checkpoint_dir (gs://... on Cloud TPU) holds the checkpoints apart from the workdir: a
  preempted VM's replacement, starting from an empty workdir with the same checkpoint_dir,
  resumes there, rebuilds the workdir's pair files and exports; the losses are the straight run's.
  A remote --workdir keeps the checkpoints there and the other files in a local runs/<name>."""
  ckpt = tmp_path / "bucket" / "checkpoints"
  cfg = small_config(assets, save_every=3, eval_prompts=0, checkpoint_dir=str(ckpt))
  first = trainer.run(cfg, str(tmp_path / "vm1"), stop_after=2)
  assert first["status"] == "preempted" and sorted(os.listdir(ckpt)) == ["2"]
  cfg.train.export_hf = True
  second = trainer.run(cfg, str(tmp_path / "vm2"))
  assert second["status"] == "finished" and second["step"] == 4
  assert sorted(os.listdir(ckpt)) == ["2", "3", "4"]
  assert os.path.isfile(os.path.join(second["export"], "base", "config.json"))
  straight = trainer.run(small_config(assets, save_every=3, eval_prompts=0),
                         str(tmp_path / "straight"))
  a = _train_records(str(tmp_path / "straight"))
  assert _train_records(str(tmp_path / "vm1")) + _train_records(str(tmp_path / "vm2")) == a
  local = os.path.abspath(os.path.join("runs", "tiny"))
  assert run_dir.split_workdir("gs://b/run/", "", "tiny") == (local, "gs://b/run/checkpoints")
  assert run_dir.split_workdir("gs://b/run", "gs://c/ck", "tiny") == (local, "gs://c/ck")
  assert run_dir.split_workdir(str(tmp_path), "", "tiny") == (str(tmp_path), None)


def _opt_state(workdir, step):
  mgr = checkpoint.open_manager(workdir)
  try:
    return mgr.restore(step, args=checkpoint.ocp.args.Composite(
        opt_state=checkpoint.ocp.args.StandardRestore()))["opt_state"]
  finally:
    mgr.close()


def saved_steps(workdir):
  mgr = checkpoint.open_manager(workdir)
  try:
    return sorted(mgr.all_steps())
  finally:
    mgr.close()


# ------------------------------------------------------------------------------ HF init, frozen base
@pytest.fixture(scope="module")
def hf_pair(assets, tmp_path_factory):
  """A random small pair exported as HF dirs: what `hf_base` / `hf_drafter` name in real presets."""
  return export_random_pair(small_config(assets), assets["tokenizer"],
                            str(tmp_path_factory.mktemp("hf_pair") / "hf"))


def test_hf_init_drafter_only_leaves_the_base_bit_identical(assets, hf_pair, tmp_path):
  # The real presets' path on local files: hf_base / hf_drafter loaded by checkpoint.load_pair,
  # the base's own tokenizer, the drafter trained alone.
  cfg = small_config(assets, freeze_base=True, eval_prompts=0)
  cfg.hf_base, cfg.hf_drafter = hf_pair["base"], hf_pair["drafter"]
  cfg.data.tokenizer = hf_pair["base"]
  out = trainer.run(cfg, str(tmp_path))
  assert out["status"] == "finished"
  init = checkpoint.load_pair(hf_pair["base"], drafter=hf_pair["drafter"]).params
  saved = _saved(str(tmp_path))
  _assert_trees_equal(init["base"], saved["base"])
  changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
                         init["drafter"]["params"], saved["drafter"]["params"])
  assert all(jax.tree.leaves(changed))  # every drafter param was trained
  # No optimizer state for the base: Adam's moments hold exactly the drafter's leaves.
  opt = _opt_state(str(tmp_path), 4)
  n_moments = sum(x.size for x in jax.tree.leaves(opt) if x.ndim > 0)
  n_drafter = sum(x.size for x in jax.tree.leaves(saved["drafter"]["params"]))
  assert n_moments == 2 * n_drafter
  assert json.load(open(tmp_path / "pair.json"))["source"]["base"] == hf_pair["base"]


def test_hf_init_must_match_the_preset(assets, hf_pair, tmp_path):
  cfg = small_config(assets, eval_prompts=0)
  cfg.hf_base, cfg.hf_drafter = hf_pair["base"], hf_pair["drafter"]
  cfg.model.hidden_dim = 96
  with pytest.raises(mc.ConfigError, match=r"model config differs.*hidden_dim.*\(64, 96\)"):
    trainer.run(cfg, str(tmp_path))


# ------------------------------------------------------------------------------ failures
def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(assets, tmp_path):
  cfg = small_config(assets, save_every=1, eval_prompts=0)
  trainer.run(cfg, str(tmp_path), stop_after=1)
  # Poison Adam's first moment in checkpoint 1: step 2 still sees good params (finite loss) but
  # its update makes them NaN, so checkpoint 2 holds the params whose loss (step 3) is NaN.
  mgr = checkpoint.open_manager(str(tmp_path))
  restored = mgr.restore(1, args=checkpoint.ocp.args.Composite(
      params=checkpoint.ocp.args.StandardRestore(), opt_state=checkpoint.ocp.args.StandardRestore(),
      meta=checkpoint.ocp.args.JsonRestore()))
  opt = jax.tree.map(lambda x: np.full_like(x, np.nan) if x.ndim else x, restored["opt_state"])
  mgr.delete(1)
  mgr.save(1, args=checkpoint.save_args(dict(restored["params"]), opt, restored["meta"]))
  mgr.wait_until_finished()
  mgr.close()
  with pytest.raises(trainer.TrainingError,
                     match=r"non-finite loss \(nan\) at step 3.*Last good checkpoint: step 1"):
    trainer.run(cfg, str(tmp_path))
  assert saved_steps(str(tmp_path)) == [1]
  assert [r["step"] for r in _train_records(str(tmp_path))] == [1, 2]


@pytest.mark.parametrize("problem", ["missing", "empty"])
def test_missing_or_empty_data_file_is_one_clear_error(assets, tmp_path, problem):
  bad = tmp_path / "chat.jsonl"
  if problem == "empty":
    bad.write_text("")
  cfg = small_config(assets)
  cfg.data.sources = [dict(name="chat", path=str(bad), weight=1.0, schema="messages")]
  match = "file not found" if problem == "missing" else "is empty"
  with pytest.raises(data.DataError, match=f"{bad}.*{match}|{match}.*{bad}"):
    trainer.run(cfg, str(tmp_path / "run"))


# ------------------------------------------------------------------------------ the step itself
def test_grad_accumulation_equals_one_big_batch(assets):
  cfg = small_config(assets)
  base_cfg, dcfg, tcfg = train_config.validate_config(cfg)
  mesh = sharding.make_mesh({"fsdp": -1})
  rules = sharding.rules_from_config(cfg.mesh.rules)
  tok = tokenizer_lib.load_tokenizer(assets["tokenizer"])
  it, _ = data.make_datasets(cfg.data, tok, seq_len=48, batch_size=4, seed=0)
  batch = next(it)
  outs = []
  for accum in (1, 2):  # accum 1: the program the other tests compiled (cached)
    progs = step_lib.programs(base_cfg, dcfg, dataclasses.replace(tcfg, grad_accum_steps=accum),
                              mesh, rules)
    with sharding.use_mesh(mesh, rules):
      params, buffers = step_lib.split_vars(step_lib.random_variables(
          base_cfg, dcfg, 0, tcfg.init_embedding_std, mesh, rules))
      state = progs.new_state(params)
      state, m = progs.step(state, buffers, batch)
      state, m = progs.step(state, buffers, batch)  # lr is 0 at step 0: the second update moves
    outs.append((jax.device_get(state.params), jax.device_get(m)))
  # Per-micro-batch means averaged vs one mean over the batch: equal when the micro-batches hold
  # the same number of target tokens, close otherwise.
  for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-3, rtol=5e-2)
  assert abs(float(outs[0][1]["loss"]) - float(outs[1][1]["loss"])) < 0.1 * float(outs[0][1]["loss"])


def test_eval_with_chunked_heads_equals_plain_logits(assets):
  # Real vocabularies evaluate with loss_chunk_size > 0 (no [B, T, V] logits): same numbers.
  cfg = small_config(assets)
  base_cfg, dcfg, tcfg = train_config.validate_config(cfg)
  params, buffers = step_lib.split_vars(step_lib.random_variables(base_cfg, dcfg, 3, 0.3))
  tok = tokenizer_lib.load_tokenizer(assets["tokenizer"])
  batch = next(data.make_datasets(cfg.data, tok, seq_len=48, batch_size=4, seed=0)[0])
  plain = eval_lib.make_eval_step(base_cfg, dcfg, tcfg)(params, buffers, batch)
  chunked = eval_lib.make_eval_step(base_cfg, dcfg, dataclasses.replace(tcfg, loss_chunk_size=20))(
      params, buffers, batch)
  for k in plain[0]:
    np.testing.assert_allclose(np.asarray(plain[0][k]), np.asarray(chunked[0][k]), rtol=1e-4,
                               err_msg=k)
  np.testing.assert_array_equal(np.asarray(plain[1]), np.asarray(chunked[1]))


def test_weight_decay_mask_spares_vectors():
  params = {"kernel": jnp.ones((2, 3)), "scale": jnp.ones((3,)), "layer_scalar": jnp.ones((1,))}
  assert optimizer.decay_mask(params) == {"kernel": True, "scale": False, "layer_scalar": False}


# ------------------------------------------------------------------------------ records + export
@pytest.mark.parametrize("family", [hf_config.GEMMA4, hf_config.UNIFIED])
def test_records_plots_export_and_hf_check(family, assets, tmp_path):
  """A run's records, plots and HF export, and the end-of-run HF assisted-generation check. The
  gemma4 pair starts from random init; the 12B family's from its HF dirs (`hf_base` /
  `hf_drafter`, the real presets' path: loaded, checked against the preset, exported again)."""
  fam = hf_config.FAMILIES[family]
  cfg = family_config(assets, family, eval_every=2, export_hf=True, hf_check=True)
  if family != hf_config.GEMMA4:
    src = export_random_pair(cfg, assets["tokenizer"], str(tmp_path / "src"))
    for d, model_type in (("base", fam.text_type), ("drafter", fam.assistant_type)):
      with open(os.path.join(src[d], "config.json")) as f:
        assert json.load(f)["model_type"] == model_type
    cfg.hf_base, cfg.hf_drafter = src["base"], src["drafter"]
    cfg.data.tokenizer = cfg.hf_base
  workdir = tmp_path / "run"
  out = trainer.run(cfg, str(workdir))
  assert out["status"] == "finished" and out["step"] == cfg.train.num_steps
  records = metrics.read_records(str(workdir))
  kinds = [(r["step"], r["kind"]) for r in records]
  assert (2, "eval") in kinds and (4, "eval") in kinds and (4, "summary") in kinds
  last = [r for r in records if r["kind"] == "eval"][-1]
  for key in ("base/loss", "drafter/acc_1", "drafter/loss_4", "accept/len_mean",
              "greedy/tokens_per_round", "greedy/accept/rate_1", "greedy/expected_speedup",
              "flops_ratio"):
    assert key in last, key
  assert 1.0 <= last["greedy/tokens_per_round"] <= 1 + cfg.train.num_draft_steps
  assert 0 < last["flops_ratio"] < 1
  for name in ("losses", "acceptance", "accepted_length"):
    assert os.path.getsize(workdir / "plots" / f"{name}.png") > 1000
  assert os.listdir(workdir / "tensorboard")

  # The export is an HF pair of the family: both load, and assisted generation runs and matches
  # plain greedy.
  assert out["export"] == str(workdir / "hf")
  with open(workdir / "hf" / "base" / "config.json") as f:
    assert json.load(f)["model_type"] == fam.text_type
  hf = out["hf"]
  assert hf["hf/rounds"] > 0
  assert hf["hf/same_as_trainer"] == 1.0  # HF's assisted greedy == the trainer's JAX greedy
  # The stale-K/V fix makes HF draft exactly as the trainer's walk models: equal up to numerics.
  fixed = export.hf_check(out["export"], out["prompts"], 6, out["stop_ids"], 4,
                          hf["trainer/tokens_per_round"] * 10)  # forces the fixed run too
  assert abs(fixed["hf_fixed/tokens_per_round"] / hf["trainer/tokens_per_round"] - 1) <= 0.10
  import torch
  import transformers
  from gemma_mtp_jax import hf_torch
  with hf_torch.hf_assistant_patch():
    base = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf" / "base")
    drafter = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf" / "drafter")
    tok = transformers.AutoTokenizer.from_pretrained(workdir / "hf" / "drafter")  # copied too
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 1 plus 2?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
      outs = base.generate(ids, assistant_model=drafter, max_new_tokens=5, do_sample=False)
  assert outs.shape[1] > ids.shape[1]
  assert type(drafter).__name__ == fam.assistant_lm
