"""Gemma 4 E2B (google/gemma-4-E2B-it) with its MTP assistant (google/gemma-4-E2B-it-assistant).

Where the numbers come from:
- Base: the `text_config` of the released config.json as copied verbatim into public parser tests
  (a Rust config-parser test holding the full E2B config.json; a Swift MLX test; an MLX Go test),
  cross-checked with /work/shared/reference/gemma4-released-configs.md. hidden 1536, 35 layers,
  8 heads / 1 KV head, head_dim 256 / global 512, intermediate 6144 with use_double_wide_mlp (12288 on
  the 20 KV-shared layers), window 512, PLE 256 x 262144, max_position_embeddings 131072, full layers at
  4, 9, ..., 34 (period 5: `layer_types_from_pattern(35, 5)` reproduces the released list exactly).
- Assistant: the released google/gemma-4-E2B-it-assistant config.json (a `cat` of the HF snapshot
  2d874ef7 found in a public log): hidden 256, intermediate 2048, 4 heads / 1 KV head, head_dim 256 /
  512, window 512, final_logit_softcapping null, max_position_embeddings 131072, ordered embeddings with
  2048 centroids, top-k 32, backbone_hidden_size 1536.
Unconfirmed: nothing architectural. The `train` numbers are placeholders, not a published recipe;
batch_size fits v5e-8 (one 4096-token row per chip) in the AOT memory plan (README).
"""

from gemma_mtp_jax.model import config as mc
from gemma_mtp_jax import presets
from gemma_mtp_jax.training import config as train_config


def get_config():
  """The E2B pair: base + assistant, with train placeholders."""
  base = presets.text_fields(
      vocab_size=262_144,
      embed_dim=1536,
      num_layers=35,
      num_heads=8,
      num_kv_heads=1,
      head_dim=256,
      global_head_dim=512,
      hidden_dim=6144,
      use_double_wide_mlp=True,
      layer_types=mc.layer_types_from_pattern(35, 5),
      sliding_window=512,
      ple_dim=256,
      ple_vocab_size=262_144,
      num_kv_shared_layers=20,
      final_logit_softcap=30.0,
      max_position_embeddings=131_072,
      dtype="bfloat16",
      param_dtype="float32",
      remat_policy="full",
      attention_chunk_size=512,  # query blocks: no [T, T] scores in training
  )
  drafter_text = presets.text_fields(
      vocab_size=262_144,
      embed_dim=256,
      num_layers=4,
      num_heads=4,
      num_kv_heads=1,  # reads the base's sliding/full KV, so it must equal the base's
      head_dim=256,
      global_head_dim=512,
      hidden_dim=2048,
      layer_types=(mc.SLIDING, mc.SLIDING, mc.SLIDING, mc.FULL),
      sliding_window=512,
      num_kv_shared_layers=4,  # every assistant layer reads the base's KV
      final_logit_softcap=None,  # released assistants ship final_logit_softcapping: null
      max_position_embeddings=131_072,
      attention_chunk_size=512,
      dtype="bfloat16",
      param_dtype="float32",
  )
  return presets.make_config(
      name="e2b",
      model=base,
      drafter=presets.drafter_fields(drafter_text, backbone_hidden_size=1536,
                                     use_ordered_embeddings=True, num_centroids=2048,
                                     centroid_intermediate_top_k=32),
      hf_base="google/gemma-4-E2B-it",
      hf_drafter="google/gemma-4-E2B-it-assistant",
      train=train_config.train_fields(seq_len=4096, batch_size=8, learning_rate=1e-5,
                                      warmup_steps=100, num_steps=10_000,
                                      loss_chunk_size=256),
  )
