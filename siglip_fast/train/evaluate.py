"""Held-out evaluation: zero-shot classification and image-text retrieval recall.

Both work on L2-normalised embeddings, so similarity is a dot product. Retrieval counts a hit
when a retrieved item is *equivalent* to the query's partner (same key: the caption text, or
the attribute tuple), because a procedural data set repeats descriptions; the chance level
of each metric is computed exactly from those keys and reported beside it.
"""

from __future__ import annotations

from math import comb
from typing import Callable, Sequence

import jax
import numpy as np


def embed(fn: Callable, inputs: np.ndarray, batch_size: int) -> np.ndarray:
  """Apply ``fn`` (a jitted batch -> (batch, D) embedding function) in fixed-size batches,
  padding the last one so that ``fn`` compiles once."""
  n = len(inputs)
  out = []
  for start in range(0, n, batch_size):
    chunk = inputs[start : start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(chunk))[: batch_size - pad])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def prompt_embeddings(
  embed_texts: Callable[[Sequence[str]], np.ndarray],
  class_names: Sequence[str],
  templates: Sequence[str],
) -> np.ndarray:
  """(classes, templates, D): one embedding per class and prompt template (``{}`` is
  replaced by the class name)."""
  prompts = [t.format(c) for c in class_names for t in templates]
  return embed_texts(prompts).reshape(len(class_names), len(templates), -1)


def class_embeddings(
  embed_texts: Callable[[Sequence[str]], np.ndarray],
  class_names: Sequence[str],
  templates: Sequence[str],
) -> np.ndarray:
  """One embedding per class: the mean over prompt templates, renormalised (CLIP's
  prompt ensembling)."""
  z = prompt_embeddings(embed_texts, class_names, templates).mean(axis=1)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def zero_shot_accuracy(img_emb: np.ndarray, labels: np.ndarray, cls_emb: np.ndarray) -> float:
  """Accuracy of the nearest class: ``cls_emb`` is (classes, D), or (classes, templates, D)
  to score each class by its best-matching prompt."""
  cls_emb = np.asarray(cls_emb)
  if cls_emb.ndim == 3:
    scores = np.einsum("nd,ctd->nct", img_emb, cls_emb).max(axis=2)
  else:
    scores = img_emb @ cls_emb.T
  return float(np.mean(np.argmax(scores, axis=1) == np.asarray(labels)))


def _recall(sim: np.ndarray, hit: np.ndarray, k: int) -> float:
  # Row i scores its candidates; a hit if any of the k best is equivalent to the partner.
  # Ties are broken by candidate index, which makes the metric deterministic.
  top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.take_along_axis(hit, top, axis=1).any(axis=1)))


def _chance(hit: np.ndarray, k: int) -> float:
  # Expected recall@k of a random ranking: 1 - C(n - m, k) / C(n, k) for m hits among n.
  n = hit.shape[1]
  if k >= n:
    return float(np.mean(hit.any(axis=1)))
  return float(np.mean([1 - comb(n - m, k) / comb(n, k) for m in hit.sum(axis=1)]))


def retrieval(img_emb, txt_emb, img_keys, txt_keys, ks=(1, 5), unique_texts=True) -> dict:
  """Image-to-text and text-to-image recall@k, and their chance levels.

  img_emb (n, D) and txt_emb (m, D); img_keys (n,) and txt_keys (m,): an image and a text
  match when their keys are equal (for paired data, the caption or pair id of each row).
  With ``unique_texts`` (for caption keys, where equal keys mean identical texts and so
  identical embeddings) image-to-text ranks each distinct text once; otherwise k copies of
  one wrong caption would fill the top k and recall@k would say nothing beyond recall@1.
  """
  img_keys, txt_keys = np.asarray(img_keys), np.asarray(txt_keys)
  if len(img_keys) != len(img_emb) or len(txt_keys) != len(txt_emb):
    raise ValueError(
      "need one key per embedding row: got "
      f"{len(img_keys)} keys for {len(img_emb)} images and {len(txt_keys)} "
      f"keys for {len(txt_emb)} texts"
    )
  img_emb, txt_emb = np.asarray(img_emb), np.asarray(txt_emb)
  sim = img_emb @ txt_emb.T
  hit = img_keys[:, None] == txt_keys[None, :]
  if unique_texts:
    _, first = np.unique(txt_keys, return_index=True)
    first = np.sort(first)
    sim_i2t, hit_i2t = sim[:, first], hit[:, first]
  else:
    sim_i2t, hit_i2t = sim, hit
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = _recall(sim_i2t, hit_i2t, k)
    out[f"t2i_r{k}"] = _recall(sim.T, hit.T, k)
    out[f"i2t_r{k}_chance"] = _chance(hit_i2t, k)
    out[f"t2i_r{k}_chance"] = _chance(hit.T, k)
  return out


