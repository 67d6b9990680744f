"""A byte-level tokenizer: UTF-8 bytes shifted past three special ids.

Nothing to train and nothing to download, so any caption in any language has a fixed-length
encoding. The trainer writes ``to_dict()`` into every checkpoint's metadata (and
``tokenizer.json`` in the workdir), so a checkpoint is decoded with the tokenizer it was
trained with.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

PAD, BOS, EOS = 0, 1, 2
_OFFSET = 3  # byte value v has id v + _OFFSET


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """Fixed-length byte tokenizer: ``[BOS] bytes... [EOS] PAD...``, truncated to ``max_len``."""

  max_len: int = 48

  def __post_init__(self):
    if not isinstance(self.max_len, int) or self.max_len < 3:
      raise ValueError(f"max_len must be an int >= 3 (BOS, one byte, EOS), got {self.max_len!r}")

  @property
  def vocab_size(self) -> int:
    return 256 + _OFFSET

  def encode(self, text: str) -> np.ndarray:
    if not isinstance(text, str):
      raise TypeError(f"text must be a str, got {type(text).__name__}")
    body = np.frombuffer(text.encode("utf-8"), np.uint8)[: self.max_len - 2]
    ids = np.full((self.max_len,), PAD, np.int32)
    ids[0] = BOS
    ids[1 : 1 + len(body)] = body.astype(np.int32) + _OFFSET
    ids[1 + len(body)] = EOS
    return ids

  def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
    """(len(texts), max_len) int32."""
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a sequence of strings, got a single str")
    out = np.zeros((len(texts), self.max_len), np.int32)
    for i, t in enumerate(texts):
      out[i] = self.encode(t)
    return out

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    body = [int(i) - _OFFSET for i in ids if int(i) >= _OFFSET]
    return bytes(body).decode("utf-8", errors="replace")

  def to_dict(self) -> dict:
    return {"kind": "bytes", "max_len": self.max_len}

  @classmethod
  def from_dict(cls, d: dict) -> "ByteTokenizer":
    if d.get("kind") != "bytes":
      raise ValueError(f"not a byte tokenizer description: {d!r}")
    return cls(max_len=int(d["max_len"]))

  def save(self, path) -> None:
    with open(path, "w") as f:
      json.dump(self.to_dict(), f)

  @classmethod
  def load(cls, path) -> "ByteTokenizer":
    with open(path) as f:
      return cls.from_dict(json.load(f))
