"""The trainer on image data, end to end: a small pair with a vision tower trains on the generated
image QA set, evaluates greedy speculative decoding on held-out image prompts, exports an HF
`Gemma4ForConditionalGeneration` dir with its processor files, and HF assisted generation with the
images reproduces the trainer's JAX greedy output; `generate --image` decodes from the workdir."""

import json
import os

import numpy as np
import PIL.Image
import pytest

from gemma_mtp_jax import generate as generate_cli
from gemma_mtp_jax.data import images as images_lib
from gemma_mtp_jax.data import tokenizer as tokenizer_lib
from gemma_mtp_jax.data import vision_qa
from gemma_mtp_jax.training import loop as trainer
from gemma_mtp_jax.training import step as step_lib
from tests import test_trainer as tt

VOCAB = tt.VOCAB
IMAGE, BOI, EOI = VOCAB - 7, VOCAB - 6, VOCAB - 5  # the tiny multimodal tokenizer's last ids
SIZES = dict(max_soft_tokens=70, patch_size=8, pooling_kernel_size=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("vision_run")
  jsonl = vision_qa.build_vision_qa(str(root / "qa"), num_records=80, seed=1)
  texts = []
  with open(jsonl) as f:
    for line in f:
      for m in json.loads(line)["messages"]:
        texts += [p["text"] for p in m["content"] if p.get("type") == "text"] if isinstance(
            m["content"], list) else [m["content"]]
  tok_dir = str(root / "tok")
  tokenizer_lib.build_tiny_tokenizer(texts * 4, tok_dir, vocab_size=VOCAB, multimodal=True)
  cfg = tt.small_config(tt.write_assets(str(root / "text")), eval_prompts=2, eval_new_tokens=6,
                        seq_len=128, batch_size=4, num_steps=2, save_every=2, export_hf=True,
                        hf_check=True, eval_max_prompt_len=100, freeze_vision=False)
  cfg.model.vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=8, patch_size=8,
                          pooling_kernel_size=2, position_embedding_size=64)
  cfg.model.update(dict(image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI,
                        use_bidirectional_attention="vision"))
  cfg.data.sources = [dict(name="qa", path=jsonl, weight=1.0, schema="messages")]
  cfg.data.tokenizer = tok_dir
  cfg.data.vision = dict(SIZES, max_images_per_row=3)
  workdir = str(root / "run")
  return dict(out=trainer.run(cfg, workdir), workdir=workdir, cfg=cfg, root=root)


def test_image_run_evaluates_exports_and_hf_agrees(run):
  out = run["out"]
  assert out["status"] == "finished"
  # The eval decoded held-out prompts that hold images.
  assert any(t == IMAGE for p in out["prompts"] for t in p.tolist())
  hf = out["hf"]
  assert hf["hf/rounds"] > 0
  assert hf["hf/same_as_trainer"] == 1.0  # HF assisted greedy with the images == JAX greedy
  base_dir = os.path.join(out["export"], "base")
  for name in ("processor_config.json", "tokenizer.json", "chat_template.jinja"):
    assert os.path.isfile(os.path.join(base_dir, name)), name
  import transformers
  model = transformers.Gemma4ForConditionalGeneration.from_pretrained(base_dir)
  assert model.config.vision_config.hidden_size == 16
  assert model.config.image_token_id == IMAGE
  processor = images_lib.load_processor(base_dir)
  assert processor.image_processor.max_soft_tokens == 70
  assert processor.tokenizer.convert_tokens_to_ids(processor.image_token) == IMAGE


def test_vision_tower_trains_only_when_asked(run):
  """freeze_vision=False here: the tower moved; the default freezes it out of the optimizer."""
  params = {"base": {"vision": {"w": np.zeros(2)}, "embedding": np.zeros(2)},
            "drafter": {"x": np.zeros(2)}}
  frozen = step_lib.trainable_mask(params, step_lib.TrainConfig())
  assert frozen["base"]["vision"]["w"] is False and frozen["base"]["embedding"] is True
  trained = step_lib.trainable_mask(params, step_lib.TrainConfig(freeze_vision=False))
  assert trained["base"]["vision"]["w"] is True


def test_generate_with_an_image_from_the_workdir(run, capsys):
  image = run["root"] / "shape.png"
  PIL.Image.new("RGB", (40, 24), (200, 30, 30)).save(image)
  code = generate_cli.main(["--base", run["workdir"], "--image", str(image), "--prompt",
                            "What shape is it?", "--chat", "--max-new-tokens", "4", "--json"])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  assert json.loads(captured.out)["images"] == 1
