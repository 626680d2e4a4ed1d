"""A CPU-sized Gemma 4 pair with every E2B/E4B feature, for the default run and the tests.

Not a released model: the sizes are chosen so one train / eval / export cycle takes minutes on a CPU.
It keeps what makes Gemma 4 E2B/E4B different from a plain decoder, so the code paths the real presets
need are all exercised: per-layer embeddings (PLE), KV sharing (the last 2 layers read layers 2 and 3),
the double-wide MLP on KV-shared layers, a sliding/global mix with a window (16) far below seq_len,
global_head_dim > head_dim with proportional RoPE (partial factor 0.25) on global layers, and the final
logit softcap. The drafter mirrors the released E2B/E4B assistants: 4 layers [s, s, s, f] reading the
base's KV, no softcap, ordered (centroid) embeddings.

vocab_size 1024 is the size of the SentencePiece vocab trained on the local corpus (data.tiny_vocab_size);
the special ids (pad 0, eos 1, bos 2) follow Gemma's, so that vocab must reserve them in that order. At
this model size the [B, T, V] heads (the base's and K = 4 drafter steps') dominate a CPU step: 1024
tokens instead of 4096 makes the step ~25% cheaper, and a smaller vocab's tokens are easier to draft.

The `train` section is the embedded default run (`python -m gemma_mtp_jax.train`): both models from
random init, jointly, on the local corpus, 600 steps of 8 x 128 tokens, on a 2-core CPU in about ten
minutes with eval, export and the HF check. See the comments there for lambda and the step size.
"""

from gemma_mtp_jax.model import config as mc
from gemma_mtp_jax.data import pipeline as data
from gemma_mtp_jax import presets
from gemma_mtp_jax.training import config as train_config

VOCAB = 1024  # the SentencePiece vocab trained on the local corpus (data.tiny_vocab_size)


def get_config():
  """The tiny pair: 6-layer base (embed 128) + 4-layer drafter (embed 64), CPU training defaults."""
  base = presets.text_fields(
      vocab_size=VOCAB,
      embed_dim=128,
      num_layers=6,
      num_heads=4,
      num_kv_heads=1,
      head_dim=32,
      global_head_dim=64,
      hidden_dim=512,
      use_double_wide_mlp=True,  # layers 4 and 5 get a 1024-wide MLP, as E2B's shared layers do
      layer_types=mc.layer_types_from_pattern(6, 3),  # s s f s s f
      sliding_window=16,
      ple_dim=16,
      ple_vocab_size=VOCAB,
      num_kv_shared_layers=2,
      final_logit_softcap=30.0,
      max_position_embeddings=4096,
  )
  drafter_text = presets.text_fields(
      vocab_size=VOCAB,
      embed_dim=64,
      num_layers=4,
      num_heads=2,
      num_kv_heads=1,  # reads the base's KV, so it must equal the base's
      head_dim=32,
      global_head_dim=64,
      hidden_dim=256,
      layer_types=(mc.SLIDING, mc.SLIDING, mc.SLIDING, mc.FULL),
      sliding_window=16,
      num_kv_shared_layers=4,
      final_logit_softcap=None,
      max_position_embeddings=4096,
  )
  return presets.make_config(
      name="tiny",
      model=base,
      # 64 centroids of 16 tokens; top-8 scores 128 of the 1024 tokens. The released assistants keep
      # 1/64 of the vocab (32 of 2048 centroids); a tiny vocab needs a larger share for usable recall
      # (the eval reports the dense head's accepted length beside the masked one's: equal here).
      drafter=presets.drafter_fields(drafter_text, backbone_hidden_size=128,
                                     use_ordered_embeddings=True, num_centroids=64,
                                     centroid_intermediate_top_k=8),
      hf_base=None,
      hf_drafter=None,
      train=train_config.train_fields(
          # Many small steps beat fewer big ones this early in training: 8 x 128 tokens per step.
          seq_len=128, batch_size=8, learning_rate=6e-3, warmup_steps=30, num_steps=600,
          min_learning_rate_ratio=0.1, weight_decay=0.01, adam_b2=0.98,
          # lambda: 0.01 is the fine-tuning value for a pretrained base, where the base loss is
          # already low and must not move much. From scratch, with 0.01 the drafter barely learns
          # while the base does; at 1.0 both learn at the same pace (the drafter's K steps then
          # weigh 4x the base loss on the shared trunk, which costs the base little here).
          drafter_loss_weight=1.0,
          init_embedding_std=0.02,
          log_every=10, eval_every=200, save_every=200, keep_checkpoints=2,
          # prompt + continuation fit one 128-token row: the greedy eval reuses the eval program
          eval_prompts=48, eval_new_tokens=48, eval_max_prompt_len=80,
          hf_check=True),
      data=_data(),
  )


def _data():
  """The local corpus (pydoc topics and stdlib code) with the tokenizer trained on it."""
  cfg = data.default_data_config()
  cfg.tiny_vocab_size = VOCAB
  cfg.eval_fraction = 0.03  # ~130 held-out documents; the prompts of the greedy eval come from them
  cfg.eval_max_batches = 8
  return cfg
