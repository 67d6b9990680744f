"""Data: procedural coloured shapes (the default, nothing to download) and CSV/TSV manifests.

Shapes: each example is a small RGB image of one shape (colour x shape x size x quadrant,
plus jitter in position, size, hue and background) and a caption composed from those
attributes. Example i of a split is a pure function of (seed, split, i), and the training
order is a pure function of (seed, step): resuming a run at step s replays the same batches.

Every batch is a dict of NumPy arrays:
  image (n, S, S, 3) float32 in [-1, 1]; text (n, L) int32 tokens; ids (n,) int32, equal for
  examples whose captions describe each other's images (used as the loss's ``pair_ids``);
  plus, for evaluation, ``label`` (n,) int32 (zero-shot class) and ``caption`` (list of str).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Sequence

import numpy as np

COLOURS = {
  "red": (220, 40, 40),
  "green": (40, 180, 60),
  "blue": (40, 90, 235),
  "yellow": (235, 215, 40),
  "purple": (155, 60, 205),
  "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
PLACES = ("top left", "top right", "bottom left", "bottom right")
SPLITS = ("train", "val", "test")

# Training captions vary the wording but always state all four attributes. (Partial
# captions, e.g. "a red circle", made the quadrant unlearnable in our trials: with one
# positive per caption, they mark every red circle elsewhere as a mismatch.)
TRAIN_TEMPLATES = (
  "a {size} {colour} {shape} in the {place}",
  "{size} {colour} {shape}, {place}",
  "{place}: a {size} {colour} {shape}",
  "a {colour} {shape}, {size}, in the {place}",
  "the {place} has a {size} {colour} {shape}",
)
# The held-out retrieval captions: one canonical description per image.
EVAL_TEMPLATE = TRAIN_TEMPLATES[0]


def zero_shot_templates() -> list[str]:
  """Prompts for a class name "{colour} {shape}": one per size and quadrant, averaged
  (CLIP's prompt ensembling over the attributes the class does not fix)."""
  return [f"a {z} {{}} in the {p}" for z in SIZES for p in PLACES]


def class_names() -> list[str]:
  """The zero-shot classes, colour x shape, in label order."""
  return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def caption(template: str, colour: int, shape: int, size: int, place: int) -> str:
  return template.format(
    colour=list(COLOURS)[colour], shape=SHAPES[shape], size=SIZES[size], place=PLACES[place]
  )


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
  image_size: int = 32
  seed: int = 0
  n_train: int = 50_000
  n_val: int = 512
  n_test: int = 1024

  def __post_init__(self):
    if self.image_size < 16 or self.image_size % 4:
      raise ValueError(f"image_size must be a multiple of 4 and >= 16, got {self.image_size}")
    for name in ("n_train", "n_val", "n_test"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class Shapes:
  """The coloured-shapes data set; ``batch(split, indices)`` renders examples on demand."""

  def __init__(self, spec: ShapesSpec, tokenizer):
    self.spec, self.tokenizer = spec, tokenizer
    self._attrs = {s: self._sample_attributes(s) for s in SPLITS}
    # A bank of sensor-noise textures, picked per example (cheaper than noise per example).
    rng = np.random.default_rng((spec.seed, 0x0015E))
    self._noise = rng.normal(0, 0.06, (64, spec.image_size, spec.image_size, 3)).astype(np.float32)

  def size(self, split: str) -> int:
    return {"train": self.spec.n_train, "val": self.spec.n_val, "test": self.spec.n_test}[split]

  def _sample_attributes(self, split):
    # One generator per split, drawn in a fixed order: example i's attributes never depend
    # on which batch it lands in. Splits use different streams, so held-out images are new.
    n = self.size(split)
    rng = np.random.default_rng((self.spec.seed, SPLITS.index(split), 0x5EED))
    a = {
      "colour": rng.integers(len(COLOURS), size=n),
      "shape": rng.integers(len(SHAPES), size=n),
      "size": rng.integers(len(SIZES), size=n),
      "place": rng.integers(len(PLACES), size=n),
      "template": rng.integers(len(TRAIN_TEMPLATES), size=n),
      "jitter": rng.uniform(-1, 1, size=(n, 3)),  # dx, dy, radius
      "tint": rng.uniform(-1, 1, size=(n, 3)),  # shape colour jitter
      "background": rng.uniform(0.05, 0.3, size=(n, 3)),
      "noise": rng.integers(2**31, size=n),  # which texture of the noise bank
    }
    return a

  def labels(self, split, indices):
    a = self._attrs[split]
    return (a["colour"][indices] * len(SHAPES) + a["shape"][indices]).astype(np.int32)

  def captions(self, split, indices) -> list[str]:
    a = self._attrs[split]
    out = []
    for i in indices:
      t = TRAIN_TEMPLATES[a["template"][i]] if split == "train" else EVAL_TEMPLATE
      out.append(caption(t, a["colour"][i], a["shape"][i], a["size"][i], a["place"][i]))
    return out

  def batch(self, split: str, indices) -> dict:
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= self.size(split)):
      raise ValueError(f"indices must lie in [0, {self.size(split)}) for split {split!r}")
    a = self._attrs[split]
    caps = self.captions(split, indices)
    # Examples with equal attributes are positives for each other's captions, whatever
    # their templates: every caption only states attributes its image has.
    ids = (
      (a["colour"][indices] * len(SHAPES) + a["shape"][indices]) * len(SIZES) + a["size"][indices]
    ) * len(PLACES) + a["place"][indices]
    return {
      "image": self.render(split, indices),
      "text": self.tokenizer.encode_batch(caps),
      "ids": ids.astype(np.int32),
      "label": self.labels(split, indices),
      "caption": caps,
    }

  def render(self, split, indices) -> np.ndarray:
    """(n, S, S, 3) float32 images in [-1, 1], vectorised over the batch."""
    a, s = self._attrs[split], self.spec.image_size
    n = len(indices)
    jit = a["jitter"][indices]
    big = a["size"][indices] == 1
    radius = np.where(big, 0.2, 0.11) * s * (1 + 0.1 * jit[:, 2])
    place = a["place"][indices]
    cx = np.where(place % 2 == 1, 0.75, 0.25) * s + 0.06 * s * jit[:, 0]
    cy = np.where(place >= 2, 0.75, 0.25) * s + 0.06 * s * jit[:, 1]
    # 2x2 supersampling for soft edges; each example only evaluates its own shape.
    sub = ((np.arange(2 * s) + 0.5) / 2).astype(np.float32)
    inv_r = (1.0 / radius).astype(np.float32)[:, None, None]
    dx = (sub[None, None, :] - cx.astype(np.float32)[:, None, None]) * inv_r
    dy = (sub[None, :, None] - cy.astype(np.float32)[:, None, None]) * inv_r
    shape = a["shape"][indices]
    m = np.zeros((n, 2 * s, 2 * s), np.float32)
    for k, inside in enumerate(_SHAPE_TESTS):
      rows = shape == k
      if rows.any():
        m[rows] = inside(np.abs(dx[rows]), dy[rows], np.abs(dy[rows]))
    m = m.reshape(n, s, 2, s, 2).mean(axis=(2, 4))[..., None]
    rgb = np.asarray(list(COLOURS.values()), np.float32)[a["colour"][indices]] / 255.0
    rgb = np.clip(rgb + 0.06 * a["tint"][indices], 0, 1).astype(np.float32)
    bg = a["background"][indices].astype(np.float32)
    img = bg[:, None, None, :] * (1 - m) + rgb[:, None, None, :] * m
    noise = self._noise[a["noise"][indices] % len(self._noise)]
    return np.clip(img * 2 - 1 + noise, -1, 1)


# Inside tests on (|dx|, dy, |dy|), in units of the radius, centred on the shape.
_SHAPE_TESTS = (
  lambda ax, dy, ay: ax * ax + dy * dy <= 1.0,  # circle
  lambda ax, dy, ay: np.maximum(ax, ay) <= 0.85,  # square
  lambda ax, dy, ay: (dy <= 0.8) & (ax <= (dy + 1.0) / 1.8),  # triangle, apex up
  lambda ax, dy, ay: ((ax <= 0.33) & (ay <= 1.0)) | ((ay <= 0.33) & (ax <= 1.0)),  # cross
)


def train_indices(step: int, batch_size: int, n_train: int, seed: int) -> np.ndarray:
  """The training examples of global step ``step``: a slice of the concatenation of one
  seeded permutation per epoch. A pure function of its arguments, so resuming replays it."""
  start = step * batch_size
  out = []
  while len(out) < batch_size:
    epoch, offset = divmod(start + len(out), n_train)
    perm = np.random.default_rng((seed, 0xE90C, epoch)).permutation(n_train)
    out.extend(perm[offset : offset + batch_size - len(out)].tolist())
  return np.asarray(out, np.int64)


# ---------------------------------------------------------------------------------------
# Your own data: a CSV or TSV manifest of image path and caption.


class DataError(ValueError):
  """A bad manifest row or image; the message names the file."""


def _decode_image(path: str, image_size: int) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError  # Pillow is only needed for manifests.

  if not os.path.exists(path):
    raise DataError(f"image file not found: {path}")
  try:
    with Image.open(path) as im:
      im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
      arr = np.asarray(im, np.float32)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DataError(f"cannot decode image {path}: {e}") from e
  return arr / 127.5 - 1.0


class Manifest:
  """Image-caption pairs listed in a CSV (``.csv``) or TSV (``.tsv``/``.tab``) file.

  The header must name an ``image`` column (a path, relative to the manifest's folder unless
  absolute) and a ``caption`` column; an optional ``label`` column gives zero-shot classes.
  Images are decoded eagerly with Pillow, resized to ``image_size`` and held in memory (meant
  for small and medium sets), so a missing or corrupt file fails before training starts.
  """

  def __init__(self, path, image_size: int, tokenizer):
    path = os.fspath(path)
    if not os.path.exists(path):
      raise DataError(f"manifest not found: {path}")
    delimiter = "\t" if path.lower().endswith((".tsv", ".tab")) else ","
    root = os.path.dirname(os.path.abspath(path))
    # utf-8-sig: spreadsheet exports often start with a byte-order mark, which plain utf-8
    # would keep as part of the first column's name.
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f, delimiter=delimiter)
      if reader.fieldnames:
        reader.fieldnames = [n.strip() for n in reader.fieldnames]
      fields = reader.fieldnames or []
      if "image" not in fields or "caption" not in fields:
        sep = "tab" if delimiter == "\t" else "comma"
        raise DataError(
          f"{path}: the header (line 1, {sep}-separated) must name 'image' and "
          f"'caption' columns, got {fields}"
        )
      # (line number in the file, row): a quoted caption may span several lines.
      rows = []
      for row in reader:
        rows.append((reader.line_num, row))
    if not rows:
      raise DataError(f"{path}: no rows")
    self.path, self.tokenizer = path, tokenizer
    self.captions_all = []
    self.label_names = None
    images, raw_labels = [], []
    for line, row in rows:
      img, cap = (row.get("image") or "").strip(), row.get("caption")
      if not img or cap is None:
        raise DataError(f"{path} line {line}: empty image path or caption")
      full = img if os.path.isabs(img) else os.path.join(root, img)
      try:
        images.append(_decode_image(full, image_size))
      except DataError as e:
        raise DataError(f"{path} line {line}: {e}") from None
      self.captions_all.append(cap)
      if "label" in fields:
        raw_labels.append(row["label"])
    self.images = np.stack(images)
    self.text = tokenizer.encode_batch(self.captions_all)
    # Pairs with the same caption are positives for each other.
    _, self.ids = np.unique(np.asarray(self.captions_all, object), return_inverse=True)
    self.ids = self.ids.astype(np.int32)
    if raw_labels:
      self.label_names = sorted(set(raw_labels))
      self.labels = np.asarray([self.label_names.index(l) for l in raw_labels], np.int32)

  def __len__(self):
    return len(self.images)

  def batch(self, indices) -> dict:
    indices = np.asarray(indices, np.int64)
    out = {
      "image": self.images[indices],
      "text": self.text[indices],
      "ids": self.ids[indices],
      "caption": [self.captions_all[i] for i in indices],
    }
    if self.label_names is not None:
      out["label"] = self.labels[indices]
    return out


def shard_for_process(indices: Sequence[int], process_index: int, process_count: int):
  """This process's contiguous slice of a global batch (the mesh lists devices by process)."""
  indices = np.asarray(indices)
  if len(indices) % process_count:
    raise ValueError(
      f"global batch {len(indices)} must be divisible by the process count {process_count}"
    )
  per = len(indices) // process_count
  return indices[process_index * per : (process_index + 1) * per]
