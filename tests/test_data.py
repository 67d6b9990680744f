"""Data, tokenizer and evaluation metrics: determinism, splits, the manifest loader's errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from siglip_fast.train import data, evaluate
from siglip_fast.train.tokenizer import ByteTokenizer

TOK = ByteTokenizer(48)


def _shapes(seed=0, **kw):
  spec = dict(image_size=16, seed=seed, n_train=300, n_val=40, n_test=50)
  spec.update(kw)
  return data.Shapes(data.ShapesSpec(**spec), TOK)


def test_shapes_deterministic_by_seed():
  a, b, c = _shapes(0), _shapes(0), _shapes(1)
  idx = [5, 0, 299, 17]
  ba, bb, bc = a.batch("train", idx), b.batch("train", idx), c.batch("train", idx)
  for k in ("image", "text", "ids", "label"):
    np.testing.assert_array_equal(ba[k], bb[k])
  assert ba["caption"] == bb["caption"]
  assert not np.array_equal(ba["image"], bc["image"])
  # An example does not depend on the batch it is drawn in.
  np.testing.assert_array_equal(a.batch("train", [17])["image"][0], ba["image"][3])


def test_shapes_batch_contents():
  ds = _shapes()
  b = ds.batch("train", np.arange(64))
  assert b["image"].shape == (64, 16, 16, 3) and b["image"].dtype == np.float32
  assert b["image"].min() >= -1 and b["image"].max() <= 1
  assert b["text"].shape == (64, 48) and b["text"].dtype == np.int32
  names = data.class_names()
  for cap, label, toks in zip(b["caption"], b["label"], b["text"]):
    colour, shape = names[label].split()
    assert colour in cap and shape in cap  # the caption names the class
    assert TOK.decode(toks) == cap  # and fits in the tokenizer without truncation
  # Equal ids <=> equal attributes, so captions of equal-id examples share colour and shape.
  for i in range(64):
    for j in range(64):
      if b["ids"][i] == b["ids"][j]:
        assert b["label"][i] == b["label"][j]


def test_held_out_splits_are_new_images_with_full_captions():
  ds = _shapes()
  train, test = ds.batch("train", range(50)), ds.batch("test", range(50))
  assert not any(np.array_equal(t, x) for t in test["image"] for x in train["image"])
  assert all(c.startswith("a small ") or c.startswith("a large ") for c in test["caption"])
  with pytest.raises(ValueError, match="indices"):
    ds.batch("test", [50])
  with pytest.raises(ValueError, match="split"):
    ds.batch("dev", [0])


def test_train_order_is_a_pure_function_of_step():
  n, bs = 100, 32
  steps = [data.train_indices(s, bs, n, seed=3) for s in range(7)]
  again = [data.train_indices(s, bs, n, seed=3) for s in reversed(range(7))][::-1]
  for a, b in zip(steps, again):
    np.testing.assert_array_equal(a, b)
  flat = np.concatenate(steps)
  # Each epoch is a permutation of the training set.
  for e in range(2):
    assert sorted(flat[e * n : (e + 1) * n].tolist()) == list(range(n))
  assert not np.array_equal(flat[:n], flat[n : 2 * n])
  assert not np.array_equal(steps[0], data.train_indices(0, bs, n, seed=4))


def test_shard_for_process():
  idx = np.arange(8)
  parts = [data.shard_for_process(idx, p, 2) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(parts), idx)
  with pytest.raises(ValueError, match="divisible"):
    data.shard_for_process(np.arange(7), 0, 2)


def test_tokenizer_roundtrip_and_save(tmp_path):
  tok = ByteTokenizer(16)
  ids = tok.encode("héllo")
  assert ids.shape == (16,) and ids[0] == 1 and tok.decode(ids) == "héllo"
  long = tok.encode("x" * 40)
  assert tok.decode(long) == "x" * 14 and long[-1] == 2  # truncated, EOS kept
  tok.save(tmp_path / "tok.json")
  assert ByteTokenizer.load(tmp_path / "tok.json") == tok
  with pytest.raises(TypeError, match="text"):
    tok.encode(b"bytes")
  with pytest.raises(ValueError, match="max_len"):
    ByteTokenizer(2)


# --- the manifest loader -----------------------------------------------------------------


def _write_images(folder, n, size=10):
  rng = np.random.default_rng(0)
  names = []
  for i in range(n):
    name = f"img{i}.png"
    Image.fromarray(rng.integers(0, 255, (size, size + i, 3), dtype=np.uint8)).save(folder / name)
    names.append(name)
  return names


def test_manifest_csv_and_tsv(tmp_path):
  names = _write_images(tmp_path, 3)
  (tmp_path / "sub").mkdir()
  with open(tmp_path / "m.csv", "w") as f:
    f.write("image,caption,label\n")
    for i, n in enumerate(names):
      f.write(f'{n},"a caption, number {i % 2}",cls{i % 2}\n')
  m = data.Manifest(tmp_path / "m.csv", 8, TOK)
  assert len(m) == 3 and m.images.shape == (3, 8, 8, 3)
  assert m.images.min() >= -1 and m.images.max() <= 1
  b = m.batch([2, 0])
  assert b["caption"] == ["a caption, number 0", "a caption, number 0"]
  assert b["ids"][0] == b["ids"][1]  # same caption, same pair id
  assert m.label_names == ["cls0", "cls1"] and list(b["label"]) == [0, 0]
  # The pixels are the file's, resized: compare with Pillow directly.
  ref = np.asarray(Image.open(tmp_path / names[1]).convert("RGB").resize((8, 8), Image.BILINEAR))
  np.testing.assert_allclose(m.images[1], ref / 127.5 - 1, atol=1e-6)

  # TSV, with an absolute path.
  with open(tmp_path / "sub" / "m.tsv", "w") as f:
    f.write(f"caption\timage\nfirst\t{tmp_path / names[0]}\nsecond\t../{names[1]}\n")
  t = data.Manifest(tmp_path / "sub" / "m.tsv", 8, TOK)
  np.testing.assert_array_equal(t.images[0], m.images[0])
  np.testing.assert_array_equal(t.images[1], m.images[1])
  assert t.label_names is None


def test_manifest_missing_image_names_the_file(tmp_path):
  names = _write_images(tmp_path, 1)
  (tmp_path / "m.csv").write_text(f"image,caption\n{names[0]},ok\nnot_there.png,lost\n")
  with pytest.raises(data.DataError, match="not_there.png"):
    data.Manifest(tmp_path / "m.csv", 8, TOK)


def test_manifest_corrupt_image_names_the_file(tmp_path):
  names = _write_images(tmp_path, 1)
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  (tmp_path / "m.csv").write_text(f"image,caption\n{names[0]},ok\nbroken.png,bad\n")
  with pytest.raises(data.DataError, match="broken.png"):
    data.Manifest(tmp_path / "m.csv", 8, TOK)


def test_manifest_with_a_byte_order_mark(tmp_path):
  """Spreadsheet exports ("CSV UTF-8") start with a BOM; the header is read all the same."""
  names = _write_images(tmp_path, 2)
  text = f"image , caption\r\n{names[0]},één\r\n{names[1]},二\r\n"
  (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
  m = data.Manifest(tmp_path / "m.csv", 8, TOK)
  assert len(m) == 2 and m.captions_all == ["één", "二"]


def test_manifest_missing_image_names_the_line(tmp_path):
  names = _write_images(tmp_path, 1)
  # The second row's caption spans two lines, so the missing image is on line 4.
  (tmp_path / "m.csv").write_text(f'image,caption\n{names[0]},"two\nlines"\nnot_there.png,lost\n')
  with pytest.raises(data.DataError, match=r"m.csv line 4: image file not found: .*not_there"):
    data.Manifest(tmp_path / "m.csv", 8, TOK)


def test_manifest_bad_header(tmp_path):
  (tmp_path / "m.csv").write_text("path,text\na.png,x\n")
  with pytest.raises(data.DataError, match="'image' and 'caption'"):
    data.Manifest(tmp_path / "m.csv", 8, TOK)
  with pytest.raises(data.DataError, match="manifest not found"):
    data.Manifest(tmp_path / "none.csv", 8, TOK)


# --- metrics -------------------------------------------------------------------------------


def test_retrieval_recall_and_chance():
  rng = np.random.default_rng(1)
  n = 20
  z = rng.normal(size=(n, 8))
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  keys = np.arange(n)
  perfect = evaluate.retrieval(z, z, keys, keys)
  assert perfect["i2t_r1"] == perfect["t2i_r1"] == 1.0
  assert perfect["i2t_r1_chance"] == pytest.approx(1 / n)
  assert perfect["i2t_r5_chance"] == pytest.approx(5 / n)
  # Texts shifted by one: every image's best text is its neighbour's, so recall@1 is 0.
  shifted = evaluate.retrieval(z, np.roll(z, 1, axis=0), keys, keys)
  assert shifted["i2t_r1"] == 0.0 and shifted["t2i_r1"] == 0.0
  # With duplicated keys, the neighbour counts when it has the same key.
  dup = evaluate.retrieval(
    z, np.roll(z, 1, axis=0), keys // 2, np.roll(keys // 2, 1), unique_texts=False
  )
  assert dup["i2t_r1"] == 1.0
  # Chance for m hits among n candidates: 1 - C(n-m, k)/C(n, k); here m = 2.
  assert dup["i2t_r1_chance"] == pytest.approx(2 / n)
  assert dup["i2t_r5_chance"] == pytest.approx(
    1 - (18 * 17 * 16 * 15 * 14) / (20 * 19 * 18 * 17 * 16)
  )
  # Identical texts are ranked once: two copies of one wrong caption cannot fill a top 2.
  t = np.stack([z[0], z[0], z[1]])  # the wrong caption "b" is the closest
  r = evaluate.retrieval(z[:1], t, np.array(["a"]), np.array(["b", "b", "a"]), ks=(1, 2))
  assert r["i2t_r1"] == 0.0 and r["i2t_r2"] == 1.0 and r["i2t_r1_chance"] == 0.5
  r = evaluate.retrieval(
    z[:1], t, np.array(["a"]), np.array(["b", "b", "a"]), ks=(1, 2), unique_texts=False
  )
  assert r["i2t_r2"] == 0.0
  with pytest.raises(ValueError, match="one key per"):
    evaluate.retrieval(z, z, keys[:-1], keys)


def test_zero_shot_accuracy_and_class_embeddings():
  cls = np.eye(3)
  imgs = np.array([[1.0, 0.1, 0], [0, 0.2, 1.0], [0.9, 1.0, 0]])
  assert evaluate.zero_shot_accuracy(imgs, np.array([0, 2, 1]), cls) == 1.0
  assert evaluate.zero_shot_accuracy(imgs, np.array([0, 1, 1]), cls) == pytest.approx(2 / 3)
  # Prompt ensembling averages over templates and renormalises.
  table = {"a x": [1.0, 0.0], "the x": [0.0, 1.0], "a y": [1.0, 0.0], "the y": [1.0, 0.0]}
  emb = evaluate.class_embeddings(
    lambda ps: np.array([table[p] for p in ps]), ["x", "y"], ["a {}", "the {}"]
  )
  np.testing.assert_allclose(emb, [[2**-0.5, 2**-0.5], [1.0, 0.0]])
  # Scoring a class by its best prompt instead: where the two rules disagree. x's prompts
  # point two ways, y's both one way; the image is exactly x's first prompt.
  table = {"a x": [1.0, 0.0], "the x": [0.0, 1.0], "a y": [0.8, 0.6], "the y": [0.8, 0.6]}
  embed = lambda ps: np.array([table[p] for p in ps])
  prompts = evaluate.prompt_embeddings(embed, ["x", "y"], ["a {}", "the {}"])
  assert prompts.shape == (2, 2, 2)
  img = np.array([[1.0, 0.0]])
  assert evaluate.zero_shot_accuracy(img, np.array([0]), prompts) == 1.0  # best prompt: x
  means = evaluate.class_embeddings(embed, ["x", "y"], ["a {}", "the {}"])
  assert evaluate.zero_shot_accuracy(img, np.array([1]), means) == 1.0  # mean: y
