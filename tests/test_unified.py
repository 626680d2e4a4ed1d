"""Gemma 4 12B ("unified", transformers' gemma4_unified) and its assistant: the same model code,
drafter and converters as the other sizes, checked against transformers 5.23's own classes.

Tiny random 12B-style models (k_eq_v global layers with one KV head, no PLE, no MoE, no KV sharing):
logits and store K/V equal HF's, prefill + decode equals the full forward, the drafter's first round
equals HF's candidate generator, speculative greedy equals HF greedy, HF -> JAX -> HF gives the same
files (Gemma4UnifiedForCausalLM and Gemma4UnifiedForConditionalGeneration dirs, the vision
embedder as params, the audio embedder carried through), and the generate / convert CLIs take the pair. The preset's parameter
counts equal HF's meta-device builds of the released configs.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from gemma_mtp_jax import checkpoint
from gemma_mtp_jax import generate as generate_cli
from gemma_mtp_jax import hf_torch
from gemma_mtp_jax import presets
from gemma_mtp_jax.checkpoint import hf_assistant as convert_drafter
from gemma_mtp_jax.checkpoint import hf_base as convert_base
from gemma_mtp_jax.checkpoint import safetensors_io as st_io
from gemma_mtp_jax.decoding import speculative as spec
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import drafter as drafter_lib
from gemma_mtp_jax.model import families
from gemma_mtp_jax.model import kv_cache
from gemma_mtp_jax.model import transformer
from gemma_mtp_jax.model import vision_config
from tests import hf_helpers
from tests.test_convert import _assert_same_files, _cli, _load_clean, _logits
from tests.test_drafter import _first_round, jit_base, jit_draft
from tests.test_transformer_hf import _left_padded

jax.config.update("jax_default_matmul_precision", "highest")

S, F = hf_helpers.S, hf_helpers.F
TOL = 1e-4
TOKENS = torch.tensor([[2, 17, 60, 121, 9, 250, 33, 7], [2, 5, 5, 180, 41, 12, 99, 3]])
_ROPE = {S: {"rope_type": "default", "rope_theta": 10000.0},
         F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}
# The text_config of google/gemma-4-12B's config.json (transformers 5.10 wrote it: global_head_dim
# and num_global_key_value_heads, and the PLE / MoE keys its config class no longer has).
RELEASED_TEXT = dict(
    model_type="gemma4_unified_text", vocab_size=262144, hidden_size=3840, intermediate_size=15360,
    num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8,
    num_global_key_value_heads=1, head_dim=256, global_head_dim=512, attention_k_eq_v=True,
    layer_types=[F if (i + 1) % 6 == 0 else S for i in range(48)], sliding_window=1024,
    rope_parameters=_ROPE, final_logit_softcapping=30.0, max_position_embeddings=262144,
    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
    num_kv_shared_layers=0, use_double_wide_mlp=False, hidden_size_per_layer_input=0,
    vocab_size_per_layer_input=262144, enable_moe_block=False, num_experts=None,
    top_k_experts=None, moe_intermediate_size=None, use_bidirectional_attention="vision",
    pad_token_id=0, bos_token_id=2, eos_token_id=1)
RELEASED_BASE = dict(
    model_type="gemma4_unified", architectures=["Gemma4UnifiedForConditionalGeneration"],
    text_config=RELEASED_TEXT, tie_word_embeddings=True,
    vision_config=dict(model_type="gemma4_unified_vision", patch_size=16, pooling_kernel_size=3,
                       mm_embed_dim=3840, mm_posemb_size=1120, output_proj_dims=3840),
    audio_config=dict(model_type="gemma4_unified_audio", audio_embed_dim=640))
RELEASED_ASSISTANT = dict(
    model_type="gemma4_unified_assistant", architectures=["Gemma4UnifiedAssistantForCausalLM"],
    backbone_hidden_size=3840, use_ordered_embeddings=False, num_centroids=2048,
    centroid_intermediate_top_k=32, tie_word_embeddings=True,
    text_config=dict(
        model_type="gemma4_unified_text", vocab_size=262144, hidden_size=1024,
        intermediate_size=8192, num_hidden_layers=4, layer_types=[S, S, S, F],
        num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=1, head_dim=256,
        global_head_dim=512, attention_k_eq_v=True, sliding_window=1024, num_kv_shared_layers=4,
        final_logit_softcapping=None, rope_parameters=_ROPE, max_position_embeddings=262144))


def _preset():
  return presets.model_configs(presets.load_config("12b"))


def _with_embedder(base):
  """The 12B with its released image front end (`model.unified_vision`) and token ids."""
  return base.replace(vision=vision_config.UnifiedVisionConfig(), image_token_id=258_880,
                      boi_token_id=255_999, eoi_token_id=258_882, video_token_id=258_884,
                      audio_token_id=258_881)


# ------------------------------------------------------------------------------ configs
def test_released_config_forms_map_to_the_preset():
  base, dcfg = _preset()
  assert base.hf_family == dcfg.text.hf_family == families.UNIFIED
  # 5.23 saves per_layer_config instead of global_head_dim / num_global_key_value_heads.
  saved = transformers.Gemma4UnifiedConfig(**RELEASED_BASE).to_dict()
  assert "global_head_dim" not in saved["text_config"] and saved["text_config"]["per_layer_config"]
  for form in (RELEASED_TEXT, saved["text_config"]):
    assert config_lib.ModelConfig.from_hf_config(form) == base.architecture()
  # The multimodal forms add the patch embedder and Gemma4UnifiedConfig's token ids (the preset
  # is text-only).
  for form in (RELEASED_BASE, saved):
    assert config_lib.ModelConfig.from_hf_config(form) == _with_embedder(base.architecture())
  cfg_out = base.to_hf_config()
  assert cfg_out["model_type"] == "gemma4_unified_text" and "enable_moe_block" not in cfg_out
  hf = transformers.Gemma4UnifiedTextConfig(**cfg_out).to_dict()
  assert config_lib.ModelConfig.from_hf_config(hf) == base.architecture()

  saved = transformers.Gemma4UnifiedAssistantConfig(**RELEASED_ASSISTANT).to_dict()
  for form in (RELEASED_ASSISTANT, saved):
    d = config_lib.DrafterConfig.from_hf_config(form)
    assert d == dcfg.replace(text=dcfg.text.architecture())
  out = dcfg.to_hf_config()
  assert (out["model_type"], out["architectures"]) == ("gemma4_unified_assistant",
                                                       ["Gemma4UnifiedAssistantForCausalLM"])
  assert out["text_config"]["model_type"] == "gemma4_unified_text"
  dcfg.check_fits(base)
  assert base.store_layers == {S: 46, F: 47}  # the assistant reads the last sliding / full layer


def test_unified_refusals():
  base, _ = _preset()
  with pytest.raises(config_lib.ConfigError, match="hf_family"):
    base.replace(ple_dim=8, ple_vocab_size=16)
  with pytest.raises(config_lib.ConfigError, match="hf_family"):
    base.replace(hf_family="gemma5")
  with pytest.raises(config_lib.ConfigError, match="gemma4_unified_vision"):
    config_lib.ModelConfig.from_hf_config({"model_type": "gemma4_unified_vision"})
  with pytest.raises(config_lib.ConfigError, match="gemma4_unified_text"):
    config_lib.DrafterConfig.from_hf_config({"model_type": "gemma4_unified_text"})


def _hf_count(model) -> int:
  # HF keeps `layer_scalar` as a (saved) buffer; here it is a param.
  return sum(p.numel() for p in model.parameters()) + sum(
      b.numel() for n, b in model.named_buffers() if n.endswith("layer_scalar"))


def test_preset_param_counts_equal_hf_meta_builds():
  base, dcfg = _preset()
  ours = transformer.count_params(base)  # jax.eval_shape: nothing allocated
  shapes = jax.eval_shape(lambda r: drafter_lib.init_variables(dcfg, r), jax.random.PRNGKey(0))
  ours_d = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  with torch.device("meta"), hf_torch.hf_assistant_patch():
    text = transformers.Gemma4UnifiedForCausalLM(
        transformers.Gemma4UnifiedTextConfig(**base.to_hf_config()))
    full = transformers.Gemma4UnifiedForConditionalGeneration(
        transformers.Gemma4UnifiedConfig(**RELEASED_BASE))
    assistant = transformers.Gemma4UnifiedAssistantForCausalLM(
        transformers.Gemma4UnifiedAssistantConfig(**dcfg.to_hf_config()))
  assert ours == _hf_count(text) and ours_d == _hf_count(assistant)
  # The published counts (notes of the HF meta builds; the card: "11.95B", "423M") are HF's
  # parameters(), without the layer_scalar buffers (one per layer).
  params = lambda m: sum(p.numel() for p in m.parameters())
  assert params(text) == ours - base.num_layers == 11_907_350_272
  assert params(full) == 11_959_730_176  # + the vision and audio embedders
  # The patch embedder as params (audio stays carried through: 3840 x 640 = 2,457,600).
  assert transformer.count_params(_with_embedder(base)) == params(full) - 2_457_600 + base.num_layers
  assert params(assistant) == ours_d - dcfg.text.num_layers == 422_856_960


# ------------------------------------------------------------------------------ base parity
def _setup(seed=0):
  with hf_torch.hf_assistant_patch():  # the store layers the assistant reads
    hf = hf_helpers.hf_unified_causal_lm(seed=seed)
  cfg = config_lib.ModelConfig.from_hf_config(hf.config.to_dict())
  params = convert_base.state_dict_to_params(cfg, hf_helpers.numpy_state(hf))
  return hf, cfg, params


def test_logits_hidden_and_store_kv_equal_hf():
  hf, cfg, params = _setup()
  assert cfg.hf_family == families.UNIFIED and cfg.num_kv_shared_layers == 0
  with hf_torch.hf_assistant_patch():
    modes = hf.config.kv_sharing_modes
  assert sorted(cfg.store_layers.values()) == [i for i, m in enumerate(modes) if m == "store"]
  rng = np.random.default_rng(1)
  tokens, mask, positions = _left_padded(rng, 3, 17, cfg.vocab_size, pads=(0, 4, 9))
  assert tokens.shape[1] > 2 * cfg.sliding_window
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(positions), output_hidden_states=True,
             return_shared_kv_states=True)
  out = transformer.Transformer(cfg).apply(
      {"params": params}, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask > 0))
  valid = mask > 0
  logits = np.asarray(out.logits)
  assert np.abs(logits - ref.logits.numpy())[valid].max() <= TOL
  assert np.abs(np.asarray(out.hidden) - ref.hidden_states[-1].numpy())[valid].max() <= TOL
  assert logits[valid].std() > 0.5
  assert set(ref.shared_kv_states) == set(out.store_kv) == {S, F}
  for lt, (k, v) in ref.shared_kv_states.items():
    ours = out.store_kv[lt]
    np.testing.assert_allclose(np.asarray(ours.k)[valid], k.numpy().transpose(0, 2, 1, 3)[valid],
                               atol=TOL)
    np.testing.assert_allclose(np.asarray(ours.v)[valid], v.numpy().transpose(0, 2, 1, 3)[valid],
                               atol=TOL)


def test_prefill_then_decode_equals_full_forward():
  _, cfg, params = _setup(seed=2)
  model = transformer.Transformer(cfg)
  rng = np.random.default_rng(0)
  b, t, prompt = 2, 15, 5
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, t)))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  full = model.apply({"params": params}, tokens, pos)
  step = jax.jit(lambda c, tok, p: model.apply({"params": params}, tok, p, cache=c))
  out = step(kv_cache.init_cache(cfg, b, max_length=t + 3), tokens[:, :prompt], pos[:, :prompt])
  got, cache = [out.logits], out.cache
  for i in range(prompt, t - 3):  # one token at a time, then a 3-token verify chunk
    out = step(cache, tokens[:, i:i + 1], pos[:, i:i + 1])
    got.append(out.logits)
    cache = out.cache
  out = step(cache, tokens[:, t - 3:], pos[:, t - 3:])
  got.append(out.logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(got, axis=1)), np.asarray(full.logits),
                             atol=2e-5)
  for lt, skv in out.store_kv.items():
    np.testing.assert_allclose(np.asarray(skv.k)[:, :t], np.asarray(full.store_kv[lt].k),
                               atol=2e-5)


# ------------------------------------------------------------------------------ drafter
def _hf_assistant(ordered: bool, vocab_size: int = 256, seed: int = 5):
  assistant = hf_torch.hf_assistant(
      hf_helpers.hf_unified_assistant_config(vocab_size=vocab_size, ordered=ordered), seed=1)
  hf_helpers.randomize_(assistant, seed=seed)
  if ordered:
    perm = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(3))
    assistant.masked_embedding.token_ordering.copy_(perm)
  return assistant


@pytest.mark.parametrize("ordered", [False, True], ids=["tied", "ordered"])
def test_first_round_drafts_equal_hf(ordered, monkeypatch):
  k, p = 4, 12  # prompt longer than the window + 1: the sliding bound matters
  target, base, base_params = _setup()
  target.generation_config.eos_token_id = None
  assistant = _hf_assistant(ordered)
  assistant.generation_config.num_assistant_tokens = k
  prompt = torch.tensor(np.random.default_rng(0).integers(3, 256, (1, p)))
  hf_ids, hf_logits = _first_round(target, assistant, prompt, monkeypatch)
  assert hf_ids.shape == (1, p + 1 + k)

  dcfg = config_lib.DrafterConfig.from_hf_config(assistant.config.to_dict())
  assert dcfg.text.hf_family == families.UNIFIED and dcfg.use_ordered_embeddings == ordered
  dcfg.check_fits(base)
  variables = jax.tree.map(jnp.asarray, convert_drafter.state_dict_to_variables(
      dcfg, hf_helpers.numpy_state(assistant)))
  tokens = jnp.asarray(prompt.numpy())
  out = jit_base(base)(base_params, tokens, jnp.arange(p)[None])
  x_p = jnp.argmax(out.logits[:, -1], axis=-1)
  assert int(x_p[0]) == hf_ids[0, p]
  d = jit_draft(variables, dcfg, base_params["embedding"], out.store_kv, out.hidden[:, -1], x_p,
                jnp.array([p - 1]), num_draft_steps=k)
  np.testing.assert_array_equal(np.asarray(d.tokens), hf_ids[:, p + 1:])
  assert np.abs(np.asarray(d.logits) - hf_logits).max() <= TOL
  assert hf_logits.std() > 0.5


def test_speculative_greedy_equals_hf_greedy():
  hf, cfg, params = _setup()
  hf.generation_config.eos_token_id = None  # no stop: n tokens in every row
  assistant = _hf_assistant(ordered=False)
  dcfg = config_lib.DrafterConfig.from_hf_config(assistant.config.to_dict())
  dvars = jax.tree.map(jnp.asarray, convert_drafter.state_dict_to_variables(
      dcfg, hf_helpers.numpy_state(assistant)))
  prompts = [[2, 17, 60, 121, 9, 250, 33, 7, 40, 41, 42], [2, 5, 5, 99]]
  n, width = 16, 11
  ids = torch.tensor([[0] * (width - len(q)) + q for q in prompts])
  mask = (ids != 0).long()
  kw = dict(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
  with torch.no_grad():
    ref = hf.generate(input_ids=ids, attention_mask=mask, **kw)[:, width:].tolist()
    # HF's own assisted generation runs the pair (batch 1) inside the store patch.
    assistant.generation_config.num_assistant_tokens = 3
    with hf_torch.hf_assistant_patch():
      hf_spec = hf.generate(input_ids=torch.tensor([prompts[0]]), assistant_model=assistant, **kw)
  assert hf_spec[0, width:].tolist() == ref[0]
  plain = spec.decode_prompts(params, cfg, prompts, max_new_tokens=n)
  fast = spec.decode_prompts(params, cfg, prompts, drafter_vars=dvars, drafter_cfg=dcfg,
                             num_draft_tokens=3, max_new_tokens=n)
  assert plain.tokens == ref and fast.tokens == ref


# ------------------------------------------------------------------------------ converters, CLIs
def _multimodal(seed=3):
  cfg = transformers.Gemma4UnifiedConfig(
      text_config=hf_helpers.hf_unified_text_config().to_dict(),
      vision_config=dict(patch_size=4, pooling_kernel_size=2, mm_embed_dim=16, mm_posemb_size=32,
                         output_proj_dims=16),
      audio_config=dict(audio_embed_dim=8))
  torch.manual_seed(seed)
  model = transformers.Gemma4UnifiedForConditionalGeneration(cfg).eval()
  return hf_helpers.randomize_(model, seed=seed)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
  """HF dirs saved by transformers: a Gemma4UnifiedForCausalLM base, a
  Gemma4UnifiedForConditionalGeneration base (vision + audio embedders), a fitting assistant."""
  root = tmp_path_factory.mktemp("unified")
  dirs = {k: str(root / k) for k in ("base", "mm", "drafter")}
  with hf_torch.hf_assistant_patch():
    hf_helpers.hf_unified_causal_lm(seed=0).save_pretrained(dirs["base"])
    _multimodal().save_pretrained(dirs["mm"])
    _hf_assistant(ordered=True).save_pretrained(dirs["drafter"])
  return dirs


@pytest.mark.parametrize("which", ["base", "mm"])
def test_round_trip_is_bit_exact_and_loads_cleanly(src, tmp_path, which):
  pair_dir, out = tmp_path / "pair", tmp_path / "hf"
  _cli("hf-to-jax", "--base", src[which], "--drafter", src["drafter"], "--out", pair_dir)
  pair = checkpoint.load_pair(str(pair_dir))
  assert pair.base_cfg.hf_family == pair.drafter_cfg.text.hf_family == families.UNIFIED
  if which == "mm":  # the vision embedder is params (tests/test_unified_vision.py), audio extra
    with st_io.Reader(str(pair_dir / "hf_extra")) as extra:
      assert list(extra.keys()) == ["model.embed_audio.embedding_projection.weight"]
    assert "pos_embedding" in pair.params["base"]["vision"]
  _cli("jax-to-hf", "--checkpoint", pair_dir, "--out", out)
  _assert_same_files(src[which], out / "base")
  _assert_same_files(src["drafter"], out / "drafter", ["model.safetensors", "config.json"])
  # AutoModelForCausalLM: Gemma4UnifiedForCausalLM.from_pretrained of a ConditionalGeneration dir
  # loads nothing in transformers 5.23 (every key missing).
  with hf_torch.hf_assistant_patch():
    ref = _load_clean(transformers.AutoModelForCausalLM, src[which])
    model = _load_clean(transformers.AutoModelForCausalLM, out / "base")
    assistant = _load_clean(transformers.AutoModelForCausalLM, out / "drafter")
  assert type(model).__name__ == ("Gemma4UnifiedForCausalLM" if which == "base"
                                  else "Gemma4UnifiedForConditionalGeneration")
  assert type(assistant).__name__ == "Gemma4UnifiedAssistantForCausalLM"
  assert torch.equal(_logits(model, TOKENS), _logits(ref, TOKENS))
  model.generate(TOKENS[:1, :5], assistant_model=assistant, max_new_tokens=4, do_sample=False)


def test_from_scratch_export_writes_unified_configs(src, tmp_path):
  """A pair whose configs differ from the source's (here: none kept) gets configs generated with
  the unified classes, which torch loads with no missing / unexpected keys."""
  pair = checkpoint.load_pair(src["base"], drafter=src["drafter"])
  pair.meta["pair"]["hf_extra"] = {}
  checkpoint.export_hf(pair, str(tmp_path / "hf"))
  base_json = json.loads((tmp_path / "hf" / "base" / "config.json").read_text())
  drafter_json = json.loads((tmp_path / "hf" / "drafter" / "config.json").read_text())
  assert (base_json["model_type"], base_json["architectures"]) == (
      "gemma4_unified_text", ["Gemma4UnifiedForCausalLM"])
  assert (drafter_json["model_type"], drafter_json["architectures"]) == (
      "gemma4_unified_assistant", ["Gemma4UnifiedAssistantForCausalLM"])
  assert drafter_json["text_config"]["model_type"] == "gemma4_unified_text"
  with hf_torch.hf_assistant_patch():
    ref = _load_clean(transformers.AutoModelForCausalLM, src["base"])
    model = _load_clean(transformers.AutoModelForCausalLM, tmp_path / "hf" / "base")
    _load_clean(transformers.AutoModelForCausalLM, tmp_path / "hf" / "drafter")
  assert torch.equal(_logits(model, TOKENS), _logits(ref, TOKENS))
  again = checkpoint.load_pair(str(tmp_path / "hf" / "base"), drafter=str(tmp_path / "hf" / "drafter"))
  assert again.base_cfg == pair.base_cfg and again.drafter_cfg == pair.drafter_cfg


def test_generate_cli_takes_the_pair(src, capsys):
  common = ("--prompt-ids", "2,17,60,121,9,250", "--max-new-tokens", 12, "--no-stop", "--json")

  def run(*argv):
    assert generate_cli.main([str(a) for a in argv + common]) == 0
    return json.loads(capsys.readouterr().out)

  fast = run("--base", src["mm"], "--drafter", src["drafter"], "--num-draft-tokens", 3)
  plain = run("--base", src["mm"])
  assert fast["tokens"] == plain["tokens"] and fast["draft_rounds"] > 0


def test_trainer_trains_evaluates_and_exports_a_12b_style_pair_from_hf_dirs(tmp_path_factory):
  """`train` with `hf_base` / `hf_drafter` naming local 12B-style (gemma4_unified) HF dirs: it loads
  them, trains both, runs the eval (the shipped decoder) and the end-of-run HF assisted-generation
  check, and exports unified HF dirs again."""
  from tests import test_trainer as tt

  from gemma_mtp_jax.model import families
  from gemma_mtp_jax.training import config as train_config
  from gemma_mtp_jax.training import loop as trainer
  from gemma_mtp_jax.training import run_dir
  from gemma_mtp_jax.training import step as step_lib

  assets = tt.write_assets(str(tmp_path_factory.mktemp("unified_assets")))
  cfg = tt.small_config(assets, eval_prompts=2, eval_new_tokens=6, export_hf=True, hf_check=True)
  cfg.model.update(dict(hf_family=families.UNIFIED, ple_dim=0, ple_vocab_size=0,
                        num_kv_shared_layers=0))
  cfg.drafter.text.update(dict(hf_family=families.UNIFIED))
  base_cfg, dcfg, _ = train_config.validate_config(cfg)
  variables = jax.device_get(step_lib.random_variables(base_cfg, dcfg, 7, 0.02))
  pair = run_dir.random_pair(base_cfg, dcfg, variables, assets["tokenizer"])
  pair.params = variables
  src = str(tmp_path_factory.mktemp("unified_hf") / "hf")
  checkpoint.export_hf(pair, src)
  for d, model_type in (("base", "gemma4_unified_text"), ("drafter", "gemma4_unified_assistant")):
    with open(os.path.join(src, d, "config.json")) as f:
      assert json.load(f)["model_type"] == model_type
  cfg.hf_base, cfg.hf_drafter = os.path.join(src, "base"), os.path.join(src, "drafter")
  cfg.data.tokenizer = cfg.hf_base
  out = trainer.run(cfg, str(tmp_path_factory.mktemp("unified_run")))
  assert out["status"] == "finished" and out["step"] == cfg.train.num_steps
  assert out["eval"]["greedy/tokens_per_round"] >= 1.0
  assert out["hf"] is not None and out["hf"]["hf/same_as_trainer"] == 1.0
  with open(os.path.join(out["export"], "base", "config.json")) as f:
    assert json.load(f)["model_type"] == "gemma4_unified_text"
