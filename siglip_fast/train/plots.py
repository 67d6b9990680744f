"""End-of-run figures: the training loss curve and a held-out similarity matrix (PNG)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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


def similarity_matrix(img_emb, txt_emb, captions, path, images=None,
                      title="held-out cosine similarity (rows: images, columns: captions)"):
  sim = np.asarray(img_emb) @ np.asarray(txt_emb).T
  n = sim.shape[0]
  fig, ax = plt.subplots(figsize=(2 + 0.45 * n, 1.5 + 0.45 * n))
  im = ax.imshow(sim, cmap="viridis", vmin=-1, vmax=1)
  ax.set_xticks(range(n), [c if len(c) <= 40 else c[:37] + "..." for c in captions],
                rotation=90, fontsize=7)
  if images is not None:
    # Thumbnails in place of row labels.
    ax.set_yticks([])
    for i, img in enumerate(images):
      ax.imshow((np.asarray(img) + 1) / 2, extent=(-1.5, -0.55, i + 0.45, i - 0.45),
                interpolation="nearest")
    ax.set_xlim(-1.6, n - 0.5)
  ax.set_ylim(n - 0.5, -0.5)
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.03)
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