def make_embedders(model, params, tokenizer, batch_size: int):
  """(images -> embeddings, list of str -> embeddings), jitted on the first local device.

  ``params`` are copied to the host first, so this works the same whether the live
  parameters are replicated over one process's devices or over many processes. They are
  passed as arguments, not baked into the program as constants.
  """
  host = jax.tree.map(
    lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else np.asarray(a),
    params,
  )
  host = jax.device_put(host, jax.local_devices()[0])
  img_fn = jax.jit(lambda p, x: model.apply({"params": p}, images=x)[0])
  txt_fn = jax.jit(lambda p, t: model.apply({"params": p}, tokens=t)[1])

  def embed_images(images):
    return embed(lambda x: img_fn(host, x), np.asarray(images, np.float32), batch_size)

  def embed_texts(texts):
    return embed(lambda t: txt_fn(host, t), tokenizer.encode_batch(list(texts)), batch_size)

  return embed_images, embed_texts


def evaluate_pairs(
  embed_images, embed_texts, batch: dict, class_names=None, templates=("{}",)
) -> tuple[dict, np.ndarray, np.ndarray]:
  """Zero-shot accuracy (if labels and class names are given) and retrieval on a held-out
  batch dict (``image``, ``caption``, optional ``label``). Returns (metrics, img, txt emb)."""
  zi = embed_images(batch["image"])
  zt = embed_texts(batch["caption"])
  keys = np.asarray(batch["caption"], dtype=object)
  out = retrieval(zi, zt, keys, keys)
  out["n_eval"] = len(zi)
  if class_names is not None and "label" in batch:
    prompts = prompt_embeddings(embed_texts, class_names, templates)
    # The prompts spell out the attributes a class leaves open (size, place, ...), so an
    # image matches one of them, not their average: score a class by its best prompt.
    # CLIP's mean-embedding ensembling is kept for comparison.
    out["zero_shot_acc"] = zero_shot_accuracy(zi, batch["label"], prompts)
    mean = prompts.mean(axis=1)
    mean /= np.linalg.norm(mean, axis=-1, keepdims=True)
    out["zero_shot_acc_mean_prompt"] = zero_shot_accuracy(zi, batch["label"], mean)
    counts = np.bincount(np.asarray(batch["label"]), minlength=len(class_names))
    out["zero_shot_chance"] = float(counts.max() / counts.sum())  # best constant guess
    out["n_classes"] = len(class_names)
  return out, zi, zt


def summary(m: dict) -> str:
  """One human-readable block of the metrics above."""
  lines = []
  if "zero_shot_acc" in m:
    lines.append(
      f"zero-shot accuracy {m['zero_shot_acc']:.3f} over {m['n_classes']} classes "
      f"(chance {m['zero_shot_chance']:.3f}; {m['zero_shot_acc_mean_prompt']:.3f} "
      "with mean-prompt ensembling)"
    )
  for d in ("i2t", "t2i"):
    lines.append(
      f"{d} recall@1 {m[f'{d}_r1']:.3f} (chance {m[f'{d}_r1_chance']:.3f})  "
      f"recall@5 {m[f'{d}_r5']:.3f} (chance {m[f'{d}_r5_chance']:.3f})"
    )
  return "\n".join(lines)
