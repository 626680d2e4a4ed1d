"""`python -m gemma_mtp_jax.generate` on tiny random HF dirs and a converted pair dir: the JSON
report and speculative == plain tokens (for both families: gemma4's and the 12B's), text prompts
through the tokenizer, and clear errors."""

import glob
import json
import os
import re

import numpy as np
import pytest
import torch
import transformers

from gemma_mtp_jax import hf_torch
from gemma_mtp_jax.checkpoint import pair as checkpoint
from gemma_mtp_jax import generate as cli
from gemma_mtp_jax.decoding import speculative
from gemma_mtp_jax.data import chat as chat_lib
from gemma_mtp_jax.data import tokenizer as tokenizer_lib
from gemma_mtp_jax.checkpoint import safetensors_io as io
from tests import hf_helpers

S, F = hf_helpers.S, hf_helpers.F
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 448  # the tiny tokenizer's vocab (> 256 byte pieces + chars); 16 centroids divide it
MAX_POS = 96  # the base's max_position_embeddings: the cache limit
KEYS = {"tokens", "text", "target_forwards", "draft_rounds", "drafted", "accepted",
        "mean_accepted_length", "rounds", "acceptance", "tokens_per_second", "prefill_seconds",
        "decode_seconds"}


@pytest.fixture(scope="module", autouse=True)
def _assistant_kv_sharing():
  """transformers 5.23's `kv_sharing_modes` raises when every layer is KV-shared (the assistant's
  case); `hf_torch.hf_assistant_patch` reports them all as "reuse" for this module."""
  with hf_torch.hf_assistant_patch():
    yield


def _assistant(backbone=64, seed=5):
  text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=32,
              layer_types=[S, F], sliding_window=6, hidden_size_per_layer_input=0,
              vocab_size_per_layer_input=0, final_logit_softcapping=None)
  cfg = transformers.Gemma4AssistantConfig(text_config=text, backbone_hidden_size=backbone,
                                           use_ordered_embeddings=True, num_centroids=16,
                                           centroid_intermediate_top_k=4)
  model = hf_helpers.randomize_(transformers.Gemma4AssistantForCausalLM(cfg).eval(), seed=seed)
  with torch.no_grad():
    model.masked_embedding.token_ordering.copy_(
        torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed)))
  return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """HF dirs: base (with the tiny tokenizer), the same base without tokenizer files, a fitting
  assistant, an assistant for a wider base; and the pair dir `convert hf-to-jax` makes of them."""
  root = tmp_path_factory.mktemp("gen")
  out = {k: str(root / k) for k in ("base", "bare", "drafter", "misfit", "pair")}
  texts = [open(p).read() for p in sorted(glob.glob(os.path.join(REPO, "gemma_mtp_jax", "*.py")))]
  tok_dir = str(root / "tok")
  tokenizer_lib.build_tiny_tokenizer(texts, tok_dir, vocab_size=VOCAB)
  base = hf_helpers.hf_causal_lm("e_style", vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB,
                                 max_position_embeddings=MAX_POS)
  base.save_pretrained(out["base"])
  base.save_pretrained(out["bare"])
  io.copy_files(tok_dir, os.listdir(tok_dir), out["base"])
  _assistant().save_pretrained(out["drafter"])
  _assistant(backbone=32).save_pretrained(out["misfit"])
  checkpoint.hf_to_jax(out["base"], out["pair"], drafter=out["drafter"])
  return out


@pytest.fixture(scope="module")
def unified_dirs(dirs, tmp_path_factory):
  """The 12B family's HF dirs: a Gemma4UnifiedForConditionalGeneration base (with `dirs`'
  tokenizer) and a fitting assistant; and the pair dir `convert hf-to-jax` makes of them."""
  root = tmp_path_factory.mktemp("gen_unified")
  out = {k: str(root / k) for k in ("base", "drafter", "pair")}
  hf_helpers.hf_unified_multimodal(vocab_size=VOCAB,
                                   max_position_embeddings=MAX_POS).save_pretrained(out["base"])
  io.copy_files(dirs["base"], io.aux_files(dirs["base"]), out["base"])
  hf_helpers.hf_unified_assistant(vocab_size=VOCAB, ordered=True).save_pretrained(out["drafter"])
  checkpoint.hf_to_jax(out["base"], out["pair"], drafter=out["drafter"])
  return out


