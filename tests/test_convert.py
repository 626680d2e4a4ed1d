"""HF safetensors <-> JAX checkpoint converters, on tiny random HF models saved with save_pretrained.

The spec: HF -> JAX -> HF gives back the same files (tensor names, shapes, dtypes and bytes, and here
even the same file bytes), torch loads the export with no missing/unexpected keys and the same
logits, `generate(assistant_model=...)` runs on the exported pair, writes are atomic, and every bad
input is refused with a message naming the file or tensor.
"""

import contextlib
import glob
import hashlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from gemma_mtp_jax import hf_torch
from gemma_mtp_jax import checkpoint
from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.data import tokenizer as tokenizer_lib
from gemma_mtp_jax import convert as cli
from gemma_mtp_jax.checkpoint import hf_names as names
from gemma_mtp_jax.checkpoint import safetensors_io as st_io
from gemma_mtp_jax.utils import files
from tests import hf_helpers

S, F = hf_helpers.S, hf_helpers.F
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 384  # the tiny tokenizer's vocab; divisible by the assistant's 16 centroids
TOKENS = torch.tensor([[2, 17, 60, 121, 9, 250, 33, 7], [2, 5, 5, 380, 41, 12, 99, 3]])


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _assistant_kv_sharing():
  """transformers 5.23's `kv_sharing_modes` raises when every layer is KV-shared (the assistant's
  case); `hf_torch.hf_assistant_patch` reports them all as "reuse" for this module."""
  with hf_torch.hf_assistant_patch():
    yield


def _assistant_config():
  """An assistant for the e_style base: reads its sliding (head_dim 16) and global (32) KV."""
  text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=32,
              layer_types=[S, F], sliding_window=6, hidden_size_per_layer_input=0,
              vocab_size_per_layer_input=0, final_logit_softcapping=None)
  return transformers.Gemma4AssistantConfig(text_config=text, backbone_hidden_size=64,
                                            use_ordered_embeddings=True, num_centroids=16,
                                            centroid_intermediate_top_k=4)


def _assistant(seed=5):
  model = transformers.Gemma4AssistantForCausalLM(_assistant_config()).eval()
  model = hf_helpers.randomize_(model, seed=seed)
  with torch.no_grad():
    model.masked_embedding.token_ordering.copy_(
        torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed)))
  return model


def _multimodal(seed=3):
  text = hf_helpers.hf_text_config("e_style", vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB)
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=32,
                pooling_kernel_size=2)
  audio = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               subsampling_conv_channels=[8, 4], output_proj_dims=16, conv_kernel_size=3)
  cfg = transformers.Gemma4Config(text_config=text.to_dict(), vision_config=vision,
                                  audio_config=audio)
  torch.manual_seed(seed)
  return hf_helpers.randomize_(transformers.Gemma4ForConditionalGeneration(cfg).eval(), seed=seed)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
  """Source HF dirs: base (float32, one file, with tokenizer), the same base sharded, the same base
  in bfloat16, an assistant, and a multimodal Gemma4ForConditionalGeneration."""
  root = tmp_path_factory.mktemp("hf")
  # Code-like text over few distinct characters, so a 384-token vocab (264 of them special and
  # byte-fallback pieces) still has room for merges.
  words = ("def return model token layer attention params config drafter shard tensor weight "
           "value key query norm scale embed self").split()
  rng = np.random.default_rng(0)
  texts = [f"def {a}_{b}(x, {c}):\n  return {d}.{a}(x) + {i}"
           for i, (a, b, c, d) in enumerate(rng.choice(words, (2000, 4)))]
  tok_dir = str(root / "tok")
  tokenizer_lib.build_tiny_tokenizer(texts, tok_dir, vocab_size=VOCAB)
  dirs = {k: str(root / k) for k in ("base", "sharded", "bf16", "drafter", "mm")}
  base = hf_helpers.hf_causal_lm("e_style", vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB)
  base.save_pretrained(dirs["base"])
  base.save_pretrained(dirs["sharded"], max_shard_size="300KB")
  base.to(torch.bfloat16).save_pretrained(dirs["bf16"])
  for k in ("base", "sharded"):
    st_io.copy_files(tok_dir, os.listdir(tok_dir), dirs[k])
  _assistant().save_pretrained(dirs["drafter"])
  _multimodal().save_pretrained(dirs["mm"])
  return dirs


