"""Shared by the trainer's tests: the smoke config with overrides."""

from __future__ import annotations

from siglip_fast.train.configs import tiny_shapes


def tiny_config(lit=False, **top):
  """The trainer's smoke config (tiny towers, four steps), with top-level overrides."""
  c = tiny_shapes.get_config("lit" if lit else None)
  for k, v in top.items():
    c[k] = v
  return c
