"""Image data: chat tokens == transformers' Gemma4Processor, loss masks, pixel slots, packing with
images, records in the shapes users have, bad records, the generated image QA set.

All local: the tiny tokenizer (with Gemma 4's image tokens) is trained on a slice of the local
corpus; images are rendered with PIL.
"""

import io
import itertools
import json
import os

import datasets
import numpy as np
import PIL.Image
import pytest

from gemma_mtp_jax.data import chat
from gemma_mtp_jax.data import corpus as corpus_lib
from gemma_mtp_jax.data import images as images_lib
from gemma_mtp_jax.data import packing
from gemma_mtp_jax.data import pipeline
from gemma_mtp_jax.data import sources
from gemma_mtp_jax.data import tokenizer as tokenizer_lib
from gemma_mtp_jax.data import vision_qa

datasets.disable_progress_bars()
SIZES = dict(max_soft_tokens=70, patch_size=8, pooling_kernel_size=2)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  corpus = corpus_lib.build_local_corpus(str(tmp_path_factory.mktemp("corpus")))
  texts = itertools.islice(corpus_lib.corpus_texts(corpus.values()), 2000)
  out_dir = str(tmp_path_factory.mktemp("tok") / "tiny_mm")
  tokenizer_lib.build_tiny_tokenizer(texts, out_dir, vocab_size=1024, multimodal=True)
  return out_dir


@pytest.fixture(scope="module")
def processor(tok_dir):
  return images_lib.build_processor(tok_dir, **SIZES)


@pytest.fixture(scope="module")
def tok(processor):
  return processor.tokenizer


def _image(w, h, seed=0):
  rng = np.random.default_rng(seed)
  return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png(image):
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


def _hf(processor, messages, pil_images):
  """What transformers' processor makes of the same conversation."""
  rendered = processor.apply_chat_template(messages, tokenize=False)
  out = processor(text=[rendered], images=[pil_images] if pil_images else None,
                  return_tensors="np", add_special_tokens=False)
  return rendered, out


def _true_runs(mask):
  edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


# ---------------------------------------------------------------------------------- tokenizer


def test_tiny_multimodal_tokenizer(tok, tok_dir):
  assert len(tok) == 1024  # the image/audio/video markers are inside the vocab size
  ids = tok.convert_tokens_to_ids(["<|image>", "<|image|>", "<image|>", "<|audio|>", "<|video|>"])
  assert ids == [1018, 1017, 1019, 1020, 1023] and tok.image_token_id == ids[1]  # the last 7
  assert (tok.boi_token, tok.eoi_token, tok.image_token) == ("<|image>", "<image|>", "<|image|>")
  assert set(ids) <= set(tok.all_special_ids)
  assert tok.convert_tokens_to_ids("<|turn>") == 5  # the turn markers keep their small ids
  text_only = tokenizer_lib.load_tokenizer(tok_dir)
  assert text_only.encode("a <|image|> b", add_special_tokens=False).count(ids[1]) == 1


# ---------------------------------------------------------------------------------- chat tokens

IMG_A, IMG_B, IMG_C = _image(90, 40, 1), _image(30, 70, 2), _image(64, 64, 3)
CONVERSATIONS = [
    # image first, then the question (the MedPix / generated-set shape)
    ([dict(role="user", content=[dict(type="image", image=IMG_A),
                                 dict(type="text", text=" What is shown? ")]),
      dict(role="assistant", content=[dict(type="text", text="Noise.")])], [IMG_A]),
    # system turn, text around two images, two exchanges, a string content
    ([dict(role="system", content="Be brief."),
      dict(role="user", content=[dict(type="text", text="Compare"), dict(type="image", image=IMG_B),
                                 dict(type="text", text="with"), dict(type="image", image=IMG_C),
                                 dict(type="text", text="please.")]),
      dict(role="assistant", content="They differ."),
      dict(role="user", content=[dict(type="image", image=IMG_A)]),
      dict(role="assistant", content=[dict(type="text", text=" Wide "),
                                      dict(type="text", text="one.")])], [IMG_B, IMG_C, IMG_A]),
]


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_tokens_and_pixels_equal_hf_processor(processor, tok, case):
  messages, pil_images = CONVERSATIONS[case]
  doc = chat.encode_example({"messages": messages}, tok,
                            image_processor=processor.image_processor)
  rendered, hf = _hf(processor, messages, pil_images)
  assert chat.render_chat(chat.to_turns({"messages": messages})) == rendered
  assert doc["tokens"].tolist() == hf["input_ids"][0].tolist()
  assert ((doc["tokens"] == tok.image_token_id) == hf["mm_token_type_ids"][0].astype(bool)).all()
  np.testing.assert_array_equal(doc["pixel_values"], hf["pixel_values"])
  np.testing.assert_array_equal(doc["pixel_positions"], hf["image_position_ids"])
  assert doc["pixel_values"].dtype == np.float32 and doc["pixel_positions"].dtype == np.int32
  # Each image's block: boi, its soft tokens (= its valid patches / kernel**2), eoi.
  boi, image, eoi = tok.convert_tokens_to_ids(["<|image>", "<|image|>", "<image|>"])
  for (start, stop), positions in zip(doc["image_spans"], doc["pixel_positions"]):
    block = doc["tokens"][start:stop]
    assert block[0] == boi and block[-1] == eoi and (block[1:-1] == image).all()
    assert len(block) - 2 == (positions[:, 0] >= 0).sum() // SIZES["pooling_kernel_size"]**2
  assert len(doc["image_spans"]) == len(pil_images)


