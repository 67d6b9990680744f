"""similarity.png: a labelled colour bar, captions in any script drawn or visibly replaced
(never matplotlib's missing-glyph warnings), and a heat map that long captions cannot squash."""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from siglip_fast.train import plots


def _emb(n, seed=0):
  z = np.random.default_rng(seed).normal(size=(n, 8))
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_similarity_png_with_any_script_and_long_captions(tmp_path):
  z = _emb(4)
  images = np.random.default_rng(1).uniform(-1, 1, (4, 8, 8, 3))
  short = ["a", "b", "c", "d"]
  mixed = ["a small red circle in the top left", "一只红色的猫", "a cat 🐱 on a mat", "x" * 300]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # e.g. "Glyph ... missing from font(s) DejaVu Sans"
    size_short = plots.similarity_matrix(z, z, short, tmp_path / "short.png", images=images)
    size_mixed = plots.similarity_matrix(z, z, mixed, tmp_path / "mixed.png", images=images)
  assert size_short == size_mixed  # the heat map keeps its size
  for name in ("short.png", "mixed.png"):
    with Image.open(tmp_path / name) as im:
      assert im.size[0] > 100 and im.size[1] > 100


def test_unrenderable_characters_become_a_visible_placeholder():
  texts, families, replaced = plots.renderable(["café ☺", "猫"])
  assert texts[0] == "café ☺"  # in matplotlib's default font
  has_cjk = any(ord("猫") in cmap for _, cmap in plots._fonts())
  if has_cjk:  # an installed CJK font joins the fallback list
    assert texts[1] == "猫" and len(families) > 1 and not replaced
  else:
    assert texts[1] == plots.PLACEHOLDER and replaced
