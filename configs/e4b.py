"""Gemma 4 E4B (google/gemma-4-E4B-it) with its MTP assistant (google/gemma-4-E4B-it-assistant).

Where the numbers come from:
- Base: the `text_config` of the released config.json as copied into public parser tests (a Rust
  Gemma 4 config parser's E4B_JSON fixture; an MLX Go `TestParseTextConfigE4B` fixture; a Swift test),
  cross-checked with /work/shared/reference/gemma4-released-configs.md. hidden 2560, 42 layers, 8 heads
  / 2 KV heads, head_dim 256 / global 512, intermediate 10240, use_double_wide_mlp false (unlike E2B),
  window 512, PLE 256 x 262144, 18 KV-shared layers, max_position_embeddings 131072, full layers at
  5, 11, ..., 41 (period 6: `layer_types_from_pattern(42, 6)` reproduces the released list exactly).
- Assistant: google/gemma-4-E4B-it-assistant config.json as quoted in public parser tests (a Rust
  `config_parses_real_json` fixture, a Zig drafter test) and a public drafter write-up that read all four
  assistant configs: hidden 256, intermediate 2048, 4 heads / 2 KV heads, head_dim 256 / 512, window 512,
  ordered embeddings (2048 centroids, top-k 32), backbone_hidden_size 2560.
- Vision tower: transformers' Gemma4VisionConfig defaults (documented against the E2B checkpoint) with
  the E-size choices a public parser's "official size" fixture makes for bases narrower than 2816:
  768 wide, 16 layers, 12 heads of 64, MLP 3072, clipped linears, no standardisation; patch 16 pooled
  3 x 3 (280 soft tokens per image by default); image / boi / eoi ids 258880 / 255999 / 258882
  (Gemma4Config's defaults); bidirectional attention over image tokens on sliding layers.
Unconfirmed: the vision numbers (not from a verbatim copy of E4B's config.json; a checkpoint's own
config.json wins on load) and the assistant's final_logit_softcapping (null) and max_position_embeddings (131072) come
from that write-up and the E2B assistant's verbatim config.json, not from an E4B-assistant copy.
The `train` numbers are placeholders, not a published recipe; batch_size fits v5e-16 (one 4096-token row per chip)
in the AOT memory plan (README).
"""

from gemma_mtp_jax.model import config as mc
from gemma_mtp_jax import presets
from gemma_mtp_jax.training import config as train_config


def get_config():
  """The E4B pair: base + assistant, with train placeholders."""
  base = presets.text_fields(
      vocab_size=262_144,
      embed_dim=2560,
      num_layers=42,
      num_heads=8,
      num_kv_heads=2,
      head_dim=256,
      global_head_dim=512,
      hidden_dim=10_240,
      use_double_wide_mlp=False,
      layer_types=mc.layer_types_from_pattern(42, 6),
      sliding_window=512,
      ple_dim=256,
      ple_vocab_size=262_144,
      num_kv_shared_layers=18,
      final_logit_softcap=30.0,
      max_position_embeddings=131_072,
      dtype="bfloat16",
      param_dtype="float32",
      remat_policy="full",
      attention_chunk_size=512,  # query blocks: no [T, T] scores in training
      vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16,
                  num_attention_heads=12, num_key_value_heads=12, head_dim=64, patch_size=16,
                  pooling_kernel_size=3, position_embedding_size=10_240, rope_theta=100.0,
                  use_clipped_linears=True, standardize=False),
      image_token_id=258_880,
      boi_token_id=255_999,
      eoi_token_id=258_882,
      use_bidirectional_attention="vision",
  )
  drafter_text = presets.text_fields(
      vocab_size=262_144,
      embed_dim=256,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,  # reads the base's sliding/full KV, so it must equal the base's
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
      name="e4b",
      model=base,
      drafter=presets.drafter_fields(drafter_text, backbone_hidden_size=2560,
                                     use_ordered_embeddings=True, num_centroids=2048,
                                     centroid_intermediate_top_k=32),
      hf_base="google/gemma-4-E4B-it",
      hf_drafter="google/gemma-4-E4B-it-assistant",
      train=train_config.train_fields(seq_len=4096, batch_size=16, learning_rate=1e-5,
                                      warmup_steps=100, num_steps=10_000,
                                      loss_chunk_size=256),
  )