def test_loss_mask_only_on_assistant_text(processor, tok):
  messages, _ = CONVERSATIONS[1]
  doc = chat.encode_example({"messages": messages}, tok,
                            image_processor=processor.image_processor)
  spans = [tok.decode(doc["tokens"][a:b]) for a, b in _true_runs(doc["loss_mask"])]
  assert spans == ["They differ.<turn|>", "Wideone.<turn|>"]  # list items trimmed, as the template
  for start, stop in doc["image_spans"]:
    assert not doc["loss_mask"][start:stop].any()


def test_text_only_examples_are_unchanged(tok):
  messages = [dict(role="user", content="Hi"), dict(role="assistant", content="Hello")]
  doc = chat.encode_example({"messages": messages}, tok)
  assert set(doc) == {"tokens", "loss_mask"}
  assert tok.decode(doc["tokens"]) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello<turn|>\n"


def test_processor_saves_and_loads(processor, tmp_path):
  images_lib.save_processor(processor, str(tmp_path / "proc"))
  assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json",
          "chat_template.jinja"} <= set(os.listdir(tmp_path / "proc"))
  loaded = images_lib.load_processor(str(tmp_path / "proc"))
  assert type(loaded).__name__ == "Gemma4Processor"
  messages, pil_images = CONVERSATIONS[1]
  a, b = _hf(processor, messages, pil_images)[1], _hf(loaded, messages, pil_images)[1]
  assert all(np.array_equal(a[k], b[k]) for k in a)
  with pytest.raises(chat.DataError, match="max_soft_tokens"):
    images_lib.build_image_processor(max_soft_tokens=100)


# ---------------------------------------------------------------------------------- records


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def _qa(image_value, q="What is it?", a="A thing.", key="messages"):
  return {key: [dict(role="user", content=[dict(type="image", image=image_value),
                                           dict(type="text", text=q)]),
                dict(role="assistant", content=[dict(type="text", text=a)])]}


def test_record_shapes_resolve_to_the_same_tokens(processor, tok, tmp_path):
  (tmp_path / "data" / "img").mkdir(parents=True)
  IMG_B.save(tmp_path / "data" / "img" / "b.png")
  want = chat.encode_example(_qa(IMG_B), tok, image_processor=processor.image_processor)
  jsonl = _write_jsonl(tmp_path / "data" / "medpix.jsonl",
                       [_qa("img/b.png", key="conversation"),
                        _qa(str(tmp_path / "data/img/b.png"), key="conversation")])
  source = sources.load_source(jsonl, cache_dir=str(tmp_path / "hf"))
  assert source.schema == chat.CONVERSATION  # NeMo's MedPix-VQA record shape
  for i in range(2):  # a relative path resolves against the data file's dir
    doc = source.encode(i, tok, processor.image_processor)
    assert doc["tokens"].tolist() == want["tokens"].tolist()
    np.testing.assert_array_equal(doc["pixel_values"], want["pixel_values"])
  for value in (_png(IMG_B), dict(bytes=_png(IMG_B), path=None), dict(bytes=None, path=jsonl)):
    if isinstance(value, dict) and value["path"]:
      value["path"] = str(tmp_path / "data" / "img" / "b.png")
    doc = chat.encode_example(_qa(value), tok, image_processor=processor.image_processor)
    assert doc["tokens"].tolist() == want["tokens"].tolist()
  # A datasets save_to_disk dir with an Image column; the spec names its columns.
  rows = dict(picture=[str(tmp_path / "data" / "img" / "b.png")], question=["What is it?"],
              label=["A thing."])
  saved = datasets.Dataset.from_dict(rows).cast_column("picture", datasets.Image())
  saved.save_to_disk(str(tmp_path / "saved"))
  source = sources.load_source(dict(path=str(tmp_path / "saved"), schema=chat.IMAGE_QA,
                                    columns=dict(image="picture", answer="label")))
  doc = source.encode(0, tok, processor.image_processor)
  assert doc["tokens"].tolist() == want["tokens"].tolist()
  np.testing.assert_array_equal(doc["pixel_values"], want["pixel_values"])


