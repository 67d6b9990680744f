"""siglip-fast: fused Pallas kernels for the SigLIP pairwise sigmoid loss.

    loss = siglip_fast.sigmoid_loss(img_emb, txt_emb, log_t, bias)

See ``siglip_fast.loss`` for the implementations and ``siglip_fast.reference`` for the oracle.
The loss needs only jax and numpy. ``SigmoidLoss`` (a Flax module) is imported on first use
and needs flax (``pip install "siglip-fast[flax]"``); the example trainer,
``siglip_fast.train``, needs the ``train`` extra.
"""

from siglip_fast.loss import (
  IMPLEMENTATIONS,
  block_ops,
  default_implementation,
  sigmoid_loss,
  sigmoid_loss_sharded,
)
from siglip_fast import mesh

__all__ = [
  "IMPLEMENTATIONS",
  "SigmoidLoss",
  "block_ops",
  "default_implementation",
  "mesh",
  "sigmoid_loss",
  "sigmoid_loss_sharded",
]
__version__ = "0.1.0"


def __getattr__(name):
  # Lazily, so that `import siglip_fast` works without flax.
  if name == "SigmoidLoss":
    try:
      from siglip_fast.module import SigmoidLoss  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
        "siglip_fast.SigmoidLoss is a Flax module and needs flax: "
        'pip install "siglip-fast[flax]" (or flax)'
      ) from e
    globals()["SigmoidLoss"] = SigmoidLoss
    return SigmoidLoss
  raise AttributeError(f"module 'siglip_fast' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | {"SigmoidLoss"})