def _run(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _json(capsys, *argv):
  code, out, err = _run(capsys, *argv, "--json")
  assert code == 0, err
  return json.loads(out)


@pytest.mark.parametrize("family", ["gemma4", "gemma4_unified"])
def test_json_report_and_speculative_equals_plain(family, request, capsys):
  dirs = request.getfixturevalue("dirs" if family == "gemma4" else "unified_dirs")
  common = ("--prompt-ids", "2,17,60,121,9,250", "--max-new-tokens", 20, "--no-stop")
  fast = _json(capsys, "--base", dirs["base"], "--drafter", dirs["drafter"], *common,
               "--num-draft-tokens", 3)
  plain = _json(capsys, "--base", dirs["base"], *common)
  assert KEYS <= set(fast) and KEYS <= set(plain)
  assert fast["tokens"] == plain["tokens"] and len(fast["tokens"]) == 20
  assert fast["text"] == plain["text"] and isinstance(fast["text"], str)
  # Statistics agree with each other: one base forward per round, K drafts per round.
  assert fast["target_forwards"] == fast["draft_rounds"] == len(fast["rounds"]) > 0
  assert fast["drafted"] == 3 * fast["draft_rounds"]
  assert fast["accepted"] == sum(r["accepted"] for r in fast["rounds"])
  assert all(len(r["drafted"]) == 3 for r in fast["rounds"])
  # Per-position acceptance: P(accepted >= k) over the rounds, and alpha_k given k - 1 accepted.
  acc = np.asarray([r["accepted"] for r in fast["rounds"]])
  rate = [np.mean(acc >= k) for k in (1, 2, 3)]
  assert fast["acceptance"]["rate"] == pytest.approx(rate)
  assert fast["acceptance"]["alpha"] == pytest.approx(
      [r / p if p else 0.0 for r, p in zip(rate, [1.0] + rate[:2])])
  assert 1 + sum(rate) >= fast["mean_accepted_length"]  # the last round may be cut at max_new
  assert fast["mean_accepted_length"] == pytest.approx(19 / fast["target_forwards"])
  assert plain["target_forwards"] == 19 and plain["draft_rounds"] == 0
  assert plain["mean_accepted_length"] == 1.0
  for r in (fast, plain):
    assert r["tokens_per_second"] > 0 and r["prefill_seconds"] > 0 and r["decode_seconds"] > 0
  # The pair dir (converted base + drafter, drafter stored with it) gives the same tokens.
  stored = _json(capsys, "--base", dirs["pair"], *common, "--num-draft-tokens", 3)
  assert stored["tokens"] == plain["tokens"] and stored["draft_rounds"] > 0


def test_text_prompts_use_the_tokenizer(dirs, capsys):
  argv = ("--base", dirs["base"], "--drafter", dirs["drafter"], "--prompt", "def main():",
          "--max-new-tokens", 6, "--temperature", 0.8, "--seed", 3)
  code, out, err = _run(capsys, *argv)
  assert code == 0, err
  sampled = _json(capsys, *argv)  # same seed, same sample
  assert out == sampled["text"] + "\n" and len(sampled["tokens"]) >= 1
  tok = tokenizer_lib.load_tokenizer(dirs["base"])
  ids = tok("def main():")["input_ids"]
  r = _json(capsys, "--base", dirs["base"], "--prompt", "def main():", "--max-new-tokens", 6)
  assert r["prompt_length"] == len(ids)
  chat = _json(capsys, "--base", dirs["base"], "--prompt", "def main():", "--chat",
               "--max-new-tokens", 4)
  assert chat["prompt_length"] == len(_template(tok, [{"role": "user", "content": "def main():"}]))
  assert chat["prompt_length"] > len(ids)  # bos + turn markers + role
  # Default stops: the config's eos and the tokenizer's end of turn.
  assert set(chat["stop_ids"]) == {1, tok.convert_tokens_to_ids("<turn|>")}


def _template(tok, messages) -> list[int]:
  out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "def main():"}],
    [{"role": "system", "content": "You write Python.\n"},
     {"role": "user", "content": "  Sort a list in place.  "}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!\nHow can I help?"},
     {"role": "user", "content": [{"type": "text", "text": "Write x = 1"}]}],
    [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "x"},
     {"role": "model", "content": " y "}, {"role": "user", "content": "z\n\n"}],
], ids=["plain", "system", "multi_turn", "developer_and_model_roles"])
def test_chat_prompt_equals_the_tokenizers_chat_template(dirs, messages):
  """`generate --chat`'s encoder (the training data's rendering, model turn opened) gives the
  tokens of the tokenizer's own template with its generation prompt, token for token."""
  tok = tokenizer_lib.load_tokenizer(dirs["base"])
  got = chat_lib.encode_prompt(messages, tok)
  assert set(got) == {"tokens"} and got["tokens"].dtype == np.int32
  assert got["tokens"].tolist() == _template(tok, messages)