def test_bad_records_name_the_record(processor, tok, tmp_path):
  (tmp_path / "notimage.png").write_bytes(b"not a png at all")
  IMG_A.save(tmp_path / "ok.png")
  rows = [_qa("ok.png"), _qa("missing.png"), _qa("notimage.png"),
          _qa("https://example.com/x.png"),
          {"messages": [dict(role="user", content=[dict(type="video", video="v.mp4")]),
                        dict(role="assistant", content="x")]},
          {"messages": [dict(role="user", content="q"),
                        dict(role="assistant", content=[dict(type="image", image="ok.png")])]}]
  path = _write_jsonl(tmp_path / "bad.jsonl", rows)
  source = sources.load_source(path, cache_dir=str(tmp_path / "hf"))
  assert "pixel_values" in source.encode(0, tok, processor.image_processor)
  expected = {1: "record 1: image 'missing.png' not found", 2: "record 2: image 'notimage.png'.* "
              "not a readable image", 3: "record 3: image 'https://example.com/x.png' is a URL",
              4: "record 4: .*type 'video'; expected 'text' or 'image'",
              5: "record 5: .*images are only read in user turns"}
  for i, match in expected.items():
    with pytest.raises(chat.DataError, match=f"bad.jsonl.*{match}"):
      source.encode(i, tok, processor.image_processor)
  with pytest.raises(chat.DataError, match="record 0: .*no image processor"):
    source.encode(0, tok)
  with pytest.raises(chat.DataError, match="image bytes \\(4 bytes\\) is not a readable"):
    chat.encode_example(_qa(b"\x00\x01\x02\x03"), tok, image_processor=processor.image_processor)


# ---------------------------------------------------------------------------------- packing


def _image_doc(n_text, blocks, seed, p=6, c=4, record="doc"):
  """A synthetic doc: n_text tokens, then image blocks of the given lengths, then 3 answer tokens.
  Pixel values record (seed, image index) so slots can be traced."""
  tokens, spans = list(range(1, n_text + 1)), []
  for k, n in enumerate(blocks):
    spans.append((len(tokens), len(tokens) + n))
    tokens += [900 + k] * n
  tokens += [7, 8, 9]
  mask = np.zeros(len(tokens), bool)
  mask[-3:] = True
  pv = np.stack([np.full((p, c), seed * 10 + k, np.float32) for k in range(len(blocks))])
  pos = np.stack([np.full((p, 2), seed * 10 + k, np.int32) for k in range(len(blocks))])
  return dict(tokens=np.asarray(tokens, np.int32), loss_mask=mask, pixel_values=pv,
              pixel_positions=pos, image_spans=np.asarray(spans, np.int32), record=record)


def _pack(docs, seq_len, rows, slots):
  stream = packing.ListStream(lambda i: docs[i], len(docs))
  return packing.pack_batch(stream, seq_len, rows, slots), stream


def test_packing_image_slots_in_order_and_empty_slots():
  docs = [_image_doc(2, [3], 1), _image_doc(1, [2, 2], 2), _image_doc(2, [3], 3),
          dict(tokens=np.arange(4, dtype=np.int32), loss_mask=np.array([0, 1, 1, 1], bool))]
  b, stream = _pack(docs, seq_len=20, rows=3, slots=(3, 6, 4))
  assert b["pixel_values"].shape == (3, 3, 6, 4) and b["pixel_positions"].shape == (3, 3, 6, 2)
  # Row 0: doc 0 (1 image) + doc 1 (2 images) fill its 3 slots; doc 2 needs a slot: next row.
  assert b["segment_ids"][0].max() == 2 and stream.index == 4
  assert b["pixel_values"][0, :, 0, 0].tolist() == [10, 20, 21]
  assert b["pixel_values"][1, :, 0, 0].tolist() == [30, 0, 0]  # doc 2, then empty slots
  assert (b["pixel_positions"][1, 1:] == -1).all() and (b["pixel_positions"][2] == -1).all()
  assert b["segment_ids"][1].max() == 2  # the text-only doc joins row 1 (no slot needed)
  # The k-th image of a row is the k-th image-token block of the row.
  row0 = b["tokens"][0][b["segment_ids"][0] > 0]
  assert [t for t in row0 if t >= 900] == [900] * 3 + [900] * 2 + [901] * 2


