"""Gemma 4 31B (google/gemma-4-31B-it, dense) with its assistant (google/gemma-4-31B-it-assistant).

Where the numbers come from:
- Base: the `text_config` of the released config.json as quoted in public sources (a JAX port's
  EXPECTED_CONFIG for google/gemma-4-31B-it, a Rust parser's B31_JSON and b31_preset, a Python
  config-shape test, an HF-to-vLLM calculator fixture), cross-checked with
  /work/shared/reference/gemma4-released-configs.md. hidden 5376, 60 layers, 32 heads / 16 KV heads
  (4 KV heads on global layers, with attention_k_eq_v), head_dim 256 / 512, intermediate 21504,
  window 1024, no PLE, no KV sharing, max_position_embeddings 262144, full layers at 5, 11, ..., 59
  (`layer_types_from_pattern(60, 6)` reproduces the released list exactly).
- Assistant: the mlx-swift-lm Gemma4Assistant test fixture (backbone 5376, hidden 1024, intermediate
  8192, 32 heads / 16 KV heads, 4 global KV heads, k_eq_v, layers [s, s, s, f]), a public drafter write-up
  that read the four assistant config.json files (window 1024, max_position_embeddings 262144,
  final_logit_softcapping null, no ordered embeddings), and the reference table.
Unconfirmed: the reference table marks the 31B assistant "(?)"; the numbers above agree across the two
independent public sources but none is a verbatim copy of its config.json.
Note: as for 26B-A4B, the assistant reads the KV of the base's last sliding (58) and full (59) layer.
The `train` numbers are placeholders, not a published recipe; batch_size fits v5p-64 (one row per chip)
in the AOT memory plan (README).
"""

from gemma_mtp_jax.model import config as mc
from gemma_mtp_jax import presets
from gemma_mtp_jax.training import config as train_config


def get_config():
  """The 31B pair: dense base + assistant, with train placeholders."""
  base = presets.text_fields(
      vocab_size=262_144,
      embed_dim=5376,
      num_layers=60,
      num_heads=32,
      num_kv_heads=16,
      num_global_kv_heads=4,
      attention_k_eq_v=True,
      head_dim=256,
      global_head_dim=512,
      hidden_dim=21_504,
      layer_types=mc.layer_types_from_pattern(60, 6),
      sliding_window=1024,
      ple_dim=0,
      ple_vocab_size=0,
      num_kv_shared_layers=0,
      final_logit_softcap=30.0,
      use_bidirectional_attention="vision",  # image tokens attend both ways
      max_position_embeddings=262_144,
      dtype="bfloat16",
      param_dtype="float32",
      remat_policy="full",
      attention_chunk_size=512,  # query blocks: no [T, T] scores in training
  )
  drafter_text = presets.text_fields(
      vocab_size=262_144,
      embed_dim=1024,
      num_layers=4,
      num_heads=32,
      num_kv_heads=16,  # reads the base's sliding/full KV, so it must equal the base's
      num_global_kv_heads=4,
      attention_k_eq_v=True,
      head_dim=256,
      global_head_dim=512,
      hidden_dim=8192,
      layer_types=(mc.SLIDING, mc.SLIDING, mc.SLIDING, mc.FULL),
      sliding_window=1024,
      num_kv_shared_layers=4,  # every assistant layer reads the base's KV
      final_logit_softcap=None,  # released assistants ship final_logit_softcapping: null
      max_position_embeddings=262_144,
      attention_chunk_size=512,
      dtype="bfloat16",
      param_dtype="float32",
  )
  return presets.make_config(
      name="31b",
      model=base,
      drafter=presets.drafter_fields(drafter_text, backbone_hidden_size=5376,
                                     use_ordered_embeddings=False, num_centroids=2048,
                                     centroid_intermediate_top_k=32),
      hf_base="google/gemma-4-31B-it",
      hf_drafter="google/gemma-4-31B-it-assistant",
      train=train_config.train_fields(seq_len=4096, batch_size=32, learning_rate=1e-5,
                                      warmup_steps=100, num_steps=10_000,
                                      loss_chunk_size=1024),
  )