@pytest.fixture(scope="module")
def unified_src(src, tmp_path_factory):
  """The 12B family's source HF dirs: a Gemma4UnifiedForCausalLM base (with `src`'s tokenizer), a
  Gemma4UnifiedForConditionalGeneration base (patch and audio embedders), a fitting assistant;
  built inside the module's store-layer patch (the assistant reads the base's last layers)."""
  root = tmp_path_factory.mktemp("hf_unified")
  dirs = {k: str(root / k) for k in ("base", "mm", "drafter")}
  hf_helpers.hf_causal_lm("unified", vocab_size=VOCAB).save_pretrained(dirs["base"])
  st_io.copy_files(src["base"], st_io.aux_files(src["base"]), dirs["base"])
  hf_helpers.hf_unified_multimodal(vocab_size=VOCAB).save_pretrained(dirs["mm"])
  hf_helpers.hf_unified_assistant(vocab_size=VOCAB, ordered=True).save_pretrained(dirs["drafter"])
  return dirs


FAMILIES = (hf_config.GEMMA4, hf_config.UNIFIED)


def _family_src(request, family: str) -> dict:
  return request.getfixturevalue("src" if family == hf_config.GEMMA4 else "unified_src")


def _cli(*argv):
  assert cli.main([str(a) for a in argv]) == 0


