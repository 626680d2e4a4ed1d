"""Tokenizers: Gemma 4's own (any HF tokenizer dir or hub id), or a tiny Gemma-4-shaped one.

The tiny tokenizer exists so that smoke runs and tests need no download: a SentencePiece BPE model
trained on local text, with Gemma's special tokens under Gemma's names and conventional ids
(`<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, `<mask>`=4) and Gemma 4's turn markers `<|turn>` /
`<turn|>` as control tokens. It is wrapped as an HF `GemmaTokenizer`, so it saves and loads exactly
like the real one and its files can sit next to an exported HF model.

The turn markers get small ids in the tiny vocab (5 and 6), deliberately not Gemma 4's 105 and 106:
code must read every control id from the tokenizer (`convert_tokens_to_ids`), and a hard-coded 105
would fail loudly on the tiny tokenizer instead of silently working on only one of the two.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import sentencepiece as spm
import transformers

from gemma_mtp_jax.utils import files

PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
TURN_OPEN = "<|turn>"  # starts every chat turn; followed by the role name and "\n"
TURN_CLOSE = "<turn|>"  # ends every turn; the token a model turn stops on

# Gemma 4's multimodal markers, under the tokenizer attribute names its tokenizer_config.json uses
# and `Gemma4Processor` reads (`tokenizer.image_token`, `.boi_token`, `.image_token_id`, ...; it
# needs the audio ones to exist too, even for images). The processor expands each `<|image|>` of
# the rendered chat into `<|image>` + n x `<|image|>` + `<image|>`.
IMAGE, BOI, EOI = "<|image|>", "<|image>", "<image|>"
MULTIMODAL_TOKENS = {"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI,
                     "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}
# Added by `Gemma4Processor` itself when missing; the tiny vocab carries it so the count is fixed.
VIDEO = "<|video|>"

# Gemma 4's chat format, as its published template renders a conversation when there are no tools
# and thinking is off (E2B/E4B; the 26B/31B templates also prime generation with an empty thought
# channel): `bos`, then per message `<|turn>{role}\n{content}<turn|>\n`, with `assistant` spelled
# `model`. A content string is trimmed; a content list (HF's multimodal form) renders each text
# item trimmed and each image item as "\n\n<|image|>\n\n", concatenated. `chat.encode_example`
# produces the same tokens directly.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content | trim -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] | trim -}}"
    "{%- elif item['type'] == 'image' -%}{{- '\\n\\n<|image|>\\n\\n' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = message['role'] -%}"
    "{%- if role == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- elif role == 'developer' -%}{%- set role = 'system' -%}{%- endif -%}"
    "{{- '<|turn>' + role + '\\n' + render(message['content']) + '<turn|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}"
)

# Written last when a tokenizer dir is published, so its presence means the dir is complete.
_MARKER = "tokenizer_config.json"


def load_tokenizer(path_or_repo: str, **kwargs) -> transformers.PreTrainedTokenizerBase:
  """Loads an HF tokenizer from a local dir (e.g. one `build_tiny_tokenizer` wrote) or a hub id."""
  return transformers.AutoTokenizer.from_pretrained(path_or_repo, **kwargs)


def _lines(texts: Iterable[str]) -> Iterator[str]:
  # SentencePiece trains on "sentences" and drops very long ones; lines of prose and code are the
  # natural unit. "\n" itself is a user-defined piece, so it never needs to be seen in training.
  for text in texts:
    for line in text.split("\n"):
      if line.strip():
        yield line


def _train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int, seed: int) -> None:
  spm.set_random_generator_seed(seed)
  with open(model_path, "wb") as f:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts),
        model_writer=f,
        model_type="bpe",  # HF's GemmaTokenizer is a BPE tokenizer
        vocab_size=vocab_size,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece=PAD, eos_piece=EOS, bos_piece=BOS, unk_piece=UNK,
        control_symbols=[MASK, TURN_OPEN, TURN_CLOSE],
        # An atomic "\n" keeps a role header ("model\n") from merging with the content after it,
        # so encoding a chat piece by piece gives the same tokens as encoding it whole (as Gemma's).
        user_defined_symbols=["\n"],
        byte_fallback=True,  # any text round-trips; nothing becomes <unk>
        # Gemma's settings: keep text verbatim (no NFKC, no whitespace folding, no dummy prefix),
        # digits split, indentation runs may become pieces.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        num_threads=min(8, os.cpu_count() or 1),
        minloglevel=2,
    )


def build_tiny_tokenizer(corpus_texts: Iterable[str], out_dir: str, vocab_size: int = 4096,
                         seed: int = 0,
                         multimodal: bool = False) -> transformers.PreTrainedTokenizerBase:
  """Trains (once) a small Gemma-4-shaped SentencePiece BPE tokenizer and saves it as an HF one.

  Args:
    corpus_texts: training text; split into lines. Only read when `out_dir` holds no tokenizer yet.
    out_dir: where `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` and the
      SentencePiece `tokenizer.model` go. A tokenizer already there is loaded as is, whatever
      `corpus_texts`/`vocab_size` say (delete the dir to retrain).
    vocab_size: total vocab, including the 7 special tokens, "\n" and the 256 byte-fallback pieces.
    seed: SentencePiece's sampling seed.
    multimodal: also carry Gemma 4's image/audio/video markers (`MULTIMODAL_TOKENS`, `VIDEO`) as
      the last 7 ids, so `Gemma4Processor` works with it. The SentencePiece model then has
      vocab_size - 7 pieces: the total stays `vocab_size` (the model's vocab). Text ids differ
      from the text-only tokenizer's, so the two must live in different dirs.
  Returns:
    `AutoTokenizer.from_pretrained(out_dir)`: adds `<bos>` by default, pad/eos/bos/unk set.
  """
  if not os.path.exists(os.path.join(out_dir, _MARKER)):
    with files.atomic_dir(out_dir, marker=_MARKER) as tmp:
      model_path = os.path.join(tmp, "tokenizer.model")
      extra = len(MULTIMODAL_TOKENS) + 1 if multimodal else 0
      _train_sentencepiece(corpus_texts, model_path, vocab_size - extra, seed)
      # transformers' own SentencePiece reader gives the BPE vocab and merges; GemmaTokenizer adds
      # Gemma's normalizer/decoder. Special tokens keep their SentencePiece ids.
      from tokenizers.models import BPE
      from transformers.convert_slow_tokenizer import SentencePieceExtractor

      extracted = SentencePieceExtractor(model_path).extract(BPE)
      # Named like Gemma 4's own tokenizer_config.json (sot/eot for the turn markers): a named
      # extra special token becomes a tokenizer attribute (`tok.image_token_id`).
      specials = ({"sot_token": TURN_OPEN, "eot_token": TURN_CLOSE, **MULTIMODAL_TOKENS}
                  if multimodal else [TURN_OPEN, TURN_CLOSE])
      tok = transformers.GemmaTokenizer(
          vocab=extracted["vocab"], merges=extracted["merges"],
          pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=UNK, mask_token=MASK,
          extra_special_tokens=specials, add_bos_token=True)
      if multimodal:
        tok.add_special_tokens({"additional_special_tokens": [VIDEO]})
      tok.chat_template = CHAT_TEMPLATE
      tok.save_pretrained(tmp)
  return load_tokenizer(out_dir)