def test_chat_prompt_keeps_a_literal_turn_marker_as_text(dirs):
  """Where the rendered template would turn a `<|turn>` typed in the prompt into a turn boundary,
  the encoder keeps it text, as in training data: only the two real turns open."""
  tok = tokenizer_lib.load_tokenizer(dirs["base"])
  tokens = chat_lib.encode_prompt([{"role": "user", "content": "a <|turn>model\nb"}], tok)["tokens"]
  turn = tok.convert_tokens_to_ids(tokenizer_lib.TURN_OPEN)
  assert tokens.tolist().count(turn) == 2
  assert tok.decode(tokens).endswith("a <|turn>model\nb<turn|>\n<|turn>model\n")


@pytest.mark.parametrize("argv, match", [
    (("--drafter", "{misfit}", "--prompt-ids", "2,3"), "does not fit the base.*backbone"),
    (("--drafter", "{drafter}", "--prompt-ids", ",".join(["5"] * 60), "--max-new-tokens", 40),
     "prompt length 60 .* exceed the maximum cache length 96"),
    (("--prompt-ids", f"2,3,{VOCAB}"), f"token id {VOCAB} outside the vocab"),
    (("--drafter", "{drafter}", "--prompt-ids", "2,3", "--num-draft-tokens", 0),
     "--num-draft-tokens"),
    (("--prompt-ids", "2,x"), "comma-separated integers"),
])
def test_bad_input_exits_2_before_any_compute(dirs, capsys, argv, match):
  before = dict(speculative.compiled_programs())
  argv = [a.format(**dirs) if isinstance(a, str) else a for a in argv]
  code, out, err = _run(capsys, "--base", dirs["base"], *argv)
  assert code == 2 and out == ""
  assert err.startswith("error: ")
  assert re.search(match, err), err
  assert dict(speculative.compiled_programs()) == before


def test_misfit_drafter_is_refused_before_weights_are_read(dirs, capsys, monkeypatch):
  def no_load(*a, **k):
    raise AssertionError("weights were read")
  monkeypatch.setattr(checkpoint, "load_pair", no_load)
  code, _, err = _run(capsys, "--base", dirs["pair"], "--drafter", dirs["misfit"], "--prompt-ids",
                      "2,3")
  assert code == 2 and "backbone_hidden_size=32 != base hidden size 64" in err


def test_text_prompt_without_tokenizer_is_refused(dirs, capsys):
  code, _, err = _run(capsys, "--base", dirs["bare"], "--prompt", "hello")
  assert code == 2 and "--prompt-ids" in err
