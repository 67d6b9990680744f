"""Two towers in Flax: a small ViT for images, a small Transformer for text.

Each tower ends in a linear projection to the shared embedding width and L2 normalisation,
which is what ``sigmoid_loss`` expects. The loss's learnable log-temperature t' and bias b
live at the top of the parameter tree (``params["log_t"]``, ``params["bias"]``) beside the
towers (``params["img"]``, ``params["txt"]``), so LiT can lock ``img`` by name.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def l2_normalize(x, eps=1e-6):
  # Normalise in float32: the loss's dot products are only meaningful on unit vectors.
  x = x.astype(jnp.float32)
  return x * jnp.reciprocal(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps))


class Block(nn.Module):
  """Pre-LayerNorm Transformer encoder block."""

  width: int
  heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype, deterministic=True)(
      y, y, mask=mask
    )
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(self.width * self.mlp_ratio, dtype=self.dtype)(y)
    y = nn.Dense(self.width, dtype=self.dtype)(nn.gelu(y))
    return x + y


def sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0):
  """Fixed 2-D sine-cosine position embeddings, (1, h * w, width). Their unit amplitude
  makes the towers position-aware from the first step; learned embeddings that start
  near zero left "top left" versus "bottom right" unlearned in our short runs."""
  if width % 4:
    raise ValueError(f"sincos2d position embeddings need width % 4 == 0, got {width}")
  y, x = jnp.mgrid[:h, :w]
  omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)[None]


class MAPHead(nn.Module):
  """Multihead attention pooling: one learned query attends over the tokens. Unlike a mean,
  it can pick out the tokens that matter and keep *where* they are (their values carry the
  position embedding), which a caption such as "... in the top left" needs."""

  heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, _, width = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width))
    x = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype, deterministic=True)(
      jnp.tile(probe, (n, 1, 1)).astype(self.dtype), x
    )
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(width * self.mlp_ratio, dtype=self.dtype)(y)
    x = x + nn.Dense(width, dtype=self.dtype)(nn.gelu(y))
    return x[:, 0]


class ViT(nn.Module):
  """Patchify, add positions ("sincos2d" fixed, or "learn"), encode, pool ("map":
  attention pooling, or "gap": mean), project, normalise."""

  embed_dim: int = 64
  patch: int = 4
  width: int = 64
  depth: int = 2
  heads: int = 4
  pool: str = "gap"
  posemb: str = "sincos2d"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    if images.ndim != 4 or images.shape[1] % self.patch or images.shape[2] % self.patch:
      raise ValueError(
        f"images must be (batch, H, W, C) with H and W multiples of patch="
        f"{self.patch}, got shape {images.shape}"
      )
    x = nn.Conv(
      self.width,
      (self.patch, self.patch),
      strides=(self.patch, self.patch),
      padding="VALID",
      dtype=self.dtype,
      name="embed",
    )(images.astype(self.dtype))
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if self.posemb == "sincos2d":
      pos = sincos_2d(h, w, c)
    elif self.posemb == "learn":
      pos = self.param("pos", nn.initializers.normal(0.02), (1, h * w, c))
    else:
      raise ValueError(f"posemb must be 'sincos2d' or 'learn', got {self.posemb!r}")
    x = x + pos.astype(self.dtype)
    for i in range(self.depth):
      x = Block(self.width, self.heads, dtype=self.dtype, name=f"block{i}")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
    if self.pool == "map":
      x = MAPHead(self.heads, dtype=self.dtype, name="map")(x)
    elif self.pool == "gap":
      x = x.mean(axis=1)
    else:
      raise ValueError(f"pool must be 'map' or 'gap', got {self.pool!r}")
    return l2_normalize(nn.Dense(self.embed_dim, dtype=self.dtype, name="head")(x))


class TextTransformer(nn.Module):
  """Embed bytes, group every ``patch`` consecutive bytes into one token (as a ViT groups
  pixels; it divides the sequence length, and so the cost, by ``patch``), add learned
  positions, encode with a padding mask, mean-pool the non-padding tokens, project,
  normalise. Token id 0 is padding."""

  embed_dim: int = 64
  vocab_size: int = 259
  max_len: int = 48
  width: int = 64
  depth: int = 2
  heads: int = 4
  patch: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len or tokens.shape[1] % self.patch:
      raise ValueError(
        f"tokens must be (batch, length <= {self.max_len}) with length a "
        f"multiple of patch={self.patch}, got shape {tokens.shape}"
      )
    n, length = tokens.shape
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="embed")(tokens)
    if self.patch > 1:
      x = x.reshape(n, length // self.patch, self.patch * self.width)
      x = nn.Dense(self.width, dtype=self.dtype, name="patch")(x)
    keep = (tokens != 0).reshape(n, length // self.patch, self.patch).any(axis=-1)
    pos = self.param(
      "pos", nn.initializers.normal(0.02), (1, self.max_len // self.patch, self.width)
    )
    x = x + pos[:, : x.shape[1]].astype(self.dtype)
    mask = nn.make_attention_mask(keep, keep)
    for i in range(self.depth):
      x = Block(self.width, self.heads, dtype=self.dtype, name=f"block{i}")(x, mask)
    x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
    w = keep[..., None].astype(x.dtype)
    x = (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
    return l2_normalize(nn.Dense(self.embed_dim, dtype=self.dtype, name="head")(x))


class TwoTower(nn.Module):
  """Image and text towers plus the loss's t' and b.

  ``image``/``text`` are keyword dicts for ``ViT``/``TextTransformer`` (embed_dim is shared).
  Returns (img_emb, txt_emb, log_t, bias); either input may be None to embed one side only.
  """

  embed_dim: int = 64
  image: Any = None
  text: Any = None
  log_t_init: float = math.log(10.0)
  bias_init: float = -10.0

  def setup(self):
    self.img = ViT(embed_dim=self.embed_dim, **dict(self.image or {}))
    self.txt = TextTransformer(embed_dim=self.embed_dim, **dict(self.text or {}))
    self.log_t = self.param("log_t", lambda _: jnp.asarray(self.log_t_init, jnp.float32))
    self.bias = self.param("bias", lambda _: jnp.asarray(self.bias_init, jnp.float32))

  def __call__(self, images=None, tokens=None):
    zimg = None if images is None else self.img(images)
    ztxt = None if tokens is None else self.txt(tokens)
    return zimg, ztxt, self.log_t, self.bias


def from_config(model_cfg, vocab_size: int, max_len: int) -> TwoTower:
  """A ``TwoTower`` from the ``config.model`` section and the tokenizer's sizes."""
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_cfg.get("dtype", "float32")]
  image = dict(model_cfg.image)
  text = dict(model_cfg.text)
  return TwoTower(
    embed_dim=model_cfg.embed_dim,
    image={**image, "dtype": dtype},
    text={**text, "vocab_size": vocab_size, "max_len": max_len, "dtype": dtype},
    log_t_init=float(model_cfg.log_t_init),
    bias_init=float(model_cfg.bias_init),
  )