def test_packing_truncates_before_an_image_block_and_skips_what_is_left():
  docs = [_image_doc(4, [5, 5], 1), _image_doc(8, [5], 2), _image_doc(1, [2], 3)]
  docs[0]["loss_mask"][2] = True  # something to learn before the second image
  b, stream = _pack(docs, seq_len=12, rows=2, slots=(2, 6, 4))
  # doc 0: 4 text + block(5) fits, the second block [9, 14) would be cut: the row ends at 9.
  assert b["segment_ids"][0].tolist() == [1] * 9 + [0] * 3
  assert b["pixel_values"][0, :, 0, 0].tolist() == [10, 0]
  # doc 1: cut before its only image leaves no loss token: skipped. doc 2 goes to row 1.
  assert b["tokens"][1, :6].tolist() == [1, 900, 900, 7, 8, 9]
  assert b["pixel_values"][1, :, 0, 0].tolist() == [30, 0] and stream.index == 3


def test_packing_image_errors_and_text_only_batches():
  with pytest.raises(chat.DataError, match="rec7 has 3 images .* at most 2"):
    _pack([_image_doc(1, [2, 2, 2], 1, record="rec7")], seq_len=30, rows=1, slots=(2, 6, 4))
  with pytest.raises(chat.DataError, match="rec1 has images but .* no image slots"):
    _pack([_image_doc(1, [2], 1, record="rec1")], seq_len=30, rows=1, slots=None)
  with pytest.raises(chat.DataError, match="image arrays of shape"):
    _pack([_image_doc(1, [2], 1)], seq_len=30, rows=1, slots=(2, 5, 4))
  text = [dict(tokens=np.arange(5, dtype=np.int32), loss_mask=np.ones(5, bool))]
  assert set(_pack(text, 8, 1, None)[0]) == {"tokens", "segment_ids", "positions", "loss_mask"}
  with_slots = _pack(text, 8, 1, (1, 6, 4))[0]  # image data: every batch has the slots
  assert (with_slots["pixel_positions"] == -1).all() and not with_slots["pixel_values"].any()


# ---------------------------------------------------------------------------------- QA set + pipeline


def test_vision_qa_is_deterministic(tmp_path):
  a = vision_qa.build_vision_qa(str(tmp_path / "a"), num_records=60, seed=3)
  b = vision_qa.build_vision_qa(str(tmp_path / "b"), num_records=60, seed=3)
  c = vision_qa.build_vision_qa(str(tmp_path / "c"), num_records=60, seed=4)
  read = lambda p: open(p).read()
  assert read(a) == read(b) and read(a) != read(c)
  rows = [json.loads(line) for line in read(a).splitlines()]
  assert len(rows) == 60 and all(chat.detect_schema(r) == chat.MESSAGES for r in rows)
  paths = [item["image"] for r in rows for item in r["messages"][0]["content"]
           if item["type"] == "image"]
  assert 60 < len(paths) < 80  # about 10% of the records hold two images
  sizes = set()
  for p in paths:
    with PIL.Image.open(os.path.join(tmp_path / "a", p)) as ia, \
        PIL.Image.open(os.path.join(tmp_path / "b", p)) as ib:
      assert np.array_equal(np.asarray(ia), np.asarray(ib))
      sizes.add(ia.size)
  assert len({w / h for w, h in sizes}) > 3  # varied aspect ratios
  answers = {r["messages"][1]["content"][0]["text"].split()[0] for r in rows}
  assert {"There", "The"} <= answers


def test_make_datasets_with_images_resumes(tok, tmp_path):
  cfg = pipeline.vision_qa_data_config()
  cfg.corpus_dir, cfg.hf_cache_dir, cfg.eval_max_batches = str(tmp_path), str(tmp_path / "hf"), 1
  train, evals = pipeline.make_datasets(cfg, tok, seq_len=256, batch_size=4, seed=0)
  batch = next(train)
  i, p, c = cfg.vision.max_images_per_row, 70 * 2**2, 3 * 8**2
  assert batch["pixel_values"].shape == (4, i, p, c) and batch["pixel_positions"].shape == (4, i, p, 2)
  assert evals[0]["pixel_values"].shape == (4, i, p, c)
  image_id = tok.image_token_id
  for b in range(4):  # each row's soft tokens == the valid soft slots of its images, in order
    n_tokens = (batch["tokens"][b] == image_id).sum()
    valid = (batch["pixel_positions"][b, :, :, 0] >= 0).sum() // 4
    assert n_tokens == valid > 0
  state = train.get_state()
  after = [next(train) for _ in range(2)]
  again, _ = pipeline.make_datasets(cfg, tok, seq_len=256, batch_size=4, seed=0)
  again.set_state(state)
  for want in after:
    got = next(again)
    assert all(np.array_equal(want[k], got[k]) for k in want)
