"""Gemma 4 26B-A4B (google/gemma-4-26B-A4B-it, MoE) with its assistant (google/gemma-4-26B-A4B-it-assistant).

Where the numbers come from:
- Base: the `text_config` of the released config.json as quoted in public parser tests (an MLX Go
  `TestParseTextConfig26B` fixture listing all 30 layer types; a Rust `Gemma4Config` SAMPLE; a Rust
  `test_gemma4_config_parse`; the mlx-swift-lm MoE decoding test), cross-checked with
  /work/shared/reference/gemma4-released-configs.md. hidden 2816, 30 layers, 16 heads / 8 KV heads
  (2 KV heads on global layers, with attention_k_eq_v), head_dim 256 / 512, dense MLP 2112 next to an
  MoE block of 128 experts, top-8, expert size 704, window 1024, no PLE (hidden_size_per_layer_input 0),
  no KV sharing, full layers at 5, 11, ..., 29 (the reference table's "(?)" on the pattern is settled by
  the 30-entry list; `layer_types_from_pattern(30, 6)` reproduces it exactly).
- Assistant: a public drafter write-up that read the four assistant config.json files, and the reference
  table: hidden 1024, intermediate 8192, 16 heads / 8 KV heads (2 global, k_eq_v), head_dim 256 / 512,
  window 1024, max_position_embeddings 262144, final_logit_softcapping null, no ordered embeddings
  (num_centroids 2048 / top-k 32 are still written in the config but unused), backbone_hidden_size 2816.
Unconfirmed: max_position_embeddings 262144 (two fixtures say 262144, one Go fixture 131072; it does not
change any weight). The assistant numbers are not from a verbatim copy of its config.json.
Note: the base shares no KV between its own layers, yet the assistant reads the KV of its last sliding
(28) and last full (29) layer; `ModelConfig.store_layers` defines those for this case too.
The `train` numbers are placeholders, not a published recipe; batch_size fits v5p-32 (two rows per chip)
in the AOT memory plan (README).
"""

from gemma_mtp_jax.model import config as mc
from gemma_mtp_jax import presets
from gemma_mtp_jax.training import config as train_config


def get_config():
  """The 26B-A4B pair: MoE base + assistant, with train placeholders."""
  base = presets.text_fields(
      vocab_size=262_144,
      embed_dim=2816,
      num_layers=30,
      num_heads=16,
      num_kv_heads=8,
      num_global_kv_heads=2,
      attention_k_eq_v=True,
      head_dim=256,
      global_head_dim=512,
      hidden_dim=2112,
      enable_moe=True,
      num_experts=128,
      top_k_experts=8,
      moe_hidden_dim=704,
      layer_types=mc.layer_types_from_pattern(30, 6),
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
      num_heads=16,
      num_kv_heads=8,  # reads the base's sliding/full KV, so it must equal the base's
      num_global_kv_heads=2,
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
      # K scan steps x 4 layers of [rows, 8192]-wide MLP activations would otherwise stay live for
      # the backward (about 34 GiB per chip at 2 x 4096 rows): keep only each step's carried hidden.
      remat_policy="full",
  )
  return presets.make_config(
      name="26b_a4b",
      model=base,
      drafter=presets.drafter_fields(drafter_text, backbone_hidden_size=2816,
                                     use_ordered_embeddings=False, num_centroids=2048,
                                     centroid_intermediate_top_k=32),
      hf_base="google/gemma-4-26B-A4B-it",
      hf_drafter="google/gemma-4-26B-A4B-it-assistant",
      train=train_config.train_fields(seq_len=4096, batch_size=32, learning_rate=1e-5,
                                      warmup_steps=100, num_steps=10_000,
                                      loss_chunk_size=1024),
  )
