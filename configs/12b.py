"""Gemma 4 12B "unified" (google/gemma-4-12B-it, dense) with its assistant (google/gemma-4-12B-it-assistant).

transformers (>= 5.10) names this family `gemma4_unified` (text decoder `gemma4_unified_text`, assistant
`gemma4_unified_assistant`); its text decoder is the gemma4 one without per-layer embeddings and MoE
(`hf_family="gemma4_unified"`: the same model code; `presets.text_fields` gives the fields the family
sets from its entry in `checkpoint.hf_config.FAMILIES`: image masks and the image front end; the
unified names on export).

Where the numbers come from:
- Base: the released config.json of google/gemma-4-12B (revision 56820d7d8cbe, written by transformers
  5.10.0.dev0) as printed in a public log, the same `text_config` in an mlx-swift test fixture
  (`gemma4Unified12BConfigDecode`), sglang issue #27261 for -it ("48 layers, hidden 3840, No PLE, sliding
  1024 + full every 6th, global_head_dim 512") and the model card ("11.95B, 48 layers, 1024 window, 262K
  vocab, 256K context"). hidden 3840, 48 layers, 16 heads / 8 KV heads (1 KV head on global layers, with
  attention_k_eq_v: no v_proj there), head_dim 256 / 512, intermediate 15360, window 1024, no PLE, no
  MoE, no KV sharing, final softcap 30, max_position_embeddings 262144, full layers at 5, 11, ..., 47
  (`layer_types_from_pattern(48, 6)`). 11,907,350,272 text parameters (the HF meta build of the released
  config: 11,959,730,176 with the 49.9M vision and 2.5M audio embedders, which are carried through
  untouched, not trained; tests/test_transformer_hf.py checks both).
- Assistant: the model card ("423M"), three third-party loaders' test fixtures that say they mirror the
  released config.json (two Rust, one mlx-swift) and a README describing the projections: backbone
  3840, hidden 1024, intermediate 8192, 16 heads / 8 KV heads (1 global, k_eq_v), head_dim 256 / 512,
  layers [s, s, s, f], window 1024, final_logit_softcapping null, no ordered embeddings (num_centroids
  2048 / top-k 32 are written but unused). 422,856,960 parameters (HF meta build; checked).
Unconfirmed: the -it config.json was not seen verbatim (the pt one was; card, vLLM and sglang treat
them as one architecture), nor the assistant's (its numbers agree across the fixtures and the
parameter count equals the card's); the assistant's rope parameters (taken equal to the base's) and
max_position_embeddings 262144; the -it generation_config's eos list.
Note: the base shares no K/V between its own layers, so the assistant reads the K/V of its last sliding
(46) and last full (47) layer (`ModelConfig.store_layers`; llama.cpp asserts the same). transformers
5.23 builds no such "store" layers: HF assisted generation runs the pair only inside
`hf_torch.hf_assistant_patch`.
The `train` numbers are placeholders, not a published recipe; batch_size fits v5p-32 (two rows per chip)
in the AOT memory plan (README), and v5e-64 with `--config.mesh.axes.fsdp=32
--config.mesh.axes.tensor=2` (15.7 of 16 GiB); v5p-16 (four rows per chip) and v5e-32 (one row per chip,
28 GiB of 16) do not fit.
"""

from gemma_mtp_jax import presets
from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.model import config as mc
from gemma_mtp_jax.training import config as train_config


def get_config():
  """The 12B pair: dense unified base + assistant, with train placeholders."""
  base = presets.text_fields(
      vocab_size=262_144,
      embed_dim=3840,
      num_layers=48,
      num_heads=16,
      num_kv_heads=8,
      num_global_kv_heads=1,
      attention_k_eq_v=True,
      head_dim=256,
      global_head_dim=512,
      hidden_dim=15_360,
      layer_types=mc.layer_types_from_pattern(48, 6),
      sliding_window=1024,
      ple_dim=0,
      ple_vocab_size=0,
      num_kv_shared_layers=0,
      final_logit_softcap=30.0,
      use_bidirectional_attention="vision",  # image tokens attend both ways
      max_position_embeddings=262_144,
      hf_family=hf_config.UNIFIED,
      dtype="bfloat16",
      param_dtype="float32",
      remat_policy="full",
      attention_chunk_size=512,  # query blocks: no [T, T] scores in training
  )
  drafter_text = presets.text_fields(
      vocab_size=262_144,
      embed_dim=1024,
      num_layers=4,
      num_heads=16,
      num_kv_heads=8,  # reads the base's sliding/full KV, so it must equal the base's
      num_global_kv_heads=1,
      attention_k_eq_v=True,
      head_dim=256,
      global_head_dim=512,
      hidden_dim=8192,
      layer_types=(mc.SLIDING, mc.SLIDING, mc.SLIDING, mc.FULL),
      sliding_window=1024,
      ple_dim=0,
      ple_vocab_size=0,
      num_kv_shared_layers=4,  # every assistant layer reads the base's KV
      final_logit_softcap=None,  # released assistants ship final_logit_softcapping: null
      max_position_embeddings=262_144,
      hf_family=hf_config.UNIFIED,
      attention_chunk_size=512,
      dtype="bfloat16",
      param_dtype="float32",
  )
  return presets.make_config(
      name="12b",
      model=base,
      drafter=presets.drafter_fields(drafter_text, backbone_hidden_size=3840,
                                     use_ordered_embeddings=False, num_centroids=2048,
                                     centroid_intermediate_top_k=32),
      hf_base="google/gemma-4-12B-it",
      hf_drafter="google/gemma-4-12B-it-assistant",
      train=train_config.train_fields(seq_len=4096, batch_size=32, learning_rate=1e-5,
                                 warmup_steps=100, num_steps=10_000,
                                 loss_chunk_size=1024),
  )