def _sha(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _tree_hashes(root):
  return {os.path.relpath(p, root): _sha(p)
          for p in glob.glob(os.path.join(root, "**"), recursive=True) if os.path.isfile(p)}


def _assert_same_tensors(a_dir, b_dir, skip=()):
  """Same tensor names, shapes, dtypes and bytes."""
  with st_io.Reader(a_dir) as a, st_io.Reader(b_dir) as b:
    names = set(a.keys()) - set(skip)
    assert set(b.keys()) == names
    for n in sorted(names):
      x, y = a.get(n), b.get(n)
      assert x.dtype == y.dtype and x.shape == y.shape, n
      assert x.tobytes() == y.tobytes(), n


def _assert_same_files(a_dir, b_dir, names=None):
  names = names or [n for n in os.listdir(a_dir) if os.path.isfile(os.path.join(a_dir, n))]
  for n in names:
    assert _sha(os.path.join(a_dir, n)) == _sha(os.path.join(b_dir, n)), n


def _load_clean(cls, path):
  model, info = cls.from_pretrained(path, output_loading_info=True, attn_implementation="eager")
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return model.eval()


def _logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(input_ids=tokens).logits


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact_and_runs_in_torch(family, request, tmp_path):
  src, fam = _family_src(request, family), hf_config.FAMILIES[family]
  pair_dir, out = tmp_path / "pair", tmp_path / "hf"
  _cli("hf-to-jax", "--base", src["base"], "--drafter", src["drafter"], "--out", pair_dir)
  pj = json.loads((pair_dir / "pair.json").read_text())
  assert pj["format"] == checkpoint.PAIR_FORMAT and pj["dtype"] == "float32"
  assert pj["base"]["hf_family"] == pj["drafter"]["text"]["hf_family"] == family
  assert pj["drafter"]["backbone_hidden_size"] == 64
  assert sorted(os.listdir(pair_dir / "tokenizer")) == sorted(st_io.aux_files(src["base"]))
  _cli("jax-to-hf", "--checkpoint", pair_dir, "--out", out)

  # Every source file comes back byte for byte (weights, configs, tokenizer files).
  _assert_same_files(src["base"], out / "base")
  assert sorted(os.listdir(out / "base")) == sorted(os.listdir(src["base"]))
  _assert_same_tensors(src["drafter"], out / "drafter")
  _assert_same_files(src["drafter"], out / "drafter", ["model.safetensors", "config.json"])
  # The assistant was saved without speculative settings; the export makes generate() work.
  gen = json.loads((out / "drafter" / "generation_config.json").read_text())
  assert gen["num_assistant_tokens"] == 4 and gen["num_assistant_tokens_schedule"] == "constant"

  # AutoModelForCausalLM takes the family's classes from the written config.json.
  ref = _load_clean(transformers.AutoModelForCausalLM, src["base"])
  target = _load_clean(transformers.AutoModelForCausalLM, out / "base")
  assert type(target).__name__ == fam.causal_lm
  assert torch.equal(_logits(target), _logits(ref))
  assistant = _load_clean(transformers.AutoModelForCausalLM, out / "drafter")
  assert type(assistant).__name__ == fam.assistant_lm
  prompt = TOKENS[:1, :5]
  plain = target.generate(prompt, max_new_tokens=6, do_sample=False)
  spec = target.generate(prompt, assistant_model=assistant, max_new_tokens=6, do_sample=False)
  assert torch.equal(spec, plain)  # greedy speculative decoding changes nothing but speed
  tok = tokenizer_lib.load_tokenizer(str(out / "base"))
  assert tok("def f(x):\n  return x").input_ids == tokenizer_lib.load_tokenizer(
      src["base"])("def f(x):\n  return x").input_ids


def test_sharded_input_is_read_and_reproduced(src, tmp_path):
  pair_dir, out, resharded = tmp_path / "pair", tmp_path / "hf", tmp_path / "hf2"
  assert len(glob.glob(os.path.join(src["sharded"], "model-*.safetensors"))) > 2
  _cli("hf-to-jax", "--base", src["sharded"], "--out", pair_dir)
  _cli("jax-to-hf", "--checkpoint", pair_dir, "--out", out)
  assert not os.path.exists(out / "drafter")
  _assert_same_files(src["sharded"], out / "base")  # shards and index.json included

  # An explicit shard size re-splits; the index is what transformers writes.
  _cli("jax-to-hf", "--checkpoint", pair_dir, "--out", resharded, "--max-shard-size", "500KB")
  index = json.loads((resharded / "base" / st_io.INDEX_NAME).read_text())
  src_index = json.loads(open(os.path.join(src["sharded"], st_io.INDEX_NAME)).read())
  assert index["metadata"] == src_index["metadata"]  # total_size and total_parameters
  assert set(index["weight_map"]) == set(src_index["weight_map"])
  assert len(set(index["weight_map"].values())) < len(set(src_index["weight_map"].values()))
  _assert_same_tensors(src["base"], resharded / "base")
  model = _load_clean(transformers.Gemma4ForCausalLM, resharded / "base")
  assert torch.equal(_logits(model), _logits(_load_clean(transformers.Gemma4ForCausalLM,
                                                         src["base"])))


def test_bf16_stays_bf16_and_dtype_changes_are_explicit(src, tmp_path, capsys):
  bf_pair, bf_out = tmp_path / "bf", tmp_path / "bf_hf"
  _cli("hf-to-jax", "--base", src["bf16"], "--out", bf_pair)
  pair = checkpoint.load_pair(str(bf_pair))
  assert {x.dtype for x in jax.tree.leaves(pair.params["base"])} == {np.dtype(ml_dtypes.bfloat16)}
  assert pair.base_cfg.param_dtype == "bfloat16"
  _cli("jax-to-hf", "--checkpoint", bf_pair, "--out", bf_out)
  _assert_same_files(src["bf16"], bf_out / "base")

  # --dtype float32: logged; export writes float32 (with a warning) unless asked for bfloat16.
  f32_pair = tmp_path / "f32"
  capsys.readouterr()
  _cli("hf-to-jax", "--base", src["bf16"], "--out", f32_pair, "--dtype", "float32")
  assert "cast 115 tensors bfloat16 -> float32" in capsys.readouterr().err
  assert json.loads((f32_pair / "pair.json").read_text())["dtype"] == "float32"
  _cli("jax-to-hf", "--checkpoint", f32_pair, "--out", tmp_path / "f32_hf")
  assert "the source stored bfloat16" in capsys.readouterr().err
  with st_io.Reader(str(tmp_path / "f32_hf" / "base")) as r, st_io.Reader(src["bf16"]) as s:
    assert {x.dtype for x in r.specs.values()} == {np.dtype(np.float32)}
    name = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_array_equal(r.get(name), s.get(name).astype(np.float32))
  assert json.loads((tmp_path / "f32_hf" / "base" / "config.json").read_text())["dtype"] == "float32"
  _cli("jax-to-hf", "--checkpoint", f32_pair, "--out", tmp_path / "back", "--dtype", "bfloat16")
  assert "cast 115 tensors float32 -> bfloat16" in capsys.readouterr().err
  _assert_same_files(src["bf16"], tmp_path / "back" / "base")  # bf16 -> f32 -> bf16 is exact


# Per family: the audio tensors a multimodal base carries through, a param of its image front end.
MULTIMODAL_ROWS = {
    hf_config.GEMMA4: (("model.audio_tower.", "model.embed_audio."), "layer_0"),  # the tower
    hf_config.UNIFIED: (("model.embed_audio.",), "pos_embedding"),  # the patch embedder
}


@pytest.mark.parametrize("family", FAMILIES)
def test_multimodal_towers_are_carried_through(family, request, tmp_path):
  src, fam = _family_src(request, family), hf_config.FAMILIES[family]
  audio, front_end_param = MULTIMODAL_ROWS[family]
  pair_dir, out = tmp_path / "pair", tmp_path / "hf"
  _cli("hf-to-jax", "--base", src["mm"], "--drafter", src["drafter"], "--out", pair_dir)
  pair = checkpoint.load_pair(str(pair_dir))
  with st_io.Reader(str(pair_dir / "hf_extra")) as extra:
    # The image front end and its embedder are params (model.vision); only audio is carried.
    assert extra.keys() and all(k.startswith(audio) for k in extra.keys())
    assert not any(k.startswith(tuple(f"model.{p}" for p in names.vision_prefixes(pair.base_cfg)))
                   for k in extra.keys())
  assert pair.base_cfg.hf_family == pair.drafter_cfg.text.hf_family == family
  assert "embedding" in pair.params["base"] and "lm_head" not in pair.params["base"]
  assert pair.base_cfg.vision is not None and front_end_param in pair.params["base"]["vision"]
  _cli("jax-to-hf", "--checkpoint", pair_dir, "--out", out)
  _assert_same_files(src["mm"], out / "base")
  with st_io.Reader(str(out / "base")) as r:
    assert "lm_head.weight" not in r.keys()  # tied: never written twice
  ref = _load_clean(transformers.AutoModelForCausalLM, src["mm"])
  model = _load_clean(transformers.AutoModelForCausalLM, out / "base")
  assert type(model).__name__ == fam.conditional_generation
  assert torch.equal(_logits(model), _logits(ref))
  assistant = _load_clean(transformers.AutoModelForCausalLM, out / "drafter")
  assert type(assistant).__name__ == fam.assistant_lm
  model.generate(TOKENS[:1, :5], assistant_model=assistant, max_new_tokens=4, do_sample=False)
  # Straight from the HF dirs (converted in memory) gives the same files.
  _cli("jax-to-hf", "--checkpoint", src["mm"], "--drafter", src["drafter"], "--out",
       tmp_path / "direct")
  _assert_same_files(out / "base", tmp_path / "direct" / "base")
  _assert_same_files(out / "drafter", tmp_path / "direct" / "drafter")


def test_tied_lm_head_is_accepted_once_and_never_written(src, tmp_path):
  state = safetensors.numpy.load_file(os.path.join(src["base"], st_io.WEIGHTS_NAME))
  tied = _copy_dir(src["base"], tmp_path / "tied")
  state["lm_head.weight"] = state["model.embed_tokens.weight"]
  safetensors.numpy.save_file(state, str(tied / st_io.WEIGHTS_NAME), metadata={"format": "pt"})
  _cli("hf-to-jax", "--base", tied, "--out", tmp_path / "pair")
  _cli("jax-to-hf", "--checkpoint", tmp_path / "pair", "--out", tmp_path / "hf")
  _assert_same_tensors(src["base"], tmp_path / "hf" / "base")
  state["lm_head.weight"] = state["lm_head.weight"] + 1
  safetensors.numpy.save_file(state, str(tied / st_io.WEIGHTS_NAME), metadata={"format": "pt"})
  _expect_error(["hf-to-jax", "--base", tied, "--out", tmp_path / "p2"], "lm_head.weight")


def _from_scratch_configs(family: str):
  """A (base, drafter) config pair of `family` that no HF dir holds (built from HF dicts)."""
  if family == hf_config.UNIFIED:
    text = hf_helpers.hf_text_config("unified", vocab_size=VOCAB)
    assistant = hf_helpers.hf_unified_assistant_config(vocab_size=VOCAB, ordered=True)
  else:
    text = hf_helpers.hf_text_config("e_style", vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB)
    assistant = _assistant_config().to_dict()
  return (hf_config.model_config_from_hf(text.to_dict()),
          hf_config.drafter_config_from_hf(assistant))


@pytest.mark.parametrize("family", FAMILIES)
def test_from_scratch_pair_exports_configs_torch_runs(family, tmp_path):
  """No source HF dir (a pair initialised in JAX): the export generates config.json and
  generation_config.json from the JAX configs with the family's classes, torch loads them with no
  missing / unexpected keys, and computes what JAX computes."""
  import flax.linen as nn
  from gemma_mtp_jax.model import drafter as drafter_lib
  from gemma_mtp_jax.model import transformer

  fam = hf_config.FAMILIES[family]
  cfg, dcfg = _from_scratch_configs(family)
  rng = np.random.default_rng(0)

  def random(s):  # values from shapes alone (no JAX init to run)
    if s.dtype == np.int32:  # the assistant's token ordering: a permutation of the vocab
      return rng.permutation(s.shape[0]).astype(np.int32)
    return (rng.standard_normal(s.shape) * 0.3).astype(s.dtype)

  params = jax.tree.map(random, transformer.param_shapes(cfg))
  variables = jax.tree.map(random, nn.unbox(jax.eval_shape(
      lambda r: drafter_lib.init_variables(dcfg, r), jax.random.PRNGKey(0))))
  pair = checkpoint.make_pair(cfg, dcfg, {"base": params, "drafter": variables})
  out = tmp_path / "hf"
  checkpoint.export_hf(pair, str(out))
  gen = json.loads((out / "drafter" / "generation_config.json").read_text())
  assert gen["num_assistant_tokens"] == 4
  base_json = json.loads((out / "base" / "config.json").read_text())
  drafter_json = json.loads((out / "drafter" / "config.json").read_text())
  assert (base_json["model_type"], base_json["architectures"]) == (fam.text_type, [fam.causal_lm])
  assert (drafter_json["model_type"], drafter_json["architectures"]) == (
      fam.assistant_type, [fam.assistant_lm])
  assert drafter_json["text_config"]["model_type"] == fam.text_type
  target = _load_clean(getattr(transformers, fam.causal_lm), out / "base")
  assistant = _load_clean(getattr(transformers, fam.assistant_lm), out / "drafter")
  tokens = np.asarray(TOKENS)
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  ours = jax.jit(lambda p, t, q: transformer.Transformer(cfg).apply({"params": p}, t, q).logits)(
      params, tokens, positions)
  np.testing.assert_allclose(np.asarray(ours), _logits(target).numpy(), atol=1e-4)
  target.generate(TOKENS[:1, :5], assistant_model=assistant, max_new_tokens=4, do_sample=False)
  # ... and the export reads back into the same configs and params.
  again = checkpoint.load_pair(str(out / "base"), drafter=str(out / "drafter"))
  assert again.base_cfg == cfg and again.drafter_cfg == dcfg
  for a, b in zip(jax.tree.leaves(pair.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------ sources
def test_hf_tensors_stream_one_at_a_time_onto_the_sharding(src, monkeypatch):
  events, real_get = [], st_io.Reader.get
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def get(self, name):
    events.append(("read", (self.path, name)))
    return real_get(self, name)

  def lookup(path):
    events.append(("place", "/".join(path)))
    return sharding

  monkeypatch.setattr(st_io.Reader, "get", get)
  pair = checkpoint.load_pair(src["sharded"], drafter=src["drafter"], shardings=lookup)
  reads = [n for e, n in events if e == "read"]
  assert len(reads) == len(set(reads)) == 115 + 28  # every tensor read once
  # Each converted tensor is placed before the next is read: never a second copy of the model.
  assert [e for e, _ in events[:6]] == ["read", "place"] * 3
  assert all(x.sharding == sharding for x in jax.tree.leaves(pair.params))


def test_load_pair_from_hf_pair_dir_and_workdir_agree(src, tmp_path):
  hf = checkpoint.load_pair(src["sharded"], drafter=src["drafter"])
  assert hf.meta["kind"] == "hf" and hf.tokenizer_path == src["sharded"]
  _cli("hf-to-jax", "--base", src["sharded"], "--drafter", src["drafter"], "--out",
       tmp_path / "pair")
  device = jax.local_devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  pair = checkpoint.load_pair(str(tmp_path / "pair"), shardings=sharding)
  assert pair.base_cfg == hf.base_cfg and pair.drafter_cfg == hf.drafter_cfg
  for a, b in zip(jax.tree.leaves(hf.params), jax.tree.leaves(pair.params)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  assert all(x.sharding == sharding for x in jax.tree.leaves(pair.params))
  assert pair.params["drafter"]["buffers"]["token_ordering"].dtype == np.int32

  # A train workdir: pair files + CheckpointManager steps; load the latest or a given step.
  wd = checkpoint.init_workdir(str(tmp_path / "wd"), pair)
  mgr = checkpoint.open_manager(wd, max_to_keep=2)
  opt_state = {"mu": jax.tree.map(np.zeros_like, pair.params["base"]["final_norm"])}
  later = jax.tree.map(lambda x: x, pair.params)
  later["base"] = dict(later["base"], embedding=later["base"]["embedding"] + 1)
  mgr.save(3, args=checkpoint.save_args(pair.params, opt_state, {"step": 3, "data": [0, 7]}))
  mgr.save(5, args=checkpoint.save_args(later, opt_state, {"step": 5, "data": [1, 2]}))
  mgr.wait_until_finished()
  mgr.close()
  latest = checkpoint.load_pair(wd)
  assert latest.meta["kind"] == "workdir" and latest.meta["step"] == 5
  assert latest.meta["train"] == {"step": 5, "data": [1, 2]}
  np.testing.assert_array_equal(latest.params["base"]["embedding"], later["base"]["embedding"])
  step3 = checkpoint.restore_params(wd, step=3)
  np.testing.assert_array_equal(step3["base"]["embedding"], pair.params["base"]["embedding"])
  abstract = lambda t: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), t)
  step, params, opt, meta = checkpoint.restore_train_state(
      wd, abstract({k: v for k, v in pair.params.items()}), abstract(opt_state))
  assert step == 5 and meta["data"] == [1, 2] and set(opt) == {"mu"}

  _cli("jax-to-hf", "--checkpoint", wd, "--step", 3, "--out", tmp_path / "hf3")
  _assert_same_files(src["sharded"], tmp_path / "hf3" / "base")
  _assert_same_tensors(src["drafter"], tmp_path / "hf3" / "drafter")
  _cli("jax-to-hf", "--checkpoint", wd, "--out", tmp_path / "hf5")
  with st_io.Reader(str(tmp_path / "hf5" / "base")) as r, st_io.Reader(src["base"]) as s:
    name = "model.embed_tokens.weight"
    np.testing.assert_array_equal(r.get(name), s.get(name) + 1)
  _expect_error(["jax-to-hf", "--checkpoint", wd, "--step", 4, "--out", tmp_path / "x"],
                "no step 4")


def test_hub_ids_resolve_through_snapshot_download(src, monkeypatch):
  calls = []

  def fake_download(repo_id, allow_patterns=None, **kw):
    calls.append(repo_id)
    assert not any(p.endswith((".bin", ".pt")) for p in allow_patterns)  # never pickles
    return src["base"] if repo_id.endswith("-it") else src["drafter"]

  monkeypatch.setattr(st_io.huggingface_hub, "snapshot_download", fake_download)
  pair = checkpoint.load_pair("google/tiny-it", drafter="google/tiny-it-assistant")
  assert calls == ["google/tiny-it", "google/tiny-it-assistant"]
  assert pair.meta["pair"]["source"] == {"base": "google/tiny-it",
                                         "drafter": "google/tiny-it-assistant"}


# ------------------------------------------------------------------------------ atomicity
def test_failed_write_leaves_previous_output_intact(src, tmp_path, monkeypatch, capsys):
  _cli("hf-to-jax", "--base", src["sharded"], "--out", tmp_path / "pair")
  out = tmp_path / "hf"
  _cli("jax-to-hf", "--checkpoint", tmp_path / "pair", "--out", out)
  before = _tree_hashes(out)
  _expect_error(["jax-to-hf", "--checkpoint", tmp_path / "pair", "--out", out],
                f"{out} exists (pass --overwrite")

  real, calls = st_io._write_shard, []

  def fail_after_first(tensors, path, metadata):
    calls.append(path)
    if len(calls) > 1:
      raise OSError("disk full")
    real(tensors, path, metadata)

  monkeypatch.setattr(st_io, "_write_shard", fail_after_first)
  with pytest.raises(OSError, match="disk full"):
    cli.main(["jax-to-hf", "--checkpoint", str(tmp_path / "pair"), "--out", str(out),
              "--overwrite", "--max-shard-size", "100KB"])
  assert len(calls) == 2
  assert _tree_hashes(out) == before
  assert sorted(os.listdir(tmp_path)) == ["hf", "pair"]  # no temp dir left behind
  monkeypatch.setattr(st_io, "_write_shard", real)
  _cli("jax-to-hf", "--checkpoint", tmp_path / "pair", "--out", out, "--overwrite",
       "--max-shard-size", "100KB")
  assert _tree_hashes(out) != before and sorted(os.listdir(tmp_path)) == ["hf", "pair"]
  _assert_same_tensors(src["base"], out / "base")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_write_leaves_previous_output_intact(src, tmp_path, sig):
  _cli("hf-to-jax", "--base", src["sharded"], "--out", tmp_path / "pair")
  out = tmp_path / "hf"
  _cli("jax-to-hf", "--checkpoint", tmp_path / "pair", "--out", out)
  before = _tree_hashes(out)
  marker = tmp_path / "first_shard_written"
  # The child writes one shard, says so, and hangs until it is killed mid-checkpoint.
  child = textwrap.dedent(f"""
      import sys, time
      from gemma_mtp_jax.checkpoint import safetensors_io as st_io
      from gemma_mtp_jax import convert as cli
      real = st_io._write_shard
      def slow(tensors, path, metadata):
        real(tensors, path, metadata)
        open({str(marker)!r}, "w").close()
        time.sleep(600)
      st_io._write_shard = slow
      sys.exit(cli.main(["jax-to-hf", "--checkpoint", {str(tmp_path / "pair")!r},
                         "--out", {str(out)!r}, "--overwrite", "--max-shard-size", "100KB"]))
  """)
  proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO)
  try:
    deadline = time.time() + 120
    while not marker.exists():
      assert proc.poll() is None and time.time() < deadline, "child never wrote a shard"
      time.sleep(0.1)
    partial = [n for n in os.listdir(tmp_path) if ".partial-" in n]
    assert len(partial) == 1  # it was mid-write, beside (not in) the output
  finally:
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
  assert _tree_hashes(out) == before
  if sig == signal.SIGTERM:  # unwound: exit status 130 and its temp dir already gone
    assert rc == 130 and not [n for n in os.listdir(tmp_path) if ".partial-" in n]
  # The next writer to the same path removes whatever a killed one left.
  _cli("jax-to-hf", "--checkpoint", tmp_path / "pair", "--out", out, "--overwrite")
  assert sorted(os.listdir(tmp_path)) == ["first_shard_written", "hf", "pair"]
  assert _tree_hashes(out) == before


def test_atomic_dir_modes(tmp_path):
  """The one atomic-dir helper: new dirs appear whole; existing ones are refused, replaced, or
  (with a marker) merged into with the marker last; a failed block leaves nothing behind."""
  def write(d, **names):
    for name, text in names.items():
      (pathlib.Path(d) / name).write_text(text)

  out = tmp_path / "out"
  with files.atomic_dir(str(out)) as tmp:
    assert os.path.dirname(tmp) == str(tmp_path) and ".out.partial-" in tmp
    write(tmp, a="1")
  assert sorted(os.listdir(out)) == ["a"] and sorted(os.listdir(tmp_path)) == ["out"]
  with pytest.raises(FileExistsError):
    with files.atomic_dir(str(out)):
      raise AssertionError("the block must not run when the output exists")
  with pytest.raises(OSError, match="disk full"):
    with files.atomic_dir(str(out), replace=True) as tmp:
      write(tmp, b="2")
      raise OSError("disk full")
  assert sorted(os.listdir(out)) == ["a"] and sorted(os.listdir(tmp_path)) == ["out"]
  with files.atomic_dir(str(out), replace=True) as tmp:
    write(tmp, b="2")
  assert sorted(os.listdir(out)) == ["b"] and sorted(os.listdir(tmp_path)) == ["out"]

  # marker: files already there stay, the new ones are moved in with the marker last.
  moved, real_replace = [], os.replace
  def recording_replace(a, b):
    moved.append(os.path.basename(b))
    real_replace(a, b)
  os.replace = recording_replace
  try:
    with files.atomic_dir(str(out), marker="done.json") as tmp:
      write(tmp, **{"done.json": "{}", "z": "3", "c": "4"})
  finally:
    os.replace = real_replace
  assert moved[-1] == "done.json" and sorted(moved) == ["c", "done.json", "z"]
  assert sorted(os.listdir(out)) == ["b", "c", "done.json", "z"]

  # A dead writer's temp dir is removed by the next writer to the same path.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = tmp_path / f".out.partial-{dead.pid}-x"
  stale.mkdir()
  with files.atomic_dir(str(out), replace=True) as tmp:
    write(tmp, a="5")
  assert sorted(os.listdir(tmp_path)) == ["out"]


# ------------------------------------------------------------------------------ bad input
def _copy_dir(src_dir, dst):
  shutil.copytree(src_dir, dst)
  return dst


def _expect_error(argv, *fragments):
  """The CLI exits 2 and its message contains every fragment."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    rc = cli.main([str(a) for a in argv])
  msg = err.getvalue()
  assert rc == 2, msg
  for f in fragments:
    assert str(f) in msg, (f, msg)
  return msg


def _edit_tensors(d, fn, fname=st_io.WEIGHTS_NAME):
  path = os.path.join(d, fname)
  state = safetensors.numpy.load_file(path)
  fn(state)
  safetensors.numpy.save_file(state, path, metadata={"format": "pt"})
  return path


def _edit_json(path, fn):
  j = json.loads(open(path).read())
  fn(j)
  open(path, "w").write(json.dumps(j))


def test_bad_tensors_are_named(src, tmp_path):
  def case(name, edit):
    d = _copy_dir(src["base"], tmp_path / name)
    return d, _edit_tensors(d, edit)

  q = "model.layers.1.self_attn.q_proj.weight"
  d, f = case("missing", lambda s: s.pop(q))
  _expect_error(["hf-to-jax", "--base", d, "--out", tmp_path / "o"], "missing tensor",
                "layers.1.self_attn.q_proj.weight", f)
  bogus = "model.layers.0.self_attn.bogus.weight"
  d, f = case("unexpected", lambda s: s.update({bogus: np.zeros(3, np.float32)}))
  _expect_error(["hf-to-jax", "--base", d, "--out", tmp_path / "o"], "unexpected", bogus, f)
  up = "model.layers.2.mlp.up_proj.weight"
  d, f = case("shape", lambda s: s.update({up: np.zeros((5, 5), np.float32)}))
  _expect_error(["hf-to-jax", "--base", d, "--out", tmp_path / "o"], f,
                "layers.2.mlp.up_proj.weight", "(5, 5)")
  assert not os.path.exists(tmp_path / "o")


def test_corrupt_truncated_and_inconsistent_files_are_named(src, tmp_path):
  d = _copy_dir(src["base"], tmp_path / "corrupt")
  f = d / st_io.WEIGHTS_NAME
  data = f.read_bytes()
  f.write_bytes(data[:8] + b"{garbage" + data[16:])
  _expect_error(["hf-to-jax", "--base", d, "--out", tmp_path / "o"], str(f), "corrupt")
  f.write_bytes(data[: len(data) // 2])
  _expect_error(["hf-to-jax", "--base", d, "--out", tmp_path / "o"], str(f), "truncated")

  d = _copy_dir(src["sharded"], tmp_path / "shards")
  shard = sorted(glob.glob(str(d / "model-*.safetensors")))[1]
  os.remove(shard)
  _expect_error(["hf-to-jax", "--base", d, "--out", tmp_path / "o"],
                os.path.basename(shard), "missing")
  d = _copy_dir(src["sharded"], tmp_path / "shards2")
  index = d / st_io.INDEX_NAME
  j = json.loads(index.read_text())
  name, fname = next(iter(sorted(j["weight_map"].items())))
  other = next(v for v in j["weight_map"].values() if v != fname)
  j["weight_map"][name] = other
  index.write_text(json.dumps(j))
  _expect_error(["hf-to-jax", "--base", d, "--out", tmp_path / "o"], name, other)


@pytest.mark.parametrize("field,value,fragment", [
    ("backbone_hidden_size", 48, "backbone_hidden_size=48"),
    ("text_config.head_dim", 8, "head_dim=8"),
    # transformers 5.23 writes the global layers' head_dim as a per-layer override (layer 1 is the
    # assistant's full-attention layer).
    ("text_config.per_layer_config.1.head_dim", 64, "global_head_dim=64"),
])
def test_drafter_that_does_not_fit_the_base_is_refused(src, tmp_path, field, value, fragment):
  d = _copy_dir(src["drafter"], tmp_path / "drafter")

  def edit(j):
    *parents, key = field.split(".")
    for k in parents:
      j = j[k]
    j[key] = value

  _edit_json(d / "config.json", edit)
  _expect_error(["hf-to-jax", "--base", src["base"], "--drafter", d, "--out", tmp_path / "o"],
                str(d / "config.json"), "does not fit the base", fragment)


def test_pickles_and_wrong_roles_are_refused(src, tmp_path):
  d = tmp_path / "pickle"
  d.mkdir()
  shutil.copy(os.path.join(src["base"], "config.json"), d)
  torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
  _expect_error(["hf-to-jax", "--base", d, "--out", tmp_path / "o"],
                str(d / "pytorch_model.bin"), "pickle", "safetensors")
  _expect_error(["jax-to-hf", "--checkpoint", d / "pytorch_model.bin", "--out", tmp_path / "o"],
                "pytorch_model.bin", "pickle")
  _expect_error(["hf-to-jax", "--base", src["drafter"], "--out", tmp_path / "o"],
                os.path.join(src["drafter"], "config.json"), "--drafter")
  _expect_error(["hf-to-jax", "--base", src["base"], "--drafter", src["base"], "--out",
                 tmp_path / "o"], "gemma4_assistant")
  _expect_error(["jax-to-hf", "--checkpoint", tmp_path / "nowhere", "--out", tmp_path / "o"],
                "nowhere")


def test_tool_scripts_forward_to_the_cli():
  for script, flag in (("hf_to_jax.py", "--base"), ("jax_to_hf.py", "--checkpoint")):
    res = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert", script), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and flag in res.stdout, res.stderr


def test_package_exports_the_public_api_lazily():
  # `from gemma_mtp_jax import checkpoint` and `checkpoint.pair` name the same objects; importing
  # the package or a light submodule (hf_names, for ConversionError) loads neither JAX nor orbax.
  from gemma_mtp_jax.checkpoint import pair
  for name in checkpoint.__all__:
    assert getattr(checkpoint, name) is getattr(pair, name), name
  with pytest.raises(AttributeError, match="no_such_name"):
    checkpoint.no_such_name
  code = ("import sys; from gemma_mtp_jax import checkpoint; "
          "from gemma_mtp_jax.checkpoint import hf_names; "
          "print(sorted(m for m in ('jax', 'orbax.checkpoint') if m in sys.modules))")
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr
