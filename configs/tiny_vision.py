"""The tiny pair with a tiny Gemma 4 vision tower: image + text joint training on CPU.

Not a released model. The base is `configs/tiny.py`'s E-style decoder (PLE, KV sharing, double-wide
MLP, sliding/global mix, softcap) with a 2-layer vision tower in front of it and Gemma 4's
bidirectional attention over each image's soft tokens on sliding layers
(`use_bidirectional_attention="vision"`); the drafter is tiny's. The data is the image QA set the
package renders itself (`data/vision_qa.py`: coloured shapes, counts, positions; no download) with
the tiny tokenizer carrying Gemma 4's image tokens (image 1017, boi 1018, eoi 1019 of its 1024).

The tower's patch_size / pooling_kernel_size must be the data's (`data.vision`): 8 x 8-pixel
patches, 2 x 2 pooled into one soft token, at most 70 soft tokens (280 patches) per image slot; a
generated image is 4-36 soft tokens (16 on average), a QA record ~50 tokens, two or three per
128-token row, up to 4 images per row. `train.freeze_vision=False` here: both towers start from random init,
so the image tower must learn too (a pretrained pair keeps it frozen, the default).

  python -m gemma_mtp_jax.train --config=configs/tiny_vision.py --workdir=runs/tiny_vision
"""

from gemma_mtp_jax import presets
from gemma_mtp_jax.data import pipeline as data
from gemma_mtp_jax.training import config as train_config

VOCAB = 1024  # configs/tiny.py's
IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = VOCAB - 7, VOCAB - 6, VOCAB - 5  # the tiny multimodal tokenizer's


def get_config():
  """tiny's pair + a 2-layer vision tower (width 64) and the generated image QA data."""
  cfg = presets.load_config("tiny")
  cfg.name = "tiny_vision"
  cfg.model.vision = dict(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
      num_key_value_heads=2, head_dim=32, patch_size=8, pooling_kernel_size=2,
      position_embedding_size=128, rope_theta=100.0, rms_norm_eps=1e-6,
      hidden_activation="gelu_pytorch_tanh", use_clipped_linears=False, standardize=False)
  cfg.model.image_token_id = IMAGE_TOKEN
  cfg.model.boi_token_id = BOI_TOKEN
  cfg.model.eoi_token_id = EOI_TOKEN
  cfg.model.use_bidirectional_attention = "vision"
  cfg.train = train_config.train_fields(**{
      **cfg.train.to_dict(),
      "seq_len": 128, "num_steps": 300, "warmup_steps": 30, "eval_every": 0, "save_every": 150,
      "eval_prompts": 32, "eval_new_tokens": 16, "eval_max_prompt_len": 100,
      "freeze_vision": False})
  cfg.data = _data()
  return cfg


def _data():
  """The generated image QA set, its images sized for this tower."""
  cfg = data.vision_qa_data_config()
  cfg.tiny_vocab_size = VOCAB
  cfg.eval_fraction = 0.02
  cfg.eval_max_batches = 4
  return cfg
