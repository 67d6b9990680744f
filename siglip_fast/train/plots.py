"""End-of-run figures: the training loss curve and a held-out similarity matrix (PNG)."""

from __future__ import annotations

import functools

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
from matplotlib import font_manager  # noqa: E402
from matplotlib import ft2font  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PLACEHOLDER = "\N{REPLACEMENT CHARACTER}"  # in DejaVu Sans, matplotlib's default font
MAX_CAPTION = 40  # characters of a caption shown under the heat map


def loss_curve(steps, losses, path, title="training loss") -> None:
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(steps, losses, lw=1, alpha=0.35, label="logged steps")
  if len(losses) >= 10:
    w = max(5, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
    ax.plot(np.asarray(steps)[w - 1 :], smooth, lw=2, label=f"mean of {w}")
  ax.set(xlabel="step", ylabel="sigmoid loss", title=title, yscale="log")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


@functools.lru_cache(maxsize=1)
def _fonts() -> tuple[tuple[str, frozenset], ...]:
  """(family, code points) of the installed regular-weight fonts, matplotlib's default font
  first. matplotlib's own "Last Resort" font (boxes with the code point) is left out."""
  default = font_manager.findfont(font_manager.FontProperties(family=["sans-serif"]))
  entries = [
    e
    for e in font_manager.fontManager.ttflist
    if e.style == "normal"
    and e.weight in (400, "normal", "regular")
    and "Last Resort" not in e.name
  ]
  entries.sort(key=lambda e: e.fname != default)
  out, seen = [], set()
  for e in entries:
    if e.name in seen:
      continue
    try:
      cmap = frozenset(ft2font.FT2Font(e.fname).get_charmap())
    except (OSError, RuntimeError, ValueError):
      continue
    seen.add(e.name)
    out.append((e.name, cmap))
  return tuple(out)


def renderable(texts) -> tuple[list[str], list[str], bool]:
  """(texts, font families, replaced): each character that no installed font has becomes
  PLACEHOLDER (visibly, instead of a warning and an empty box); the families are matplotlib's
  default followed by those needed for the other characters (e.g. a CJK font, if installed),
  for matplotlib's per-glyph fallback."""
  fonts = _fonts()
  families, out, replaced = [fonts[0][0]] if fonts else [], [], False
  for text in texts:
    chars = []
    for ch in text:
      cp = ord(ch)
      if ch.isspace() or any(cp in cmap for _, cmap in fonts[:1]):
        chars.append(ch)
        continue
      owner = next((name for name, cmap in fonts if cp in cmap), None)
      if owner is None:
        chars.append(PLACEHOLDER)
        replaced = True
      else:
        chars.append(ch)
        if owner not in families:
          families.append(owner)
    out.append("".join(chars))
  return out, families or ["sans-serif"], replaced


def _shorten(caption: str) -> str:
  caption = " ".join(caption.split())  # newlines and runs of spaces
  return (
    caption
    if len(caption) <= MAX_CAPTION
    else caption[: MAX_CAPTION - 1] + "\N{HORIZONTAL ELLIPSIS}"
  )


def similarity_matrix(
  img_emb,
  txt_emb,
  captions,
  path,
  images=None,
  title="held-out cosine similarity (rows: images, columns: captions)",
):
  """Write the heat map to ``path``; returns the heat map's (width, height) in inches."""
  sim = np.asarray(img_emb) @ np.asarray(txt_emb).T
  n = sim.shape[0]
  labels, families, replaced = renderable([_shorten(c) for c in captions])
  # The heat map's size depends on n only: the figure grows around it to fit the captions
  # (bbox_inches="tight"), so long captions cannot squash it.
  cell = 0.45
  side = max(cell * n, 1.5)
  fig = plt.figure(figsize=(side + 1.6, side + 0.9))
  ax = fig.add_axes(
    (0.6 / (side + 1.6), 0.3 / (side + 0.9), side / (side + 1.6), side / (side + 0.9))
  )
  im = ax.imshow(sim, cmap="viridis", vmin=-1, vmax=1)
  ax.set_xticks(range(n), labels, rotation=90, fontsize=7, family=families)
  if images is not None:
    # Thumbnails in place of row labels.
    ax.set_yticks([])
    for i, img in enumerate(images):
      ax.imshow(
        (np.asarray(img) + 1) / 2, extent=(-1.5, -0.55, i + 0.45, i - 0.45), interpolation="nearest"
      )
    ax.set_xlim(-1.6, n - 0.5)
  ax.set_ylim(n - 0.5, -0.5)
  if replaced:
    title += (
      f"\n{PLACEHOLDER}: a character that no installed font can draw (install a font "
      "that has it, e.g. Noto Sans CJK)"
    )
  ax.set_title(title, fontsize=9 if not replaced else 8, family=families)
  cax = fig.add_axes(
    (ax.get_position().x1 + 0.02, ax.get_position().y0, 0.03, ax.get_position().height)
  )
  bar = fig.colorbar(im, cax=cax)
  bar.set_label("cosine similarity (image, caption)", fontsize=8)
  bar.ax.tick_params(labelsize=7)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  box = ax.get_position()
  size = (box.width * fig.get_figwidth(), box.height * fig.get_figheight())
  plt.close(fig)
  return size
